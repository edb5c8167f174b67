"""The evaluation loop: a trained module answers downstream queries at several shot counts.

The protocol (`protocol.py`, `eval.protocol`) decides which queries each trial seed asks, which pool its random
demos come from, how they are drawn (every method sees the same demos for the same query), what 0 shots shows,
how answers are decoded, and what happens to a trial whose prompts exceed the language model's positions (not run,
reported as "over context"). Zero-shot is the same prompt for every demo mode, so it is computed once per seed.

Every trial's demos are drawn before the first query runs. When the module has a demonstration bank
(`mmict.bank`, AIM with `eval.bank.enabled`), each distinct demo of all trials is read once up front, in batches,
and every trial, seed and shot count looks its demos up by id. Queries are answered in batches: one
left-padded assembly and one `generate` call (greedy or beam search with the KV cache) per batch.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from data_modules.downstream import Example
from data_modules.episodes import collate_episodes
from mmict.bank import image_source
from mmict.batch import DEMO_SEPARATOR, EpisodeBatch
from mmict.eval.likelihood import class_probabilities
from mmict.eval.protocol import Decoding, ResolvedProtocol, mmict_protocol
from mmict.eval.ranks import Ranks
from mmict.eval.selection import DemoSelector, make_selector
from mmict.eval.tasks import Task, get_task
from mmict.prompts import MODE_NAMES, PROMPT_MODE
from mmict.segments import Text

log = logging.getLogger(__name__)


@dataclass
class TrialResult:
    method: str  # demo mode ("zero_shot_text": OpenFlamingo's 0-shot, 2 text-only demos)
    shots: int
    seed: int
    accuracy: float | None  # the task's metric (`Task.metric`); None: not scored (over context)
    context_tokens: float  # mean real tokens the frozen LM attends over per query (NaN: not run)
    num_queries: int
    peak_memory_mb: float | None = None  # peak accelerator memory of the trial (None on CPU: not measured)
    # per query: id, post-processed answer, raw generation (classify tasks: id, P(positive class), label)
    predictions: list[dict] | None = None
    demos_shown: int = 0  # demos in each prompt (OpenFlamingo's 0-shot shows 2, as text)
    # "ok", or "over_context": the longest prompt plus the answer's tokens exceeds the LM's positions
    status: str = "ok"
    max_context_tokens: int | None = None  # the longest prompt of the trial plus the answer's tokens
    model_max_positions: int | None = None  # the LM's usable positions (None: no hard limit)
    metrics: dict[str, float] = field(default_factory=dict)  # corpus metrics beside the headline (captions)
    query_ids: list[str] | None = None  # the trial's queries, in the order their demos were drawn
    # what its queries and its demo pool lost: {"queries": {reason: n}, "pool": {reason: n}}; empty: nothing
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    # wall time per query: its batches' times (prompts, assembly, bank lookups, generation), summed over the ranks
    # that ran them, over the trial's queries (None: not run). The bank's build, done once before all trials, is not
    # in it (bank.stats says what it read); a timing, so it varies run to run
    ms_per_query: float | None = None


class LazyImages(Sequence):
    """Demo images read (an `Example` decodes its image on access) only when indexed: a demonstration bank that
    already holds a demo never needs its pixels."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)  # each decodes with its own transform (a demo at base view: that view's)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return LazyImages(self.examples[i]) if isinstance(i, slice) else self.examples[i].image

    @classmethod
    def concat(cls, parts: Sequence[LazyImages]) -> LazyImages:
        """Several episodes' lazy demo images as one, still undecoded (`collate_episodes` flattens with it)."""
        return cls([example for part in parts for example in part.examples])


def episode_batch(queries: Sequence[Example], demos: Sequence[Sequence[Example]], task: Task,
                  lazy_demo_images: bool = False, demo_separator: str = DEMO_SEPARATOR,
                  image_of: Callable[[Example], Any] | None = None) -> EpisodeBatch:
    """The batch the training data gives (`collate_episodes`), with each demo's id and image source (what a
    demonstration bank knows it by); `lazy_demo_images` leaves demo images undecoded until read; `image_of`
    replaces every image by what it gives (a dry run counts tokens with stand-ins)."""
    def demo_images(ds: Sequence[Example]) -> Sequence:
        if image_of is not None:
            return [image_of(d) for d in ds]
        return LazyImages(ds) if lazy_demo_images else [d.image for d in ds]

    episodes = [{
        "demo_images": demo_images(ds),
        "demo_texts": [task.demo_text(d) for d in ds],
        "query_image": q.image if image_of is None else image_of(q), "query_prompt": task.query_prompt(q),
        "query_target": q.answers[0], "source": q.id,
    } for q, ds in zip(queries, demos, strict=True)]
    demo_flat = [d for ds in demos for d in ds]
    return collate_episodes(episodes, skipped={}, demo_ids=[d.id for d in demo_flat],
                            demo_sources=[image_source(d) for d in demo_flat], demo_separator=demo_separator)


