"""The one task table: every downstream task's folder, prompt formats, metric, decoding and post-processing.

One entry per task (`TASKS`). The evaluation loop, the demo selection, the config checks (task names) and the
training data read only this table; data modules get a task's folder and formats passed in (they never import
evaluation). Format functions are module-level functions, not lambdas, so a task pickles into DataLoader
workers under any start method.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from data_modules.downstream import Example
from mmict.eval.metrics import caption_metrics, exact_match, hateful_memes_auc, okvqa_postprocess, vqa_accuracy
from mmict.eval.postprocess import first_word, postprocess_caption, postprocess_vqa
from mmict.toy.language import (
    BINDING_PROMPT,
    BINDING_TASK,
    CONCEPT_PROMPT,
    CONCEPT_TASK,
    CONCEPT_TUNING_TASK,
    binding_text,
    concept_text,
    vqa_demo_text,
    vqa_prompt,
)


def answers_of(example: Example) -> list[str]:
    return example.answers


@dataclass(frozen=True)
class Task:
    name: str
    query_prompt: Callable[[Example], str]
    demo_text: Callable[[Example], str]
    # Its shards' folder under data.root (`<root>/<folder>/{train,val,test}-*.tar`): the converters write there.
    folder: str = ""  # "" = the task's name
    # "generate": the model writes an answer, post-processed and scored. "classify": no generation; each of
    # `classes` is scored as a continuation of the query prompt by its length-normalised log-likelihood, and
    # the trial's answers are P(first class) per query (Hateful Memes: P("yes")), scored by `corpus_score`.
    kind: Literal["generate", "classify"] = "generate"
    classes: tuple[str, ...] = ()
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
    corpus_score: Callable[[list[Any], list[Any]], float] | None = None
    # What a query's answer is scored against: its reference answers, or (classify) its 0/1 label.
    reference: Callable[[Example], Any] = answers_of
    # Decoding of the `mmict` protocol: greedy (1 beam) for short answers; captioning tasks use beams (OpenFlamingo:
    # 3). The `openflamingo` protocol decodes by `style` instead (mmict.eval.protocol).
    num_beams: int = 1
    max_new_tokens: int = 5
    # Which of OpenFlamingo's task families the task is ("vqa", "caption", "classify"; "toy" for the toy world):
    # picks the protocol's decoding and demo separator.
    style: str = "vqa"
    # Corpus-level metrics reported beside the headline one: (answers, references) -> {name: value}, e.g. the
    # BLEU-4, METEOR, ROUGE-L and CIDEr the captioning literature reports. When set, the headline score is its
    # `headline` entry, so a metric is computed once.
    corpus_metrics: Callable[[list[Any], list[Any]], dict[str, float]] | None = None
    headline: str = ""
    # Training only (`data_modules.task_episodes`): query prompts drawn at random per episode (MMICT's reference
    # draws a caption instruction per sample), and the target text as training sees it (its caption cleaning).
    train_prompts: tuple[str, ...] = ()
    train_target: Callable[[str], str] | None = None
    prompt_format: str = "openflamingo"  # which prompt formats these are (PROMPT_FORMATS)

    def __post_init__(self) -> None:
        if not self.folder:
            object.__setattr__(self, "folder", self.name)  # frozen: set once, here
        if self.kind not in ("generate", "classify"):
            raise ValueError(f"task {self.name}: kind must be 'generate' or 'classify', got {self.kind!r}")
        if self.kind == "classify" and (len(self.classes) != 2 or self.corpus_score is None):
            raise ValueError(f"task {self.name}: a classify task needs two classes (positive first) and a "
                             "corpus_score over P(positive)")

    def score_trial(self, predictions: list[Any], references: list[Any]) -> tuple[float, dict[str, float]]:
        """(the headline score, the other corpus metrics)."""
        if self.corpus_metrics is not None:
            scores = self.corpus_metrics(predictions, references)
            return scores[self.headline], scores
        return self.headline_score(predictions, references), {}

    def headline_score(self, predictions: list[Any], references: list[Any]) -> float:
        if self.corpus_score is not None:
            return self.corpus_score(predictions, references)
        return sum(self.score(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions)


# OpenFlamingo's few-shot formats: "Question:{q} Short answer:{a}" and "Output:{caption}".
def _vqa_prompt(q: Example) -> str:
    return f"Question:{q.question} Short answer:"


def _vqa_demo(d: Example) -> str:
    return f"Question:{d.question} Short answer:{d.answers[0]}"


def _caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L, CIDEr (and SPICE where its Stanford CoreNLP jar is installed), as pycocoevalcap's
    COCOEvalCap computes them (OpenFlamingo's coco_metric.compute_cider runs COCOEvalCap and reports CIDEr)."""
    ids = [str(i) for i in range(len(predictions))]
    scores = caption_metrics(dict(zip(ids, predictions)), dict(zip(ids, references)))
    return {name: scores[name] for name in CAPTION_METRICS if name in scores}


