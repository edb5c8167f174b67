"""Concept binding in the toy world (as in Frozen's open-ended miniImageNet, Tsimpoukelli et al. 2021).

An episode binds random nonsense words ("dapo", "kire") to N classes of one attribute (shape, or colour):
k demos "<image> this is a dapo", then the query "<image> this is a" -> "dapo". The word of a class holds
only within its episode, so the query can only be answered by matching the query image against the demo
images: a task that needs the demos *and* their images (text-only demos give chance, 1/N).

Nonsense words are two syllables ("da" + "po"), which the toy tokenizer splits into two word pieces
("da", "##po"). Every syllable is seen in training, but the *words* are split into three disjoint pools:
backbone pretraining, the AIM/MMICT training corpus, and the downstream evaluation split, so nothing an
evaluation asks for can have been memorised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mmict.toy.language import COLORS, DEFAULT_ATTRIBUTES, POSITIONS, SHAPES


@dataclass(frozen=True)
class BoundImage:
    """One image of an episode: what to draw and the word it is bound to."""

    shape: str
    color: str
    position: str
    word: str


@dataclass(frozen=True)
class Episode:
    attribute: str  # "shape" or "color": what the words name
    classes: tuple[str, ...]  # the N values of that attribute, in word order
    words: tuple[str, ...]  # words[i] names classes[i]
    fixed: str  # the other attribute, the same for every image (so the binding is unambiguous)

    def image(self, class_index: int, rng: random.Random) -> BoundImage:
        """An image of class ``class_index`` at a random position."""
        value = self.classes[class_index]
        shape, color = (value, self.fixed) if self.attribute == "shape" else (self.fixed, value)
        return BoundImage(shape, color, rng.choice(POSITIONS), self.words[class_index])


def sample_episode(rng: random.Random, pool: tuple[str, ...] | list[str], n_way: int = 2,
                   attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES) -> Episode:
    """N classes of a random attribute (of ``attributes``), each bound to a distinct random word of ``pool``."""
    attribute = rng.choice(attributes)
    values, others = (SHAPES, COLORS) if attribute == "shape" else (COLORS, SHAPES)
    if not 1 <= n_way <= len(values):
        raise ValueError(f"n_way={n_way} must be in 1..{len(values)}")
    return Episode(attribute, tuple(rng.sample(values, n_way)), tuple(rng.sample(list(pool), n_way)),
                   rng.choice(others))


def balanced_classes(rng: random.Random, n_way: int, k: int) -> list[int]:
    """k class indices cycling through the classes from a random start, in random order.

    Each class appears k // n_way or k // n_way + 1 times, so from k >= n_way shots on every class
    has a demo, and the chance rate of "answer with a demo's word" is 1 / n_way at every k >= 1.
    """
    start = rng.randrange(n_way)
    classes = [(start + i) % n_way for i in range(k)]
    rng.shuffle(classes)
    return classes


def episode_document(rng: random.Random, pool: tuple[str, ...] | list[str], k: int, n_way: int = 2
                     ) -> list[BoundImage]:
    """k demos then one query (of a class that has a demo), as the pairs of an interleaved document."""
    episode = sample_episode(rng, pool, n_way)
    demos = [episode.image(c, rng) for c in balanced_classes(rng, n_way, k)]
    query_class = rng.choice(sorted({episode.words.index(d.word) for d in demos}))
    return demos + [episode.image(query_class, rng)]
