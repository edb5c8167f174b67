"""Evaluate a module on its experiment's downstream task and write the report files."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from data_modules.downstream import DownstreamDataModule, Example, ShardExamples
from data_modules.skips import SplitLoss, skip_line, skip_record
from mmict.backbones.vision_cache import attach_vision_cache
from mmict.bookkeeping.folders import unique_path, write_text_unique
from mmict.bookkeeping.record import versions
from mmict.eval.loop import (
    SeedPlan,
    as_dicts,
    chance_rate,
    evaluate,
    markdown_table,
    summary_rows,
)
from mmict.eval.metrics import vqa_accuracy_openflamingo
from mmict.eval.postprocess import get_postprocessor
from mmict.eval.protocol import ID_LESS_VQA_TASKS, ResolvedProtocol, end_of_chunk, resolve
from mmict.eval.ranks import Ranks
from mmict.eval.selection import DemoSelector
from mmict.eval.tasks import Task, get_task
from mmict.methods.aim.report import aim_vs_icl, aim_vs_icl_markdown, trained_shots_line, trained_shots_of
from mmict.plots import plot_cost_vs_shots, plot_score_vs_shots

log = logging.getLogger(__name__)


class EvalOutcome(NamedTuple):
    rows: list[dict]  # summary rows: mean and std over seeds per (method, shots)
    report: str  # the table (and AIM vs vanilla ICL) as markdown
    chance: float | None  # the rate of answering with a random demo's answer (episodic tasks)
    metric: str
    how: list[str] = []  # how the numbers were made (protocol, shots, trials, queries, selection, decoding, view)
    skipped: dict[str, Any] = {}  # results.json's "skipped": what the queries and the demo pool lost, by reason


def log_to_wandb(run: Any, rows: list[dict], images: dict[str, Path], prefix: str = "eval",
                 settings: dict[str, Any] | None = None, skipped: dict[str, Any] | None = None) -> None:
    """The summary as a W&B table (with the protocol's label and settings as columns, so a dashboard never puts
    rows made differently side by side unawares), the protocol in the run's config, and the plots as images;
    `skipped` (results.json's record of skipped queries and pool examples) in the config and its counts in the
    run's summary."""
    import wandb

    settings = settings or {}
    if settings:
        run.config.update({f"{prefix}_protocol": settings}, allow_val_change=True)
    if skipped is not None:
        run.config.update({f"{prefix}_skipped": skipped}, allow_val_change=True)
        counts = {f"{prefix}/skipped_{name}": sum(skipped.get(name, {}).values()) for name in ("queries", "pool")}
        summary = getattr(run, "summary", None)
        if summary is not None:
            summary.update(counts)
    table_rows = [{**{k: v for k, v in r.items() if k != "metrics"}, **r.get("metrics", {}),
                   "protocol": settings.get("label", ""), "decoding": json.dumps(settings.get("decoding")),
                   "demo_image_view": settings.get("demo_image_view", "")} for r in rows]
    columns = list(dict.fromkeys(c for r in table_rows for c in r))
    run.log({f"{prefix}/results": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in table_rows]),
             **{f"{prefix}/{name}": wandb.Image(str(path)) for name, path in images.items()}})


def attach_bank(module, cfg: DictConfig, view: str = "full"):
    """The demonstration bank of `eval.bank` on a module that reads demos (AIM), when enabled; else None. Demos read
    at the base view are other readings than at the full view: they get their own pool name."""
    bank_cfg = cfg.eval.bank
    if not bank_cfg.enabled or not hasattr(module, "attach_bank") or "fused" not in module.eval_demo_modes():
        return None
    root = Path(bank_cfg.dir) if bank_cfg.dir else Path(cfg.data.root) / "bank"
    pool = f"{cfg.eval.task}-train" + ("" if view == "full" else f"-{view}-view")
    return module.attach_bank(root, store=bank_cfg.store, pool=pool, batch_size=bank_cfg.batch_size)


# Tasks whose converter merges Karpathy's restval into our train split (data_modules/converters/captions.py).
_RESTVAL_TASKS = ("coco_caption",)