@dataclass(frozen=True)
class SeedPlan:
    """One trial seed's queries (in the order their demos are drawn) and the pool its random demos come from."""

    queries: list[Example]
    pool: list[Example]
    # skipped examples by reason, of the queries drawn ("queries") and of the demo pool ("pool"); empty: none
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)


def build_bank(bank, demos: Sequence[Example], task: Task) -> int:
    """Put every distinct demo of the evaluation in the bank (batched, with a progress bar); how many were read."""
    unique = list({d.id: d for d in demos}.values())
    if not unique:
        return 0
    return bank.build([d.id for d in unique], LazyImages(unique), [task.demo_text(d) for d in unique],
                      sources=[image_source(d) for d in unique], desc=f"demo bank ({task.name})")


def chance_rate(queries: Sequence[Example], selector: DemoSelector) -> float | None:
    """Accuracy of "answer with a demo's word" on an episodic task (1/N for N-way episodes), else None."""
    if not selector.episodic:
        return None
    return sum(1 / selector.classes(q) for q in queries) / len(queries)


def trial_modes(k: int, shown: Sequence[str], protocol: ResolvedProtocol) -> list[str]:
    """The demo modes evaluated at `k` shots. At 0 shots: the protocol's zero-shot (no demos, and/or
    OpenFlamingo's 2 text-only demos: utils.compute_effective_num_shots); k demos shown "none" would repeat the
    zero-shot trial, so a no-demo method is scored at 0 shots only."""
    if k > 0:
        return list(shown)
    return {"none": ["none"], "text_demos": ["zero_shot_text"], "both": ["none", "zero_shot_text"]}[protocol.zero_shot]


def demos_shown(k: int, mode: str, protocol: ResolvedProtocol) -> int:
    return protocol.zero_shot_text_demos if mode == "zero_shot_text" else (0 if mode == "none" else k)


class _ImageStandIn:
    """An example's image in a dry-run prompt: counted (once per example and view), never given to a model."""

    def __init__(self, example: Example) -> None:
        self.example = example


class ContextCounter:
    """Exact prompt lengths (tokens after image expansion) of a trial's prompts, before anything runs: the
    module builds its prompts with stand-in images, the backbone counts their tokens, each distinct image's token
    count is computed once."""

    def __init__(self, module) -> None:
        self.module, self.backbone = module, module.backbone
        self._image_tokens: dict[tuple[str, int], int] = {}

    def image_tokens(self, stand_in: _ImageStandIn) -> int:
        ex = stand_in.example
        key = (ex.id, id(ex.transform))  # a demo at the base view is another image than the same one at full view
        if key not in self._image_tokens:
            image = ex.image
            if isinstance(image, list):  # a video's frames
                self._image_tokens[key] = sum(self.backbone.image_token_count(f) for f in image)
            else:
                self._image_tokens[key] = self.backbone.image_token_count(image)
        return self._image_tokens[key]

    def lengths(self, queries: Sequence[Example], demos: Sequence[Sequence[Example]], task: Task, mode: str,
                separator: str) -> list[int]:
        batch = episode_batch(queries, demos, task, demo_separator=separator, image_of=_ImageStandIn)
        prompts = self.module.batch_prompts(batch, demo_mode=PROMPT_MODE.get(mode, mode), with_target=False)
        if task.kind == "classify":  # each class name is scored inside the prompt (likelihood.py): the longest
            count = self.backbone.count_tokens
            return [max(count([*p, Text(c, target=True, eos=False)], image_tokens=self.image_tokens)
                        for c in task.classes) for p in prompts]
        return [self.backbone.count_tokens(p, image_tokens=self.image_tokens) for p in prompts]


def answer_tokens(module, task: Task, protocol: ResolvedProtocol) -> int:
    """The tokens a query adds after its measured prompt: the generation budget, or the longest class name
    tokenised alone (classify: measured prompts exclude it; `ContextCounter.lengths` counts it in context)."""
    if task.kind == "classify":
        return max(len(ids) for ids in module.backbone.tokenize(list(task.classes)))
    return protocol.decoding.max_new_tokens


