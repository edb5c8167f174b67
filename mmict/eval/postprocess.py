"""Generation -> the answer that is scored, per task, as OpenFlamingo's evaluation harness does it.

A generation runs on past the answer (into the next turn of the few-shot format), so it is cut:
- VQA: at the next "Question" / "Answer" / "Short" turn marker, then at the first ", ";
- captions: at "Output" (the next caption turn) and stripped of quotes;
- binding (toy): the first word.
`eval.postprocess` picks one by name for any task (`none` keeps the raw generation).
"""

from __future__ import annotations

from collections.abc import Callable

_STOP_WORDS = ("Question", "Answer", "Short")  # a generation runs on into the next turn: cut there


def postprocess_vqa(generation: str) -> str:
    """Keep the answer only: cut at the next turn marker and at the first ', ' (OpenFlamingo's rule)."""
    for word in _STOP_WORDS:
        generation = generation.split(word, 1)[0]
    return generation.split(", ", 1)[0].strip()


def postprocess_caption(generation: str) -> str:
    return generation.split("Output", 1)[0].replace('"', "").strip()


def first_word(generation: str) -> str:
    """A one-word answer: what follows it (the next demo's text, as pretraining documents go on) is cut."""
    words = generation.split()
    return words[0] if words else ""


POSTPROCESSORS: dict[str, Callable[[str], str]] = {
    "vqa": postprocess_vqa,
    "caption": postprocess_caption,
    "first_word": first_word,
    "none": str.strip,
}


def get_postprocessor(name: str) -> Callable[[str], str]:
    if name not in POSTPROCESSORS:
        raise ValueError(f"unknown eval.postprocess {name!r}; known: {sorted(POSTPROCESSORS)}")
    return POSTPROCESSORS[name]