def caption_pool(pool: Sequence[Example], protocol: ResolvedProtocol, task: Task) -> Sequence[Example]:
    """The caption demo pool the protocol asks for: Karpathy "train" only (openflamingo) or with "restval"."""
    if task.style != "caption" or protocol.caption_pool != "train":
        return pool
    unknown = [ex.id for ex in pool if ex.source_split is None]
    if unknown and task.name in _RESTVAL_TASKS:
        raise ValueError(
            f"eval.protocol={protocol.name} draws {task.name} demos from Karpathy's train split only, but "
            f"{len(unknown)} pool examples (e.g. {unknown[0]}) do not record their Karpathy split (converted before "
            "mmict wrote 'karpathy_split'). Fix: convert the train split again (`mmict data convert "
            f"{task.name} ...`, docs/data.md), or use eval.protocol=mmict (train + restval)")
    kept = [ex for ex in pool if ex.source_split != "restval"]
    log.info("%s demo pool: %d Karpathy train examples (%d restval left out, as OpenFlamingo's harness)",
             task.name, len(kept), len(pool) - len(kept))
    return kept


def at_view(examples: Sequence[Example], transform) -> Sequence[Example]:
    """The same examples, decoding their images with `transform` (demo images at the base view); an indexed pool
    (`ShardExamples`) stays lazy."""
    if isinstance(examples, ShardExamples):
        return examples.with_transform(transform)
    out = []
    for ex in examples:
        if not ex.has_encoded_image:  # known without reading the image from its shard
            raise ValueError(f"example {ex.id} holds a preprocessed image only: eval.demo_image_view=base needs the "
                             "encoded image (examples read from shards keep it)")
        view = copy.copy(ex)
        view.transform = transform
        out.append(view)
    return out


def seed_plans(dm: DownstreamDataModule, pool: Sequence[Example], protocol: ResolvedProtocol, seeds: list[int],
               random_demos: bool) -> tuple[dict[int, SeedPlan], dict[str, Any]]:
    """Each trial seed's queries and demo pool as the protocol draws them, and what was drawn (for results.json)."""
    plans, record = {}, {}
    pool_lost = dm.pool_loss.reasons if dm.pool_loss else {}
    if protocol.query_subset == "first":
        lost = dm.query_loss.reasons if dm.query_loss else {}
        for seed in seeds:
            _, pool_pos = protocol.subsets(seed, len(dm.queries), len(pool), random_demos)
            plans[seed] = SeedPlan(list(dm.queries), [pool[i] for i in pool_pos], _skipped(lost, pool_lost))
            record[seed] = {"num_queries": len(dm.queries), "pool_size": len(pool_pos), "query_subset": "first N",
                            "skipped": dict(lost)}
        return plans, record
    n_test = dm.count_queries()
    drawn = {seed: protocol.subsets(seed, n_test, len(pool), random_demos) for seed in seeds}
    loaded = dm.queries_at({p for q_pos, _ in drawn.values() for p in q_pos})
    for seed, (q_pos, pool_pos) in drawn.items():
        queries = [loaded[p] for p in q_pos if p in loaded]
        lost = dm.query_loss_at(q_pos).reasons
        if len(queries) < len(q_pos):
            log.warning("seed %d: %d of the %d drawn queries were skipped (%s)", seed, len(q_pos) - len(queries),
                        len(q_pos), ", ".join(f"{r}: {n}" for r, n in lost.items()))
        plans[seed] = SeedPlan(queries, [pool[i] for i in pool_pos], _skipped(lost, pool_lost))
        record[seed] = {"num_queries": len(queries), "drawn_from": n_test, "pool_size": len(pool_pos),
                        "query_subset": "seeded random", "query_positions": q_pos, "skipped": dict(lost)}
    return plans, record


def _skipped(queries: dict[str, int], pool: dict[str, int]) -> dict[str, dict[str, int]]:
    """A trial's record of what its queries and its demo pool lost (only the parts that lost something)."""
    return {name: dict(lost) for name, lost in (("queries", queries), ("pool", pool)) if lost}


