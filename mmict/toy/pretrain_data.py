"""The toy backbone's pretraining corpus, generated on the fly (fresh documents every step, no shards).

Three kinds of interleaved document, each a list of segments ready for `Backbone.assemble`:

- **captions**: 2-6 independent images, each with its caption or a VQA line about it. Nothing in the
  text predicts the next image's words, so the only way to lower the loss is to read the image.
- **binding episodes** over the *pretrain* word pool (``binding.py``): k demos "<image> this is a
  dapo" and a query of a class that has a demo. This is where in-context binding is learnt.
- **concept episodes** over the *pretrain* rules (``concept.py``): k demos "<image> does it fit ? yes|no" labelled
  by a hidden rule ("is it red?") and a query; the toy BLIP-2 learns concept induction here (``concept`` in the mix).
- **word lists**: a few nonsense words, then repeats of them ("kire dapo mune dapo kire ..."). Copying a
  two-piece word that appeared earlier (an induction head) is what binding needs; a tiny model learns it
  in a few hundred steps from word lists and in thousands from binding episodes alone (measured), so
  pretraining opens with word lists only (``text_steps``) and keeps some in the mix after.

Inner texts are targets without EOS (as demos are shown at evaluation); the last text ends with EOS.
Images come from a bank rendered once (every shape x colour x position, a few jittered variants each).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import IterableDataset

from mmict.segments import Image, Prompt, Text
from mmict.toy.binding import episode_document
from mmict.toy.concept import concept_document as concept_episode_images
from mmict.toy.language import (
    COLORS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    answer_for,
    binding_text,
    caption,
    concept_text,
    rule_pools,
    vqa_demo_text,
    word_pools,
)
from mmict.toy.world import draw_shape

# Document mix after the word-list warm-up (fractions of a batch).
MIX = {"captions": 0.25, "binding": 0.6, "word_lists": 0.15}
MAX_SHOTS = 7  # binding episodes hold 1..7 demos and a query
CONCEPT_MAX_SHOTS = 8  # concept episodes 1..8: the evaluation's largest k is seen in pretraining


class ImageBank:
    """Every (shape, colour, position) drawn ``variants`` times with jitter, transformed once."""

    def __init__(self, image_transform: Callable, image_size: int = 32, variants: int = 4, seed: int = 0) -> None:
        rng = random.Random(f"toy-image-bank/{seed}")
        self.pixels: dict[tuple[str, str, str], list[torch.Tensor]] = {}
        for shape in SHAPES:
            for color in COLORS:
                for position in POSITIONS:
                    self.pixels[shape, color, position] = [
                        image_transform(draw_shape(shape, color, position, size=image_size, rng=rng))
                        for _ in range(variants)
                    ]

    def draw(self, rng: random.Random, shape: str, color: str, position: str) -> torch.Tensor:
        return rng.choice(self.pixels[shape, color, position])


def _document(pairs: list[tuple[torch.Tensor, str]]) -> Prompt:
    prompt: Prompt = []
    for i, (pixels, text) in enumerate(pairs):
        prompt += [Image(pixels), Text(text, target=True, eos=i == len(pairs) - 1)]
    return prompt


def caption_document(rng: random.Random, bank: ImageBank) -> Prompt:
    pairs = []
    for _ in range(rng.randint(2, 6)):
        attrs = {"shape": rng.choice(SHAPES), "color": rng.choice(COLORS), "position": rng.choice(POSITIONS)}
        form = rng.choice(("caption", "caption", *QUESTIONS))
        text = caption(**attrs) if form == "caption" else vqa_demo_text(QUESTIONS[form], answer_for(form, **attrs))
        pairs.append((bank.draw(rng, attrs["shape"], attrs["color"], attrs["position"]), text))
    return _document(pairs)


def binding_document(rng: random.Random, bank: ImageBank, pool: tuple[str, ...], n_way: int) -> Prompt:
    pairs = episode_document(rng, pool, k=rng.randint(1, MAX_SHOTS), n_way=n_way)
    return _document([(bank.draw(rng, p.shape, p.color, p.position), binding_text(p.word)) for p in pairs])


def concept_document(rng: random.Random, bank: ImageBank, pool: tuple) -> Prompt:
    images = concept_episode_images(rng, pool, rng.randint(1, CONCEPT_MAX_SHOTS))
    return _document([(bank.draw(rng, c.shape, c.color, c.position), concept_text(c.label)) for c in images])


def recall_document(rng: random.Random, pool: tuple[str, ...], n_way: int) -> Prompt:
    """A binding episode keyed by colour *words* instead of images: "red this is a dapo blue this is a kire
    red this is a" -> "dapo". It teaches the match-the-key-then-copy circuit on keys the model reads for
    free; captions teach it to read the same colour from an image."""
    pairs = episode_document(rng, pool, k=rng.randint(1, MAX_SHOTS), n_way=n_way)
    return [Text(" ".join(f"{p.color} {binding_text(p.word)}" for p in pairs), target=True)]


def word_list_document(rng: random.Random, pool: tuple[str, ...]) -> Prompt:
    words = rng.sample(pool, rng.randint(2, 6))
    words += [rng.choice(words) for _ in range(rng.randint(4, 10))]
    return [Text(" ".join(words), target=True)]


class ToyPretrainStream(IterableDataset):
    """Endless batches (lists of prompts) of pretraining documents; the first ``text_steps`` are word lists."""

    def __init__(self, image_transform: Callable, *, batch_size: int, text_steps: int, image_size: int = 32,
                 n_way: int = 2, seed: int = 0, mix: dict[str, float] | None = None) -> None:
        super().__init__()
        self.image_transform, self.image_size = image_transform, image_size
        self.batch_size, self.text_steps, self.n_way, self.seed = batch_size, text_steps, n_way, seed
        self.pool = word_pools()["pretrain"]
        self.rules = rule_pools()["pretrain"]
        self.mix = dict(mix or MIX)

    def __iter__(self) -> Iterator[list[Prompt]]:
        bank = ImageBank(self.image_transform, self.image_size, seed=self.seed)
        rng = random.Random(f"toy-pretrain/{self.seed}")
        kinds, weights = list(self.mix), list(self.mix.values())
        step = 0
        while True:
            batch = []
            for _ in range(self.batch_size):
                kind = "word_lists" if step < self.text_steps else rng.choices(kinds, weights)[0]
                if kind == "captions":
                    batch.append(caption_document(rng, bank))
                elif kind == "binding":
                    batch.append(binding_document(rng, bank, self.pool, self.n_way))
                elif kind == "concept":
                    batch.append(concept_document(rng, bank, self.rules))
                elif kind == "recall":
                    batch.append(recall_document(rng, self.pool, self.n_way))
                else:
                    batch.append(word_list_document(rng, self.pool))
            step += 1
            yield batch
