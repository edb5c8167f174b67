"""The evaluation loop: a trained module answers downstream queries at several shot counts.

Demos are drawn from the demo pool (the train split) by the task's selection (`selection.py`), seeded
per (seed, shots) trial so every method sees the same demos for the same query. Zero-shot is the same
prompt for every demo mode, so it is computed once per seed.

Every trial's demos are drawn before the first query runs. When the module has a demonstration bank
(`mmict.bank`, AIM with `eval.bank.enabled`), each distinct demo of all trials is read once up front, in batches,
and every trial, seed and shot count looks its demos up by id. Queries are answered in batches: one
left-padded assembly and one `generate` call (greedy or beam search with the KV cache) per batch.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from data_modules.downstream import Example
from data_modules.episodes import collate_episodes
from mmict.bank import image_source
from mmict.batch import EpisodeBatch
from mmict.eval.likelihood import class_probabilities
from mmict.eval.selection import DemoSelector, make_selector
from mmict.eval.tasks import Task, get_task
from mmict.prompts import MODE_NAMES


@dataclass
class TrialResult:
    method: str  # demo mode
    shots: int
    seed: int
    accuracy: float  # the task's metric (`Task.metric`), mean over queries
    context_tokens: float  # mean real tokens the frozen LM attends over per query
    num_queries: int
    peak_memory_mb: float | None = None  # peak accelerator memory of the trial (None on CPU: not measured)
    # per query: id, post-processed answer, raw generation (classify tasks: id, P(positive class), label)
    predictions: list[dict] | None = None


class LazyImages(Sequence):
    """Demo images read (an `Example` decodes its image on access) only when indexed: a demonstration bank that
    already holds a demo never needs its pixels."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return LazyImages(self.examples[i]) if isinstance(i, slice) else self.examples[i].image

    @classmethod
    def concat(cls, parts: Sequence[LazyImages]) -> LazyImages:
        """Several episodes' lazy demo images as one, still undecoded (`collate_episodes` flattens with it)."""
        return cls([example for part in parts for example in part.examples])


def episode_batch(queries: Sequence[Example], demos: Sequence[Sequence[Example]], task: Task,
                  lazy_demo_images: bool = False) -> EpisodeBatch:
    """The batch the training data gives (`collate_episodes`), with each demo's id and image source (what a
    demonstration bank knows it by); `lazy_demo_images` leaves demo images undecoded until read."""
    episodes = [{
        "demo_images": LazyImages(ds) if lazy_demo_images else [d.image for d in ds],
        "demo_texts": [task.demo_text(d) for d in ds],
        "query_image": q.image, "query_prompt": task.query_prompt(q), "query_target": q.answers[0],
        "source": q.id,
    } for q, ds in zip(queries, demos, strict=True)]
    demo_flat = [d for ds in demos for d in ds]
    return collate_episodes(episodes, skipped={}, demo_ids=[d.id for d in demo_flat],
                            demo_sources=[image_source(d) for d in demo_flat])