def split_losses(dm: DownstreamDataModule, drawn: dict) -> dict[str, SplitLoss | None]:
    """What the evaluation's queries (all seeds' together) and its demo pool lost."""
    if dm.load_queries:
        queries = dm.query_loss
    else:
        queries = dm.query_loss_at({p for d in drawn.values() for p in d.get("query_positions", [])})
    return {"queries": queries, "pool": dm.pool_loss}


def protocol_for(cfg: DictConfig, task: Task, backbone) -> ResolvedProtocol:
    """The run's protocol for `task` on `backbone` (its end-of-chunk token, encoder-decoder or not)."""
    return resolve(cfg.eval, task, selection=cfg.eval.selection, eoc=end_of_chunk(backbone.tokenizer),
                   prompt_format=cfg.data.prompt_format, encoder_decoder=backbone.is_encoder_decoder)


def run_eval(module, cfg: DictConfig, out_dir: str | Path, checkpoint: str | None = None,
             wandb_run: Any = None, wandb_prefix: str = "eval", ranks: Ranks | None = None) -> EvalOutcome:
    """Shots x seeds x demo modes on `cfg.eval.task` under `cfg.eval.protocol`; writes results.json, results.md,
    score_vs_shots.png and cost_vs_shots.png (never over an existing file), and logs them to `wandb_run` when given
    (under `wandb_prefix`: eval.task's under "eval", a further task's under "eval_<task>").

    Returns the summary rows and the report (markdown), with the chance rate and metric they are read against.

    Over several processes (`ranks`; default: the initialised process group's) every rank evaluates its share of
    the batches (`mmict.eval.ranks`), every rank returns the same outcome, and rank 0 alone writes and logs."""
    ev = cfg.eval
    ranks = ranks or Ranks.current(module.device)
    task = get_task(ev.task, cfg.data.prompt_format)
    if ev.postprocess:
        task = dataclasses.replace(task, postprocess=get_postprocessor(ev.postprocess))
    backbone = module.backbone
    protocol = protocol_for(cfg, task, backbone)
    if protocol.vqa_scoring == "openflamingo" and task.name in ID_LESS_VQA_TASKS:
        task = dataclasses.replace(task, score=vqa_accuracy_openflamingo)
    # Checked before any data is read: a family without a base view refuses eval.demo_image_view=base.
    demo_transform = backbone.base_view_transform if protocol.demo_image_view == "base" else None
    dm = DownstreamDataModule(cfg.data.root, folder=task.folder, task=task.name,
                              image_transform=backbone.image_transform, num_queries=ev.num_queries,
                              load_queries=protocol.query_subset == "first")
    dm.setup("test")
    pool = caption_pool(dm.pool, protocol, task)
    if demo_transform is not None:
        pool = at_view(pool, demo_transform)
    bank = attach_bank(module, cfg, protocol.demo_image_view)
    vision_cache = attach_vision_cache(backbone, ev.get("vision_cache"))  # eval.vision_cache; closed after evaluate
    random_demos = ev.selection == "random" and not task.episodic
    plans, drawn = seed_plans(dm, pool, protocol, list(ev.seeds), random_demos)
    losses = split_losses(dm, drawn)
    skipped = skip_line(losses, {"queries": f"{dm.query_split} queries", "pool": "pool examples"})
    if skipped and ranks.main:  # also the table's header line, results.json's "skipped" and the W&B run's
        log.warning("%s: %s", task.name, skipped)
    rices = None
    if ev.selection == "rices":
        rices = {**OmegaConf.to_container(ev.rices), "model": protocol.rices_model,
                 "pretrained": protocol.rices_pretrained}
    started = time.perf_counter()
    results = evaluate(module, [], pool, shots=list(ev.shots), seeds=list(ev.seeds),
                       demo_modes=module.eval_demo_modes(), task=task, batch_size=ev.batch_size,
                       selection=ev.selection, rices=rices, protocol=protocol, plans=plans, ranks=ranks)
    seconds = time.perf_counter() - started  # the trials (bank and RICES features included), on rank 0's clock
    # demos each rank computed for the bank: rank 0 all of them, the others none (they load what it stored)
    bank_computed = ranks.gather(bank.stats["computed"]) if bank is not None else None
    vision_cached = vision_cache.close() if vision_cache is not None else None  # on every rank: frees its memory
    rows = summary_rows(results, labels=module.mode_labels, protocol=protocol)
    queries = list({q.id: q for plan in plans.values() for q in plan.queries}.values())
    chance = chance_rate(queries, DemoSelector(pool, episodic=task.episodic))
    comparison = aim_vs_icl(rows)
    out_dir = Path(out_dir)
    trained = trained_shots_of(module)
    how = how_made(protocol, task, cfg, backbone, drawn, trained=trained, skipped=skipped, processes=ranks.world)
    report = report_markdown(rows, chance, task.metric, how)
    if not ranks.main:  # rank 0 writes the files and logs to W&B
        return EvalOutcome(rows, report, chance, task.metric, how, skip_record(losses))
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "task": ev.task, "metric": task.metric, "checkpoint": checkpoint,
        # the preset, then every setting it resolved to (and what the user changed: settings.overrides)
        "protocol": protocol.name, "protocol_label": protocol.label, "protocol_settings": protocol.as_dict(),
        "summary": rows,
        "shots": list(ev.shots), "seeds": list(ev.seeds),
        "num_queries": {str(seed): d["num_queries"] for seed, d in drawn.items()},
        # skipped test queries and pool examples by reason, and per split the kept count, broken shards, size written
        "skipped": skip_record(losses),
        "query_subsets": {str(seed): d for seed, d in drawn.items()},
        "selection": ev.selection + (" (in-episode)" if task.episodic else ""),
        "rices": rices,
        "postprocess": ev.postprocess or "task default",
        "kind": task.kind,
        # classify tasks generate nothing: their classes are scored by length-normalised log-likelihood
        "decoding": dataclasses.asdict(protocol.decoding) if protocol.decoding else {"classes": list(task.classes)},
        "model_max_positions": backbone.max_positions, "model_max_positions_source": backbone.max_positions_source,
        "backbone": {"family": cfg.backbone.family, "name_or_path": cfg.backbone.name_or_path,
                     "substitute_for": OmegaConf.select(cfg, "backbone.substitute_for")},
        "chance": chance, "aim_vs_icl": comparison,
        # episodes per demo count the module was trained on (AIM; null: unknown), beside the shots evaluated here
        "trained_shots": None if trained is None else {str(k): n for k, n in sorted(trained.items())},
        "bank": None if bank is None else {"dir": str(bank.path), **bank.stats, "computed_per_rank": bank_computed},
        "vision_cache": vision_cached,  # images served from memory / disk, encoded, evicted; MB held (this rank)
        "processes": ranks.world,  # batches dealt to this many ranks; the numbers are those of one process
        # the trials' wall time and the queries of the trials that ran (eval_scaling's throughput)
        "seconds": seconds, "queries_run": sum(r.num_queries for r in results if r.predictions is not None),
        "trials": as_dicts(results), "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
    }
    json_path = unique_path(out_dir / "results.json")
    json_path.write_text(json.dumps(payload, indent=2))
    md_path = write_text_unique(out_dir / "results.md", f"# {cfg.name}: {ev.task}\n\n{report}\n")
    png_path = plot_score_vs_shots(rows, unique_path(out_dir / "score_vs_shots.png"), metric=task.metric,
                                   chance=chance, title=f"{cfg.name}: {ev.task} ({protocol.label})")
    cost_path = plot_cost_vs_shots(rows, unique_path(out_dir / "cost_vs_shots.png"), title=f"{cfg.name}: {ev.task}")
    log.info("wrote %s, %s, %s, %s", json_path, md_path, png_path, cost_path)
    if wandb_run is not None:
        log_to_wandb(wandb_run, rows, {"score_vs_shots": png_path, "cost_vs_shots": cost_path},
                     prefix=wandb_prefix, settings=protocol.as_dict(), skipped=payload["skipped"])
    return EvalOutcome(rows, report, chance, task.metric, how, payload["skipped"])


