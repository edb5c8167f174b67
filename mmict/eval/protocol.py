"""Evaluation protocols: named presets that pin every setting that moves a number.

A published few-shot number is only comparable to another made the same way: which examples are asked, which
demos they see, what "0-shot" shows, how answers are decoded and cut, and how trials are averaged. `eval.protocol`
names a preset; `resolve` turns it, the task and any `eval.*` the user set into a `ResolvedProtocol` that the loop
follows and results.json records setting by setting. A user setting that departs from the preset is kept (never
silently overridden) and named: the protocol is then reported as e.g. "openflamingo (modified: num_beams=1)".

- `openflamingo` reproduces OpenFlamingo's evaluation harness (mlfoundations/open_flamingo, open_flamingo/eval/,
  commit 655f693), point by point; the references are in the comments below and in docs/evaluation.md.
- `mmict_reference` follows MMICT's reference code (KDEGroup/MMICT, lavis/projects/blip2/train/mmict.yaml): its
  prompt format (`data.prompt_format: mmict_reference`), 5 beams, captions 8-30 tokens, VQA 1-10, every test example.
- `mmict` is this framework's own earlier protocol (greedy short answers, the first N queries in file order, the
  whole train split as demo pool, no demos at 0 shots, sample std over seeds). Kept for continuity with earlier
  runs and for the toy world; its differences from the harness are listed in docs/evaluation.md.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

PROTOCOL_NAMES = ("openflamingo", "mmict", "mmict_reference")
ZERO_SHOT_MODES = ("text_demos", "none", "both")
ZeroShot = Literal["text_demos", "none", "both"]
OVER_CONTEXT = ("skip", "run")
VQA_SCORINGS = ("official", "openflamingo")
# Tasks whose answers OpenFlamingo's harness reads from files without answer ids (vqa_scoring=openflamingo applies)
ID_LESS_VQA_TASKS = ("vizwiz", "textvqa")
DEMO_IMAGE_VIEWS = ("full", "base")


@dataclass(frozen=True)
class Decoding:
    num_beams: int
    max_new_tokens: int
    # None: the model's generation_config decides (transformers' default 1.0); 0.0: beams ranked by their summed
    # log-probability, as OpenFlamingo's evaluate_vqa / evaluate_captioning pass it (evaluate.py lines 731-735,
    # 903-907).
    length_penalty: float | None
    min_new_tokens: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        if self.length_penalty is not None:
            kwargs["length_penalty"] = self.length_penalty
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        return kwargs


@dataclass(frozen=True)
class ResolvedProtocol:
    """Every setting of one evaluation that moves a number, as the loop applies it (results.json: `protocol`)."""

    name: str  # the preset
    zero_shot: ZeroShot  # "text_demos": OpenFlamingo's 0-shot (2 text-only demos); "none": no demos; "both"
    zero_shot_text_demos: int  # how many text-only demos OpenFlamingo's 0-shot shows
    decoding: Decoding | None  # None for classify tasks (no generation)
    demo_pool_size: int | None  # random demos come from a fixed subset of this many train examples per trial
    query_subset: Literal["seeded", "first"]  # a seeded random subset per trial, or the first N in file order
    num_queries: int | None  # None: every test example
    rices_model: str | None  # open_clip model and weights of RICES (None: RICES not used)
    rices_pretrained: str | None
    spread: Literal["population", "sample"]  # std over trials: np.nanstd (ddof=0) or statistics.stdev (ddof=1)
    demo_separator: str  # after each demo's text
    caption_pool: Literal["train", "train+restval"]  # Karpathy splits the caption demo pool holds
    prompt_format: str  # the tasks' prompt formats (data.prompt_format; mmict.eval.tasks.PROMPT_FORMATS)
    demo_image_view: Literal["full", "base"]  # demo images at the model's full view, or base view only
    over_context: Literal["skip", "run"]  # a trial whose longest prompt exceeds the LM's positions
    # VQA accuracy's leave-one-out: "official" (by position) or "openflamingo" (VizWiz / TextVQA: equal answers left
    # out together, as OpenFlamingo's id-less files make its vqaEval do; other tasks have ids: the same either way)
    vqa_scoring: str
    overrides: dict[str, Any] = field(default_factory=dict)  # the user's departures from the preset

    @property
    def label(self) -> str:
        """The protocol as tables name it: its preset, and what the user changed."""
        if not self.overrides:
            return self.name
        return f"{self.name} (modified: {', '.join(f'{k}={v}' for k, v in self.overrides.items())})"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        return d

    # ---- how trials draw their queries and demos ----------------------------------------------------------------
    def trial_rng(self, seed: int, shots: int) -> random.Random:
        """The generator a (seed, shots) trial draws its random demos from.

        openflamingo: `utils.random_seed(seed, rank)` (utils.py line 8-11; rank 0) before the trial's batches, then
        `random.sample(query_set, k)` per query (utils.py line 38): `random.Random(seed)`, whatever the shot count.
        mmict: one generator per (seed, shots)."""
        return random.Random(seed) if self.name == "openflamingo" else random.Random(f"{seed}-{shots}")

    def subsets(self, seed: int, num_test: int, num_pool: int, random_demos: bool) -> tuple[list[int], list[int]]:
        """(query positions in the order demos are drawn for them, demo pool positions) of one trial seed.

        openflamingo (evaluate.py evaluate_vqa lines 977-994, evaluate_captioning 788-806): `np.random.seed(seed)`,
        then `prepare_eval_samples` picks `num_samples` test indices with `np.random.choice(..., replace=False)`
        (utils.py line 53) and, without RICES, `get_query_set` picks `query_set_size` train indices from the same
        stream (utils.py line 45). The test subset then goes through a `DistributedSampler` (shuffle, seed 0, epoch 0:
        `torch.randperm` with a generator seeded 0, utils.py line 55) which orders the queries, and so which query gets
        which draw of the per-trial `random` stream. One process (rank 0, world size 1) reproduces it exactly.
        mmict: the first `num_queries` examples in file order, the whole pool."""
        n_queries = num_test if self.num_queries is None else min(self.num_queries, num_test)
        if self.query_subset == "first":
            queries = list(range(n_queries))
            pool = list(range(num_pool))
            if random_demos and self.demo_pool_size is not None and self.demo_pool_size < num_pool:
                pool = sorted(random.Random(f"pool-{seed}").sample(pool, self.demo_pool_size))
            return queries, pool
        state = np.random.RandomState(seed)  # = np.random.seed(seed) on the global legacy generator
        chosen = state.choice(num_test, n_queries, replace=False)
        pool = list(range(num_pool))
        if random_demos and self.demo_pool_size is not None:
            if self.demo_pool_size > num_pool:
                raise ValueError(f"the {self.name} protocol draws demos from {self.demo_pool_size} train examples, "
                                 f"the pool has {num_pool}: set eval.demo_pool_size={num_pool} (recorded as a "
                                 "departure from the protocol) or convert the full train split")
            pool = [int(i) for i in state.choice(num_pool, self.demo_pool_size, replace=False)]
        order = torch.randperm(n_queries, generator=torch.Generator().manual_seed(0)).tolist()
        return [int(chosen[i]) for i in order], pool

    # ---- averaging trials -----------------------------------------------------------------------------------------
    def mean_and_spread(self, scores: Sequence[float | None]) -> tuple[float | None, float]:
        """openflamingo: np.nanmean / np.nanstd over trials (evaluate.py lines 444-450, the same for every task): NaN
        trials skipped, population std. mmict: statistics.fmean / statistics.stdev (sample std; 0 for one trial).
        Trials without a score (None: over context) are left out either way."""
        values = [s for s in scores if s is not None and not math.isnan(s)]
        if not values:
            return None, math.nan
        if self.spread == "population":
            return float(np.mean(values)), float(np.std(values))
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# OpenFlamingo's decoding per task family: evaluate_vqa(num_beams=3, length_penalty=0.0, max_generation_length=5)
# (evaluate.py lines 903-907), TextVQA max_generation_length=10 (line 621), evaluate_captioning(num_beams=3,
# length_penalty=0.0, max_generation_length=20) (lines 731-735).
_OPENFLAMINGO_MAX_NEW_TOKENS = {"vqa": 5, "caption": 20}
_OPENFLAMINGO_TASK_MAX_NEW_TOKENS = {"textvqa": 10}

PRESETS: dict[str, dict[str, Any]] = {
    "openflamingo": {
        "zero_shot": "text_demos",  # utils.compute_effective_num_shots (utils.py lines 24-31)
        "zero_shot_text_demos": 2,
        "demo_pool_size": 2048,  # --query_set_size default (evaluate.py line 73)
        "query_subset": "seeded",
        "rices_model": "ViT-L-14", "rices_pretrained": "openai",  # --rices_vision_encoder_* (evaluate.py 93-103)
        "spread": "population",
        "caption_pool": "train",  # CaptionDataset(is_train=True): split == "train" only (eval_datasets.py line 29)
        # OpenFlamingo's VizWiz and TextVQA files carry no answer ids, so its vqaEval leaves out every answer equal
        # to the one left out (vqa_metric.py lines 421-423): reproduced for those tasks
        # (metrics.vqa_accuracy_openflamingo)
        "vqa_scoring": "openflamingo",
    },
    "mmict": {
        "zero_shot": "none",
        "zero_shot_text_demos": 2,
        "demo_pool_size": None,
        "query_subset": "first",
        "rices_model": "ViT-B-32", "rices_pretrained": "openai",
        "spread": "sample",
        "caption_pool": "train+restval",
        "vqa_scoring": "official",  # one answer left out by position, as the official VQA code and lmms-eval
        "prompt_format": "openflamingo",
    },
}
PRESETS["openflamingo"]["prompt_format"] = "openflamingo"  # the prompt format each protocol's numbers are made with
# KDEGroup/MMICT: no OpenFlamingo 0-shot, no RICES, the whole test split (eval.num_queries: null in its experiments),
# one answer left out by position: `mmict`'s settings, with MMICT's prompts and decoding (below).
PRESETS["mmict_reference"] = {**PRESETS["mmict"], "prompt_format": "mmict_reference"}

# MMICT's reference decoding (mmict.yaml `run`: num_beams 5; captions max_len 30, min_len 8; VQA max_len 10,
# min_len 1), passed to generate as max_new_tokens=max_len, min_length=min_len, length_penalty=1.0 (blip2_t5.py
# generate, lines 348-359 and 445-458). HF's min_length counts the decoder's start token for an encoder-decoder LM
# (Flan-T5), and only new tokens for a decoder-only one given input embeddings (OPT) in the reference's pinned
# transformers 4.33.2 (requirements.txt): translated to min_new_tokens, which means the same in every version.
_MMICT_REFERENCE_DECODING = {"caption": (5, 30, 8), "vqa": (5, 10, 1)}


def end_of_chunk(tokenizer: Any) -> str:
    """OpenFlamingo's `<|endofchunk|>` where the model's tokenizer has it (OpenFlamingo checkpoints), else nothing:
    other models were not trained with a chunk delimiter, and their EOS mid-prompt would say the document ended."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return "<|endofchunk|>" if "<|endofchunk|>" in vocab else ""