@torch.no_grad()
def evaluate(
    module,
    queries: Sequence[Example],
    pool: Sequence[Example],
    *,
    shots: Sequence[int],
    seeds: Sequence[int],
    demo_modes: Sequence[str],
    task: str | Task = "toy_vqa",
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    selection: str = "random",
    rices: dict | None = None,
    progress: bool = True,
    protocol: ResolvedProtocol | None = None,
    plans: Mapping[int, SeedPlan] | None = None,
    ranks: Ranks | None = None,
) -> list[TrialResult]:
    """Every (seed, shots, demo mode) trial; the protocol (`mmict.eval.protocol`) says how queries and demos are
    drawn, what 0 shots shows, how answers are decoded and what a prompt past the LM's positions gets.

    `plans` gives each seed's queries and demo pool (the protocol's subsets, made by the runner); without it every
    seed asks `queries` with demos from `pool`. Without `protocol`, the `mmict` protocol with the task's decoding
    (or `max_new_tokens` / `num_beams`).

    A "classify" task generates nothing: each query's P(positive class) comes from the log-likelihoods of the
    task's class names after its prompt (`likelihood.class_probabilities`) and is what the trial scores.

    Over several processes (`ranks`; default: the initialised process group's, `mmict.eval.ranks`) every rank draws
    every trial and runs the batches dealt to it; rank 0 scores the gathered answers, and every rank returns its
    results, identical to one process's."""
    module.eval()
    ranks = ranks or Ranks.current(module.device)
    task = get_task(task) if isinstance(task, str) else task
    if protocol is None:
        protocol = mmict_protocol(decoding=None if task.kind == "classify" else Decoding(
            num_beams or task.num_beams, max_new_tokens or task.max_new_tokens, None))
    plans = dict(plans) if plans is not None else {seed: SeedPlan(list(queries), list(pool)) for seed in seeds}
    cuda = module.device.type == "cuda"
    r = dict(rices or {})
    cache_dir = r.pop("cache_dir", None)
    all_queries = list({q.id: q for plan in plans.values() for q in plan.queries}.values())
    # RICES searches the whole train split (OpenFlamingo's RICES(train_dataset), evaluate.py lines 985-992); random
    # demos come from each seed's pool.
    if selection == "rices":
        shared = make_selector(selection, pool, episodic=task.episodic, clip=r or None, cache_dir=cache_dir,
                               pool_name=f"{task.name}-train", progress=progress)
        # every query's CLIP features in batches, once: rank 0 first, the others then read its feature cache
        ranks.main_first(lambda: shared.prepare(all_queries))
        selectors = {seed: shared for seed in plans}
    else:
        selectors = {seed: make_selector(selection, plans[seed].pool, episodic=task.episodic) for seed in plans}
    references = {q.id: task.reference(q) for q in all_queries}  # before any trial: a query without one fails now
    shown = [m for m in demo_modes if m != "none"]
    trials = [(seed, k, mode) for seed in seeds for k in shots for mode in trial_modes(k, shown, protocol)]
    # Every trial's demos, drawn once per (seed, shown count): the same for every demo mode, and known before the
    # first query runs, so a demonstration bank can read all of them in batches up front.
    draws: dict[tuple[int, int, int], list[list[Example]]] = {}
    for seed, k, mode in trials:
        n = demos_shown(k, mode, protocol)
        if (seed, k, n) not in draws:
            rng = protocol.trial_rng(seed, k)
            draws[(seed, k, n)] = [selectors[seed].select(rng, q, n) for q in plans[seed].queries]
    bank = getattr(module, "bank", None)
    if bank is not None and "fused" in shown:  # built by rank 0; the other ranks then load what it stored
        bank_demos = [d for (_, k, n), ds in draws.items() if k > 0 for q_demos in ds for d in q_demos]
        ranks.main_first(lambda: build_bank(bank, bank_demos, task))
    limit = module.backbone.max_positions
    counter = ContextCounter(module)
    answer_len = answer_tokens(module, task, protocol)
    results = []
    bar = tqdm(total=sum(len(plans[s].queries) for s, _, _ in trials), desc="eval", unit="query",
               disable=not progress or not ranks.main)
    for seed, k, mode in trials:
        qs = plans[seed].queries
        demos = draws[(seed, k, demos_shown(k, mode, protocol))]
        prompt_mode = PROMPT_MODE.get(mode, mode)
        base = dict(method=mode, shots=k, seed=seed, num_queries=len(qs), demos_shown=demos_shown(k, mode, protocol),
                    model_max_positions=limit, query_ids=[q.id for q in qs], skipped=plans[seed].skipped)
        if limit is not None and prompt_mode in getattr(module, "preflight_modes", ()):
            longest = max(counter.lengths(qs, demos, task, mode, protocol.demo_separator)) + (
                0 if task.kind == "classify" else answer_len)
            if longest > limit and protocol.over_context == "skip":
                say = log.warning if ranks.main else log.debug  # said once, by rank 0
                say("%s at %d shots (seed %d): the longest prompt needs %d positions, the language model has %d: not "
                    "run, reported as over context (eval.over_context=run scores it anyway, flagged)",
                    MODE_NAMES.get(mode, mode), k, seed, longest, limit)
                results.append(TrialResult(**base, accuracy=None, context_tokens=math.nan, status="over_context",
                                           max_context_tokens=longest))
                bar.update(len(qs))
                continue
        if cuda:
            torch.cuda.reset_peak_memory_stats(module.device)
        done: dict[int, tuple[list, list, list, float]] = {}  # batch -> answers, context tokens, records, seconds
        for b in ranks.mine(math.ceil(len(qs) / batch_size)):  # whole batches, as one process runs them
            start, started = b * batch_size, time.perf_counter()
            answers, ctx, records = [], [], []
            q, d = qs[start : start + batch_size], demos[start : start + batch_size]
            batch = episode_batch(q, d, task, lazy_demo_images=mode == "fused" and bank is not None,
                                  demo_separator=protocol.demo_separator)
            prompts = module.batch_prompts(batch, demo_mode=prompt_mode, with_target=False)
            if task.kind == "classify":
                probs, batch_ctx = class_probabilities(module.backbone, prompts, task.classes)
                ctx += batch_ctx
                answers += probs
                key = f"p_{task.classes[0]}"
                records += [{"id": ex.id, key: p, "label": references[ex.id]} for p, ex in zip(probs, q)]
            else:
                assembled = module.backbone.assemble(prompts, padding_side="left")
                ctx += assembled.context_tokens.tolist()
                outputs = module.backbone.generate_from(assembled, **protocol.decoding.generate_kwargs())
                for out, ex in zip(outputs, q):
                    answers.append(task.postprocess(out))
                    # the reference beside the answer, so a score can be checked by hand from results.json alone
                    records.append({"id": ex.id, "answer": answers[-1], "generation": out,
                                    "reference": references[ex.id]})
            # the answers are on the CPU by now (decoded strings, probabilities): the time includes the device's work
            done[b] = (answers, ctx, records, time.perf_counter() - started)
            bar.update(len(q))
        peak = torch.cuda.max_memory_allocated(module.device) / 2**20 if cuda else None
        gathered = ranks.gather((done, peak))
        bar.update(len(qs) - sum(len(r[2]) for r in done.values()))  # the other ranks' queries
        if not ranks.main:  # rank 0 scores; its results reach every rank at the end
            continue
        merged = {b: out for part, _ in gathered for b, out in part.items()}
        answers, ctx, records = ([x for b in sorted(merged) for x in merged[b][i]] for i in range(3))
        seconds = sum(out[3] for out in merged.values())
        peak = max((p for _, p in gathered if p is not None), default=None)
        longest = int(max(ctx)) + answer_len
        over = limit is not None and longest > limit
        if over:  # measured as it ran (prompts made by a model: fused tokens, M-Hub features)
            log.warning("%s at %d shots (seed %d): the longest prompt needed %d positions, the language model has %d: "
                        "%s", MODE_NAMES.get(mode, mode), k, seed, longest, limit,
                        "scored but flagged (eval.over_context=run)" if protocol.over_context == "run"
                        else "its score is not reported")
        score, metrics = (None, {}) if over and protocol.over_context == "skip" else task.score_trial(
            answers, [references[ex.id] for ex in qs])
        results.append(TrialResult(**base, accuracy=score, context_tokens=sum(ctx) / len(ctx), peak_memory_mb=peak,
                                   predictions=records, status="over_context" if over else "ok",
                                   max_context_tokens=longest, metrics=metrics,
                                   ms_per_query=1000 * seconds / len(qs)))
    bar.close()
    return ranks.broadcast(results)