def _draw(selector: DemoSelector, queries: Sequence[Example], seed: int, k: int) -> list[list[Example]]:
    """The demos of every query in the (seed, k) trial, from one rng seeded by the trial."""
    rng = random.Random(f"{seed}-{k}")
    return [selector.select(rng, q, k) for q in queries]


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
) -> list[TrialResult]:
    """Every (seed, shots, demo mode) trial on the same queries; decoding from the task unless given.

    A "classify" task generates nothing: each query's P(positive class) comes from the log-likelihoods of the
    task's class names after its prompt (`likelihood.class_probabilities`) and is what the trial scores."""
    module.eval()
    task = get_task(task) if isinstance(task, str) else task
    max_new_tokens = max_new_tokens or task.max_new_tokens
    num_beams = num_beams or task.num_beams
    cuda = module.device.type == "cuda"
    r = dict(rices or {})
    cache_dir = r.pop("cache_dir", None)
    selector = make_selector(selection, pool, episodic=task.episodic, clip=r or None, cache_dir=cache_dir,
                             pool_name=f"{task.name}-train", progress=progress)
    selector.prepare(queries)  # RICES: every query's CLIP features in batches, once
    references = [task.reference(q) for q in queries]  # before any trial: a query without one fails now
    # k demos shown "none" would repeat the zero-shot trial: a no-demo method is scored at 0 shots only.
    shown = [m for m in demo_modes if m != "none"]
    trials = [(seed, k, mode) for seed in seeds for k in shots for mode in (["none"] if k == 0 else shown)]
    # Every trial's demos, drawn once per (seed, shots): the same for every demo mode, and known before the
    # first query runs, so a demonstration bank can read all of them in batches up front.
    plans = {(seed, k): _draw(selector, queries, seed, k) for seed, k in dict.fromkeys((s, k) for s, k, _ in trials)}
    bank = getattr(module, "bank", None)
    if bank is not None and "fused" in shown:
        build_bank(bank, [d for (_, k), ds in plans.items() if k > 0 for q_demos in ds for d in q_demos], task)
    results = []
    bar = tqdm(total=len(trials) * len(queries), desc="eval", unit="query", disable=not progress)
    for seed, k, mode in trials:
        demos = plans[(seed, k)]
        answers, ctx, records = [], [], []
        if cuda:
            torch.cuda.reset_peak_memory_stats(module.device)
        for start in range(0, len(queries), batch_size):
            q, d = queries[start : start + batch_size], demos[start : start + batch_size]
            batch = episode_batch(q, d, task, lazy_demo_images=mode == "fused" and bank is not None)
            prompts = module.batch_prompts(batch, demo_mode=mode, with_target=False)
            if task.kind == "classify":
                probs, batch_ctx = class_probabilities(module.backbone, prompts, task.classes)
                ctx += batch_ctx
                answers += probs
                key = f"p_{task.classes[0]}"
                records += [{"id": ex.id, key: p, "label": ref}
                            for p, ex, ref in zip(probs, q, references[start : start + len(q)])]
            else:
                assembled = module.backbone.assemble(prompts, padding_side="left")
                ctx += assembled.context_tokens.tolist()
                outputs = module.backbone.generate_from(assembled, max_new_tokens=max_new_tokens,
                                                        num_beams=num_beams)
                for out, ex in zip(outputs, q):
                    answers.append(task.postprocess(out))
                    records.append({"id": ex.id, "answer": answers[-1], "generation": out})
            bar.update(len(q))
        peak = torch.cuda.max_memory_allocated(module.device) / 2**20 if cuda else None
        score = task.score_trial(answers, references)
        results.append(TrialResult(mode, k, seed, score, sum(ctx) / len(ctx), len(answers), peak, records))
    bar.close()
    return results


def summary_rows(results: Sequence[TrialResult], labels: Mapping[str, str] | None = None) -> list[dict]:
    """Mean and std over seeds per (method, shots); `labels` names demo modes where a method's own differ."""
    names = {**MODE_NAMES, **(labels or {})}
    groups: dict[tuple[str, int], list[TrialResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.shots), []).append(r)
    rows = []
    for (method, k), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [r.accuracy for r in rs]
        rows.append({"method": names.get(method, method), "shots": k,
                     "accuracy_mean": statistics.fmean(accs),
                     "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "context_tokens": statistics.fmean(r.context_tokens for r in rs),
                     "peak_memory_mb": max((r.peak_memory_mb for r in rs if r.peak_memory_mb is not None),
                                           default=None),
                     "seeds": len(rs), "queries": rs[0].num_queries})
    return rows


def markdown_table(rows: Sequence[dict], chance: float | None = None, metric: str = "accuracy") -> str:
    lines = [] if chance is None else [f"Chance (answer with a random demo's word): {100 * chance:.1f}%", ""]
    lines += [f"| method | shots | {metric} (x100) | context tokens / query | seeds x queries |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        std = f" ± {100 * r['accuracy_std']:.1f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['method']} | {r['shots']} | {100 * r['accuracy_mean']:.1f}{std} | "
                     f"{r['context_tokens']:.0f} | {r['seeds']} x {r['queries']} |")
    return "\n".join(lines)


def as_dicts(results: Sequence[TrialResult]) -> list[dict]:
    return [asdict(r) for r in results]
