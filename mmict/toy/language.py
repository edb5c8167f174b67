"""The toy world's language: its colours, shapes and positions, the templates of every text it writes, and the
nonsense words that binding episodes bind to images, split into disjoint pools.

The one place these live: the world writer (`world.py`), the binding episodes (`binding.py`), the pretraining
stream (`pretrain_data.py`), the toy tokenizer (`backbone.py`) and the evaluation tasks (`mmict.eval.tasks`) all
import them from here. It imports nothing of mmict, so any layer may use it.
"""

from __future__ import annotations

import random
import re
from functools import cache

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (230, 200, 30),
    "purple": (130, 60, 170),
    "orange": (240, 130, 30),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Shape centre as a fraction of the image side, (x, y).
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUND_RGB: tuple[int, int, int] = (238, 238, 232)

# Attribute -> the one question asked about it.
QUESTIONS: dict[str, str] = {
    "color": "what color is the shape ?",
    "shape": "what shape is it ?",
    "position": "where is the shape ?",
}

_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")


def vqa_prompt(question: str) -> str:
    """The query prompt of a VQA example (the one place this template lives)."""
    return f"Question: {question} Short answer:"


def vqa_demo_text(question: str, answer: str) -> str:
    """A VQA demonstration's text: the prompt followed by its answer."""
    return f"{vqa_prompt(question)} {answer}"


def caption(shape: str, color: str, position: str) -> str:
    """The caption of an image, e.g. "a red circle on the left ."."""
    return f"a {color} {shape} {POSITION_PHRASES[position]} ."


def answer_for(attribute: str, *, shape: str, color: str, position: str) -> str:
    """The true short answer to ``QUESTIONS[attribute]`` about an image."""
    return {"color": color, "shape": shape, "position": position}[attribute]


def tokenize(text: str) -> list[str]:
    """The word-level split the toy tokenizer uses."""
    return _TOKEN_RE.findall(text)


def toy_vocabulary() -> list[str]:
    """Every token any generated text can contain, sorted (deterministic)."""
    texts = []
    for shape in SHAPES:
        for color in COLORS:
            for position in POSITIONS:
                texts.append(caption(shape, color, position))
                for attribute, question in QUESTIONS.items():
                    answer = answer_for(attribute, shape=shape, color=color, position=position)
                    texts.append(vqa_demo_text(question, answer))
    texts += [concept_text(label) for label in CONCEPT_LABELS]
    return sorted({token for text in texts for token in tokenize(text)})


CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES: tuple[str, ...] = tuple(c + v for c in CONSONANTS for v in VOWELS)

BINDING_PROMPT = "this is a"
BINDING_TASK = "toy_binding"
ATTRIBUTES = ("shape", "color")
# What episodes bind words to. Colour only by default: the CPU-sized toy backbone learns to match
# colours across images within its pretraining budget, but not shapes at random positions (measured:
# with both, 2-shot accuracy stayed at chance after 3000 pretraining steps; with colour only it rose).
DEFAULT_ATTRIBUTES: tuple[str, ...] = ("color",)
POOLS = ("pretrain", "tuning", "eval")
# Fractions of the word list per pool (pretraining sees the most words, so it learns to copy any word).
POOL_FRACTIONS = {"pretrain": 0.6, "tuning": 0.2, "eval": 0.2}


def binding_text(word: str) -> str:
    """A demo's text, e.g. "this is a dapo" (its query prompt is ``BINDING_PROMPT``)."""
    return f"{BINDING_PROMPT} {word}"


def binding_vocabulary() -> list[str]:
    """The words the binding texts add to the toy vocabulary (the syllables are word pieces)."""
    return BINDING_PROMPT.split()


@cache
def nonsense_words() -> tuple[str, ...]:
    """Every two-syllable word that the toy tokenizer splits into exactly its two syllables.

    The tokenizer matches the longest known piece first, so a word starting with a real word of 3+
    letters ("red" + "e...") would not split into syllables: those are left out.
    """
    real = [w for w in toy_vocabulary() + binding_vocabulary() if len(w) >= 3]
    words = (a + b for a in SYLLABLES for b in SYLLABLES)
    return tuple(w for w in words if not any(w.startswith(r) for r in real))


@cache
def word_pools(seed: int = 0) -> dict[str, tuple[str, ...]]:
    """Disjoint word pools (pretrain / tuning / eval), a fixed shuffle of ``nonsense_words()``."""
    words = list(nonsense_words())
    random.Random(f"toy-binding-pools/{seed}").shuffle(words)
    pools, start = {}, 0
    for i, name in enumerate(POOLS):
        end = len(words) if i == len(POOLS) - 1 else start + round(POOL_FRACTIONS[name] * len(words))
        pools[name] = tuple(words[start:end])
        start = end
    return pools


# Concept induction (as VL-ICL Bench's): an episode's hidden rule is a conjunction of two attribute values ("a red
# shape on the left": (("color", "red"), ("position", "left"))); its images are labelled yes / no by the rule,
# "<image> does it fit ? yes", and the query asks the same of a new image. The labels alone say nothing (the query's
# label is drawn apart from the demos'), so only the demo images with their labels define the rule, and no unseen
# word has to be copied. The 96 rules are split into disjoint pools like the nonsense words (backbone pretraining,
# the training corpus (tuning), the evaluation): a held-out rule is a combination no pool before it used, of values
# every pool uses. (Single-value rules were tried first: 17 of them, so pretraining had 7 and the toy BLIP-2 learnt
# those 7 by heart: 87-90% at 2-4 shots on them, chance on the held-out ones.)
CONCEPT_TASK = "toy_concept"
CONCEPT_TUNING_TASK = "toy_concept_tuning"
CONCEPT_PROMPT = "does it fit ?"
CONCEPT_LABELS: tuple[str, ...] = ("yes", "no")
CONCEPT_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position")
CONCEPT_VALUES: dict[str, tuple[str, ...]] = {"color": COLORS, "shape": SHAPES, "position": POSITIONS}
CONCEPT_RULE_POOL_SIZES: dict[str, int] = {"eval": 16, "tuning": 16}  # pretraining gets the other 64


def concept_text(label: str) -> str:
    """A concept demo's text, e.g. "does it fit ? yes" (its query prompt is ``CONCEPT_PROMPT``)."""
    return f"{CONCEPT_PROMPT} {label}"


def rule_pools() -> dict[str, tuple[tuple[tuple[str, str], ...], ...]]:
    """Disjoint rule pools (pretrain / tuning / eval) of every two-attribute conjunction, split by a fixed shuffle:
    16 eval rules, 16 tuning rules, the other 64 for pretraining. A rule is ((attribute, value), (attribute, value))
    in `CONCEPT_ATTRIBUTES` order."""
    rules = [((a, va), (b, vb)) for i, a in enumerate(CONCEPT_ATTRIBUTES) for b in CONCEPT_ATTRIBUTES[i + 1:]
             for va in CONCEPT_VALUES[a] for vb in CONCEPT_VALUES[b]]
    random.Random("toy-concept-rules").shuffle(rules)
    n_eval, n_tuning = CONCEPT_RULE_POOL_SIZES["eval"], CONCEPT_RULE_POOL_SIZES["tuning"]
    return {"pretrain": tuple(rules[n_eval + n_tuning:]), "tuning": tuple(rules[n_eval:n_eval + n_tuning]),
            "eval": tuple(rules[:n_eval])}


def rule_name(rule: tuple[tuple[str, str], ...]) -> str:
    """E.g. "color=red,position=left" (the concept examples' json "rule")."""
    return ",".join(f"{a}={v}" for a, v in rule)
