"""The evaluation loop: a trained module answers downstream queries at several shot counts.

Demos are drawn at random from the demo pool (the train split), seeded per (seed, shots) trial so
every method sees the same demos for the same query. Zero-shot is the same prompt for every demo
mode, so it is computed once per seed.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from data_modules.downstream import Example
from data_modules.toy_world import vqa_demo_text, vqa_prompt
from mmict.eval.metrics import exact_match, postprocess_vqa

MODE_NAMES = {"none": "zero-shot", "fused": "AIM (fused tokens)", "images": "vanilla ICL (images+text)",
              "text": "text-only demos"}


@dataclass
class TrialResult:
    method: str  # demo mode
    shots: int
    seed: int
    accuracy: float
    context_tokens: float  # mean real tokens the frozen LM attends over per query
    num_queries: int


def episode_batch(queries: Sequence[Example], demos: Sequence[Sequence[Example]]) -> dict:
    """The same batch layout the training data uses (`collate_episodes`)."""
    demo_flat = [d for ds in demos for d in ds]
    return {
        "demo_images": torch.stack([d.image for d in demo_flat]) if demo_flat else torch.empty(0),
        "demo_texts": [vqa_demo_text(d.question, d.answers[0]) for d in demo_flat],
        "demo_counts": [len(ds) for ds in demos],
        "query_images": torch.stack([q.image for q in queries]),
        "query_prompts": [vqa_prompt(q.question) for q in queries],
        "query_targets": [q.answers[0] for q in queries],
    }


@torch.no_grad()
def evaluate(
    module,
    queries: Sequence[Example],
    pool: Sequence[Example],
    *,
    shots: Sequence[int],
    seeds: Sequence[int],
    demo_modes: Sequence[str],
    batch_size: int = 32,
    max_new_tokens: int = 4,
    progress: bool = True,
) -> list[TrialResult]:
    module.eval()
    trials = [(seed, k, mode) for seed in seeds for k in shots for mode in (["none"] if k == 0 else demo_modes)]
    results = []
    bar = tqdm(total=len(trials) * len(queries), desc="eval", unit="query", disable=not progress)
    for seed, k, mode in trials:
        if k > len(pool):
            raise ValueError(f"{k} shots asked but the demo pool has only {len(pool)} examples")
        rng = random.Random(f"{seed}-{k}")
        demos = [rng.sample(list(pool), k) for _ in queries]
        scores, ctx = [], []
        for start in range(0, len(queries), batch_size):
            q, d = queries[start : start + batch_size], demos[start : start + batch_size]
            batch = episode_batch(q, d)
            batch = {key: v.to(module.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            prompts = module.batch_prompts(batch, demo_mode=mode, with_target=False)
            assembled = module.backbone.assemble(prompts, padding_side="left")
            ctx += assembled.context_tokens.tolist()
            outputs = module.backbone.generate_from(assembled, max_new_tokens=max_new_tokens)
            scores += [exact_match(postprocess_vqa(o), ex.answers) for o, ex in zip(outputs, q)]
            bar.update(len(q))
        results.append(TrialResult(mode, k, seed, sum(scores) / len(scores), sum(ctx) / len(ctx), len(scores)))
    bar.close()
    return results


def summary_rows(results: Sequence[TrialResult]) -> list[dict]:
    """Mean and std over seeds per (method, shots)."""
    groups: dict[tuple[str, int], list[TrialResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.shots), []).append(r)
    rows = []
    for (method, k), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [r.accuracy for r in rs]
        rows.append({"method": MODE_NAMES.get(method, method), "shots": k,
                     "accuracy_mean": statistics.fmean(accs),
                     "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "context_tokens": statistics.fmean(r.context_tokens for r in rs),
                     "seeds": len(rs), "queries": rs[0].num_queries})
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| method | shots | accuracy (%) | context tokens / query | seeds x queries |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        std = f" ± {100 * r['accuracy_std']:.1f}" if r["seeds"] > 1 else ""
        lines.append(f"| {r['method']} | {r['shots']} | {100 * r['accuracy_mean']:.1f}{std} | "
                     f"{r['context_tokens']:.0f} | {r['seeds']} x {r['queries']} |")
    return "\n".join(lines)


def as_dicts(results: Sequence[TrialResult]) -> list[dict]:
    return [asdict(r) for r in results]