def demo_separator(name: str, task_style: str, eoc: str) -> str:
    """What follows a demo's text. openflamingo: get_vqa_prompt / get_caption_prompt end a demo with <|endofchunk|>
    (models/open_flamingo.py lines 324-328) and evaluate_vqa / evaluate_captioning add "\\n" (evaluate.py lines
    1018-1024, 830-834); evaluate_classification joins demos with nothing after <|endofchunk|> (line 1225).
    mmict: one space, so word-level text does not glue."""
    if name != "openflamingo":
        return " "
    return eoc if task_style == "classify" else eoc + "\n"


def resolve(ev: Any, task: Any, *, selection: str, eoc: str = "", prompt_format: str = "openflamingo",
            encoder_decoder: bool = False) -> ResolvedProtocol:
    """The protocol of `ev` (the `eval` config) for `task` (an `mmict.eval.tasks.Task`).

    A setting left unset (None) takes the preset's value; one set to something else is applied and named in
    `overrides`."""
    name = ev.protocol
    if name not in PRESETS:
        raise ValueError(f"unknown eval.protocol {name!r}; known: {list(PRESETS)}")
    preset = PRESETS[name]
    overrides: dict[str, Any] = {}

    def pick(key: str, user: Any, default: Any) -> Any:
        if user is None or user == default:
            return default
        overrides[key] = user
        return user

    if task.kind == "generate":
        if name == "mmict_reference":
            beams, max_len, min_len = _MMICT_REFERENCE_DECODING["caption" if task.style == "caption" else "vqa"]
            default = Decoding(beams, max_len, 1.0, min_new_tokens=min_len - 1 if encoder_decoder else min_len)
        elif name == "openflamingo":
            style = "caption" if task.style == "caption" else "vqa"
            default = Decoding(3, _OPENFLAMINGO_TASK_MAX_NEW_TOKENS.get(task.name, _OPENFLAMINGO_MAX_NEW_TOKENS[style]),
                               0.0)
            if task.name not in _OPENFLAMINGO_TASK_MAX_NEW_TOKENS and task.style not in ("vqa", "caption"):
                default = replace(default, max_new_tokens=task.max_new_tokens)  # toy / video tasks: their own length
        else:
            default = Decoding(task.num_beams, task.max_new_tokens, None)
        decoding = Decoding(
            pick("num_beams", ev.num_beams, default.num_beams),
            pick("max_new_tokens", ev.max_new_tokens, default.max_new_tokens),
            pick("length_penalty", ev.length_penalty, default.length_penalty),
            pick("min_new_tokens", getattr(ev, "min_new_tokens", None), default.min_new_tokens),
        )
    else:
        decoding = None
    rices = selection == "rices"
    return ResolvedProtocol(
        name=name,
        zero_shot=pick("zero_shot", ev.zero_shot, preset["zero_shot"]),
        zero_shot_text_demos=preset["zero_shot_text_demos"],
        decoding=decoding,
        demo_pool_size=None if rices or task.episodic else pick("demo_pool_size", ev.demo_pool_size,
                                                                  preset["demo_pool_size"]),
        query_subset=preset["query_subset"],
        num_queries=ev.num_queries,
        rices_model=pick("rices.model", ev.rices.model, preset["rices_model"]) if rices else None,
        rices_pretrained=pick("rices.pretrained", ev.rices.pretrained, preset["rices_pretrained"]) if rices else None,
        spread=preset["spread"],
        demo_separator=demo_separator(name, task.kind if task.kind == "classify" else task.style, eoc),
        caption_pool=preset["caption_pool"],
        prompt_format=pick("prompt_format", None if prompt_format == preset["prompt_format"] else prompt_format,
                           preset["prompt_format"]),
        demo_image_view=ev.demo_image_view,
        over_context=ev.over_context,
        vqa_scoring=pick("vqa_scoring", getattr(ev, "vqa_scoring", None), preset["vqa_scoring"]),
        overrides=overrides,
    )


def mmict_protocol(**changes: Any) -> ResolvedProtocol:
    """The `mmict` preset for a generate task with the given decoding (tests and direct `evaluate` calls)."""
    base = ResolvedProtocol(
        name="mmict", zero_shot="none", zero_shot_text_demos=2, decoding=None, demo_pool_size=None,
        query_subset="first", num_queries=None, rices_model=None, rices_pretrained=None, spread="sample",
        demo_separator=" ", caption_pool="train+restval", prompt_format="openflamingo", demo_image_view="full",
        over_context="skip",
        vqa_scoring="official")
    return replace(base, **changes)