def summary_rows(results: Sequence[TrialResult], labels: Mapping[str, str] | None = None,
                 protocol: ResolvedProtocol | None = None) -> list[dict]:
    """Mean and spread over seeds per (method, shots), as the protocol averages trials (default: `mmict`'s sample
    std); `labels` names demo modes where a method's own differ.

    A row with an over-context trial has status "over_context": under eval.over_context=skip it has no score (its
    mean would be over the trials that happened to fit), under "run" its score is kept but flagged."""
    protocol = protocol or mmict_protocol()
    names = {**MODE_NAMES, **(labels or {})}
    groups: dict[tuple[str, int], list[TrialResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.shots), []).append(r)
    rows = []
    for (method, k), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        over = any(r.status == "over_context" for r in rs)
        scores = [r.accuracy for r in rs]
        mean, spread = protocol.mean_and_spread(scores)
        if over and protocol.over_context == "skip":
            mean, spread = None, math.nan
        metric_names = list(dict.fromkeys(name for r in rs for name in r.metrics))
        ran = [r for r in rs if not math.isnan(r.context_tokens)]
        timed = [r.ms_per_query for r in ran if r.ms_per_query is not None]
        rows.append({"method": names.get(method, method), "mode": method, "shots": k,
                     "demos_shown": rs[0].demos_shown,
                     "accuracy_mean": mean, "accuracy_std": spread, "spread": protocol.spread,
                     "status": "over_context" if over else "ok",
                     "metrics": {name: protocol.mean_and_spread([r.metrics.get(name) for r in rs])[0]
                                 for name in metric_names},
                     "context_tokens": statistics.fmean(r.context_tokens for r in ran) if ran else None,
                     "max_context_tokens": max((r.max_context_tokens for r in rs if r.max_context_tokens is not None),
                                               default=None),
                     "model_max_positions": rs[0].model_max_positions,
                     "peak_memory_mb": max((r.peak_memory_mb for r in rs if r.peak_memory_mb is not None),
                                           default=None),
                     "ms_per_query": statistics.fmean(timed) if timed else None,
                     "seeds": len(rs), "queries": rs[0].num_queries})
    return rows


