"""Answer scoring. For now exact match after light normalisation; the official VQA metrics replace
this in the evaluation issue (see issues)."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = {"a", "an", "the"}
_STOP_WORDS = ("Question", "Answer", "Short")  # a generation runs on into the next turn: cut there


def postprocess_vqa(generation: str) -> str:
    """Keep the answer only: cut at the next turn marker and at the first ', ' (OpenFlamingo's rule)."""
    for word in _STOP_WORDS:
        generation = generation.split(word, 1)[0]
    return generation.split(", ", 1)[0].strip()


def normalize_answer(text: str) -> str:
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))