def run_tasks(module, cfg: DictConfig, task_cfgs: Sequence[DictConfig], out_dir: str | Path,
              checkpoint: str | None = None, wandb_run: Any = None, ranks: Ranks | None = None
              ) -> dict[str, EvalOutcome]:
    """`run_eval` on eval.task under `out_dir`, then on each further task's config (`task_cfgs`: eval.extra_tasks,
    mmict/config/extra_tasks.py) under `out_dir/<task>` and the W&B prefix `eval_<task>`; the outcomes by task,
    eval.task's first."""
    outcomes = {cfg.eval.task: run_eval(module, cfg, out_dir, checkpoint=checkpoint, wandb_run=wandb_run,
                                        ranks=ranks)}
    for task_cfg in task_cfgs:
        task = task_cfg.eval.task
        outcomes[task] = run_eval(module, task_cfg, Path(out_dir) / task, checkpoint=checkpoint, wandb_run=wandb_run,
                                  wandb_prefix=f"eval_{task}", ranks=ranks)
    return outcomes


def how_made(protocol: ResolvedProtocol, task: Task, cfg: DictConfig, backbone, drawn: dict,
             trained: dict[int, int] | None = None, skipped: str | None = None, processes: int = 1) -> list[str]:
    """The lines above a table that say how its numbers were made; `skipped`: the line saying what the queries and
    the demo pool lost (`skips.skip_line`), when they lost anything."""
    ev = cfg.eval
    sizes = sorted({d["num_queries"] for d in drawn.values()})
    subset = next(iter(drawn.values()))["query_subset"] if drawn else "n/a"
    zero = {"text_demos": f"0-shot = {protocol.zero_shot_text_demos} text-only demos (OpenFlamingo)",
            "none": "0-shot = no demos", "both": f"0-shot both ways (no demos; {protocol.zero_shot_text_demos} "
            "text-only demos)"}[protocol.zero_shot]
    if protocol.decoding is None:
        decoding = f"classes {list(task.classes)} ranked by length-normalised log-likelihood"
    else:
        d = protocol.decoding
        lp = "model default" if d.length_penalty is None else f"{d.length_penalty:g}"
        decoding = f"{d.num_beams} beam(s), length_penalty {lp}, max {d.max_new_tokens} new tokens" + (
            f", min {d.min_new_tokens}" if d.min_new_tokens else "")
    selection = ev.selection + (" (in-episode)" if task.episodic else "")
    if ev.selection == "rices":
        selection += f" (CLIP {protocol.rices_model} / {protocol.rices_pretrained})"
    elif protocol.demo_pool_size is not None:
        selection += f" from {protocol.demo_pool_size} train examples per seed"
    limit = backbone.max_positions
    substitute = OmegaConf.select(cfg, "backbone.substitute_for")
    model = f"{cfg.backbone.family}: {cfg.backbone.name_or_path}" + (
        f" (a substitute for the paper's {substitute}: not the paper's backbone)" if substitute else "")
    return [
        f"Backbone: {model}",
        f"Protocol: {protocol.label}; prompt format {protocol.prompt_format}",
        f"Shots: {list(ev.shots)} ({zero}); trials (seeds): {list(ev.seeds)}, mean ± {protocol.spread} std over "
        "trials",
        *trained_shots_line(trained, ev.shots),  # the module's histogram of demos per training episode, if known
        f"Queries per trial: {', '.join(map(str, sizes))} ({subset})"
        + (f"; batches dealt to {processes} processes (the numbers of one)" if processes > 1 else ""),
        *([skipped] if skipped else []),
        f"Demo selection: {selection}; demo separator {protocol.demo_separator!r}; demo images: "
        f"{protocol.demo_image_view} view",
        f"Decoding: {decoding}",
        f"Context: the LM has {'no hard limit' if limit is None else f'{limit} positions'} "
        f"({backbone.max_positions_source}); over-context trials: "
        + ("not run" if protocol.over_context == "skip" else "run and flagged"),
    ]


def report_markdown(rows: list[dict], chance: float | None, metric: str, how: list[str] | None = None) -> str:
    """How the numbers were made, the methods table, and AIM's share of vanilla ICL's gain when both were
    evaluated (over-context rows left out)."""
    head = "".join(f"- {line}\n" for line in how or []) + ("\n" if how else "")
    report = head + markdown_table(rows, chance, metric=metric)
    comparison = aim_vs_icl(rows)
    return report + ("\n\n" + aim_vs_icl_markdown(comparison) if comparison else "")