def comparable(row: Mapping[str, Any]) -> bool:
    """Whether a row's score can stand next to others: scored, and every trial within the LM's positions."""
    return row.get("status", "ok") == "ok" and row.get("accuracy_mean") is not None


def _cell(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown_table(rows: Sequence[dict], chance: float | None = None, metric: str = "accuracy") -> str:
    """The results table: the headline metric (x100, ± the protocol's spread over seeds), any further corpus metrics
    (captions: BLEU-4, METEOR, ROUGE-L), context tokens; an over-context row says so instead of a score."""
    lines = [] if chance is None else [
        f"Chance (1 / the episode's classes: a random demo's answer): {100 * chance:.1f}%", ""]
    extra = list(dict.fromkeys(name for r in rows for name in r.get("metrics", {}) if name.lower() != metric.lower()))
    lines += [f"| method | shots | {metric} (x100) | " + "".join(f"{name} (x100) | " for name in extra)
              + "context tokens / query | ms / query | seeds x queries |",
              "|---|---:|---:|" + "---:|" * len(extra) + "---:|---:|---:|"]
    for r in rows:
        std = f" ± {100 * r['accuracy_std']:.1f}" if r["seeds"] > 1 and r["accuracy_mean"] is not None else ""
        score = f"{_cell(r['accuracy_mean'])}{std}"
        if r.get("status", "ok") == "over_context":
            need = f"needs {r['max_context_tokens']} of {r['model_max_positions']} positions"
            score = f"over context ({need})" if r["accuracy_mean"] is None else f"{score} (over context: {need})"
        extras = "".join(f"{_cell(r.get('metrics', {}).get(name))} | " for name in extra)
        ctx = "not run" if r.get("context_tokens") is None else f"{r['context_tokens']:.0f}"
        ms = "-" if r.get("ms_per_query") is None else f"{r['ms_per_query']:.1f}"
        size = f"{r['seeds']} x {r['queries']}"
        lines.append(f"| {r['method']} | {r['shots']} | {score} | {extras}{ctx} | {ms} | {size} |")
    return "\n".join(lines)


def as_dicts(results: Sequence[TrialResult]) -> list[dict]:
    return [asdict(r) for r in results]