CAPTION_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def _vqa_task(name: str, **kw) -> Task:
    return Task(name, _vqa_prompt, _vqa_demo, score=vqa_accuracy, metric="vqa_accuracy", **kw)


def _caption_prompt(q: Example) -> str:
    return "Output:"


def _caption_demo(d: Example) -> str:
    return f"Output:{d.answers[0]}"


def _caption_task(name: str) -> Task:
    return Task(name, _caption_prompt, _caption_demo, postprocess=postprocess_caption, score=exact_match,
                corpus_metrics=_caption_metrics, headline="CIDEr", metric="cider", num_beams=3, max_new_tokens=20,
                style="caption")


# Hateful Memes as OpenFlamingo's harness prompts and scores it (eval_model.get_hateful_memes_prompt, HM_CLASSNAMES,
# get_rank_classifications with normalize_length=True): the meme's written text quoted in the prompt, the class
# names "yes"/"no" right after "Answer:" (no space), ROC-AUC of P(yes) from length-normalised log-likelihoods.
def _hm_prompt(q: Example) -> str:
    return f"is an image with: '{q.question}' written on it. Is it hateful? Answer:"


def _hm_label(ex: Example) -> int:
    if ex.label is None:
        raise ValueError(f"hateful_memes example {ex.id} has no 0/1 'label' in its json")
    return ex.label


def _hm_demo(d: Example) -> str:
    return _hm_prompt(d) + ("yes" if _hm_label(d) == 1 else "no")


def _hm_auc(p_yes: list[float], labels: list[int]) -> float:
    if len(set(labels)) < 2:
        raise ValueError(f"ROC-AUC needs hateful and non-hateful queries; all {len(labels)} have label "
                         f"{labels[0] if labels else None}: raise eval.num_queries or shuffle the test split")
    return hateful_memes_auc(p_yes, labels)


def _toy_vqa_prompt(q: Example) -> str:
    return vqa_prompt(q.question)


def _toy_vqa_demo(d: Example) -> str:
    return vqa_demo_text(d.question, d.answers[0])


def _binding_prompt(q: Example) -> str:
    return q.question or BINDING_PROMPT


def _binding_demo(d: Example) -> str:
    return binding_text(d.answers[0])


def _concept_prompt(q: Example) -> str:
    return q.question or CONCEPT_PROMPT


def _concept_demo(d: Example) -> str:
    return concept_text(d.answers[0])


def _concept_task(name: str, folder: str) -> Task:
    # Episodic: demos from the query's episode, balanced over its labels (yes / no: chance 1/2).
    return Task(name, _concept_prompt, _concept_demo, folder=folder, postprocess=first_word, episodic=True,
                max_new_tokens=2, style="toy", metric="accuracy")


TASKS: dict[str, Task] = {
    # Real benchmarks (shards from the converters: see docs/data.md).
    "vqav2": _vqa_task("vqav2"),
    "okvqa": _vqa_task("okvqa", postprocess=okvqa_postprocess),  # stemmed as OK-VQA v1.1
    "vizwiz": _vqa_task("vizwiz"),
    "textvqa": _vqa_task("textvqa"),
    "coco_caption": _caption_task("coco_caption"),
    "flickr30k": _caption_task("flickr30k"),
    # Video (MMICT's tasks; examples hold frames): captions scored like images', open-ended QA by exact match
    # of the normalised answer (MSVD-QA / MSRVTT-QA report top-1 accuracy over single-word answers).
    "msvd_caption": _caption_task("msvd_caption"),
    "msrvtt_caption": _caption_task("msrvtt_caption"),
    "msvd_qa": Task("msvd_qa", _vqa_prompt, _vqa_demo, metric="accuracy"),
    "msrvtt_qa": Task("msrvtt_qa", _vqa_prompt, _vqa_demo, metric="accuracy"),
    "hateful_memes": Task("hateful_memes", _hm_prompt, _hm_demo, kind="classify", classes=("yes", "no"),
                          reference=_hm_label, corpus_score=_hm_auc, metric="roc_auc", style="classify"),
    # The toy world.
    "toy_vqa": Task("toy_vqa", _toy_vqa_prompt, _toy_vqa_demo, folder="vqa", style="toy"),
    BINDING_TASK: Task(BINDING_TASK, _binding_prompt, _binding_demo, folder="binding", postprocess=first_word,
                       episodic=True, max_new_tokens=3, style="toy"),
    # Concept induction: the eval rules (`concept/`), and the tuning rules (`concept_tuning/`: train / val splits,
    # to train on a task's own split, data.task) whose rules are never evaluated.
    CONCEPT_TASK: _concept_task(CONCEPT_TASK, "concept"),
    CONCEPT_TUNING_TASK: _concept_task(CONCEPT_TUNING_TASK, "concept_tuning"),
}


