"""Downstream tasks: how a query is prompted, how a demo reads, and how demos are drawn for a query.

One entry per task; the evaluation loop and the demo selection read only this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from data_modules.downstream import Example
from data_modules.toy_binding import BINDING_PROMPT, BINDING_TASK, binding_text
from data_modules.toy_world import vqa_demo_text, vqa_prompt
from mmict.eval.metrics import exact_match
from mmict.eval.postprocess import first_word, postprocess_vqa


@dataclass(frozen=True)
class Task:
    name: str
    query_prompt: Callable[[Example], str]
    demo_text: Callable[[Example], str]
    # Generation -> the answer that is scored.
    postprocess: Callable[[str], str] = postprocess_vqa
    # Episodic tasks draw a query's demos from its own episode (`Example.group`), balanced over the
    # episode's classes; the others draw them from the whole pool.
    episodic: bool = False
    # (post-processed answer, reference answers) -> score in [0, 1], averaged over queries ...
    score: Callable[[str, list[str]], float] = exact_match
    metric: str = "exact_match"
    # ... unless the metric is corpus-level (CIDEr's document frequencies, ROC-AUC): then this scores
    # all of a trial's answers at once, (answers, references) -> score.
    corpus_score: Callable[[list[str], list[list[str]]], float] | None = None

    def score_trial(self, predictions: list[str], references: list[list[str]]) -> float:
        if self.corpus_score is not None:
            return self.corpus_score(predictions, references)
        return sum(self.score(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)
    # Decoding: greedy (1 beam) for short answers; captioning tasks use beams (OpenFlamingo: 3).
    num_beams: int = 1
    max_new_tokens: int = 5


TASKS: dict[str, Task] = {
    "toy_vqa": Task("toy_vqa", lambda q: vqa_prompt(q.question), lambda d: vqa_demo_text(d.question, d.answers[0])),
    BINDING_TASK: Task(BINDING_TASK, lambda q: q.question or BINDING_PROMPT, lambda d: binding_text(d.answers[0]),
                       postprocess=first_word, episodic=True, max_new_tokens=3),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown eval.task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]