# ---------------------------------------------------------------------------------------------------------------
# MMICT's reference task setup (KDEGroup/MMICT, lavis/projects/blip2/train/mmict.yaml and lavis/models/blip2_models/
# blip2_t5.py): a caption query is prompted with an instruction (training: one of six at random per sample,
# `split_caption`, blip2_t5.py lines 124-135; evaluation: fixed, the first of the list, since the repository has no
# evaluation script to say which), a demo's text is its bare caption; both through LAVIS's caption cleaning
# (`BlipCaptionProcessor.pre_caption`, lavis/processors/blip_processors.py lines 49-70). VQA: "Question: {}Short
# answer:" (mmict.yaml, the VQA block), a demo's text the prompt followed by its answer.
# ---------------------------------------------------------------------------------------------------------------

MMICT_CAPTION_INSTRUCTIONS = {
    "video": ("A short video caption:", "A video that shows", "Write a short description for the video.",
              "Briefly describe the content of the video.",
              "Use a few words to illustrate what is happening in the video.",
              "Can you briefly explain what you see in the video?"),
    "image": ("A short image caption:", "An image that shows", "Write a short description for the image.",
              "Briefly describe the content of the image.",
              "Use a few words to illustrate what is happening in the image.",
              "Can you briefly explain what you see in the image?"),
}
_VIDEO_TASKS = ("msvd_caption", "msrvtt_caption", "msvd_qa", "msrvtt_qa")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS's `BlipCaptionProcessor.pre_caption`, verbatim in effect: lower case, the characters .!"()*#:;~ to
    spaces, runs of whitespace to one space, stripped, at most `max_words` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _mmict_video_caption_prompt(q: Example) -> str:
    return MMICT_CAPTION_INSTRUCTIONS["video"][0]


def _mmict_image_caption_prompt(q: Example) -> str:
    return MMICT_CAPTION_INSTRUCTIONS["image"][0]


def _mmict_caption_demo(d: Example) -> str:
    return clean_caption(d.answers[0])


def _mmict_vqa_prompt(q: Example) -> str:
    return f"Question: {q.question}Short answer:"


def _mmict_vqa_demo(d: Example) -> str:
    return f"Question: {d.question}Short answer:{d.answers[0]}"


def _mmict_reference(task: Task) -> Task:
    if task.style == "caption":
        video = task.name in _VIDEO_TASKS
        return replace(task, query_prompt=_mmict_video_caption_prompt if video else _mmict_image_caption_prompt,
                       demo_text=_mmict_caption_demo, train_prompts=MMICT_CAPTION_INSTRUCTIONS[
                           "video" if video else "image"], train_target=clean_caption,
                       prompt_format="mmict_reference")
    if task.style == "vqa":
        return replace(task, query_prompt=_mmict_vqa_prompt, demo_text=_mmict_vqa_demo,
                       prompt_format="mmict_reference")
    raise ValueError(f"prompt format mmict_reference (MMICT's reference setup) defines caption and VQA tasks; "
                     f"{task.name} is neither: use data.prompt_format=openflamingo")


PROMPT_FORMATS: dict[str, Callable[[Task], Task]] = {
    "openflamingo": lambda task: task,  # the table's own formats: OpenFlamingo's few-shot prompts
    "mmict_reference": _mmict_reference,
}


def get_task(name: str, prompt_format: str = "openflamingo") -> Task:
    """The task `name` with its prompts in `prompt_format` (`data.prompt_format`: training and evaluation use the
    same)."""
    if name not in TASKS:
        raise ValueError(f"unknown eval.task {name!r}; known: {sorted(TASKS)}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown data.prompt_format {prompt_format!r}; known: {list(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[prompt_format](TASKS[name])
