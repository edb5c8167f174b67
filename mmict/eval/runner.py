"""Evaluate a module on its experiment's downstream task and write the report files."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from data_modules.downstream import DownstreamDataModule
from mmict.eval.loop import (
    as_dicts,
    chance_rate,
    evaluate,
    markdown_table,
    summary_rows,
)
from mmict.eval.postprocess import get_postprocessor
from mmict.eval.selection import DemoSelector
from mmict.eval.tasks import get_task
from mmict.methods.aim.report import aim_vs_icl, aim_vs_icl_markdown
from mmict.plots import plot_cost_vs_shots, plot_score_vs_shots
from mmict.runs.folders import unique_path, write_text_unique
from mmict.runs.record import versions

log = logging.getLogger(__name__)


class EvalOutcome(NamedTuple):
    rows: list[dict]  # summary rows: mean and std over seeds per (method, shots)
    report: str  # the table (and AIM vs vanilla ICL) as markdown
    chance: float | None  # the rate of answering with a random demo's answer (episodic tasks)
    metric: str


def log_to_wandb(run: Any, rows: list[dict], images: dict[str, Path], prefix: str = "eval") -> None:
    """The summary as a W&B table and the plots as images, so runs compare side by side on a dashboard."""
    import wandb

    columns = list(rows[0]) if rows else []
    run.log({f"{prefix}/results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
             **{f"{prefix}/{name}": wandb.Image(str(path)) for name, path in images.items()}})


def attach_bank(module, cfg: DictConfig):
    """The demonstration bank of `eval.bank` on a module that reads demos (AIM), when enabled; else None."""
    bank_cfg = cfg.eval.bank
    if not bank_cfg.enabled or not hasattr(module, "attach_bank") or "fused" not in module.eval_demo_modes():
        return None
    root = Path(bank_cfg.dir) if bank_cfg.dir else Path(cfg.data.root) / "bank"
    return module.attach_bank(root, store=bank_cfg.store, pool=f"{cfg.eval.task}-train", batch_size=bank_cfg.batch_size)


def run_eval(module, cfg: DictConfig, out_dir: str | Path, checkpoint: str | None = None,
             wandb_run: Any = None) -> EvalOutcome:
    """Shots x seeds x demo modes on `cfg.eval.task`; writes results.json, results.md, score_vs_shots.png and
    cost_vs_shots.png (never over an existing file), and logs them to `wandb_run` when given.

    Returns the summary rows and the report (markdown), with the chance rate and metric they are read against."""
    ev = cfg.eval
    task = get_task(ev.task)
    if ev.postprocess:
        task = dataclasses.replace(task, postprocess=get_postprocessor(ev.postprocess))
    dm = DownstreamDataModule(cfg.data.root, folder=task.folder, task=task.name,
                              image_transform=module.backbone.image_transform, num_queries=ev.num_queries)
    dm.setup("test")
    bank = attach_bank(module, cfg)
    results = evaluate(module, dm.queries, dm.pool, shots=list(ev.shots), seeds=list(ev.seeds),
                       demo_modes=module.eval_demo_modes(), task=task, batch_size=ev.batch_size,
                       max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams, selection=ev.selection,
                       rices=OmegaConf.to_container(ev.rices) if ev.selection == "rices" else None)
    rows = summary_rows(results, labels=module.mode_labels)
    chance = chance_rate(dm.queries, DemoSelector(dm.pool, episodic=task.episodic))
    comparison = aim_vs_icl(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report_markdown(rows, chance, task.metric)
    payload = {
        "task": ev.task, "metric": task.metric, "checkpoint": checkpoint, "summary": rows,
        "shots": list(ev.shots), "seeds": list(ev.seeds), "num_queries": len(dm.queries),
        "selection": ev.selection + (" (in-episode)" if task.episodic else ""),
        "rices": OmegaConf.to_container(ev.rices) if ev.selection == "rices" else None,
        "postprocess": ev.postprocess or "task default",
        "kind": task.kind,
        # classify tasks generate nothing: their classes are scored by length-normalised log-likelihood
        "decoding": {"num_beams": ev.num_beams or task.num_beams, "max_new_tokens": ev.max_new_tokens
                     or task.max_new_tokens} if task.kind == "generate" else {"classes": list(task.classes)},
        "chance": chance, "aim_vs_icl": comparison,
        "bank": None if bank is None else {"dir": str(bank.path), **bank.stats},
        "trials": as_dicts(results), "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
    }
    json_path = unique_path(out_dir / "results.json")
    json_path.write_text(json.dumps(payload, indent=2))
    md_path = write_text_unique(out_dir / "results.md", f"# {cfg.name}: {ev.task}\n\n{report}\n")
    png_path = plot_score_vs_shots(rows, unique_path(out_dir / "score_vs_shots.png"), metric=task.metric,
                                   chance=chance, title=f"{cfg.name}: {ev.task}")
    cost_path = plot_cost_vs_shots(rows, unique_path(out_dir / "cost_vs_shots.png"), title=f"{cfg.name}: {ev.task}")
    log.info("wrote %s, %s, %s, %s", json_path, md_path, png_path, cost_path)
    if wandb_run is not None:
        log_to_wandb(wandb_run, rows, {"score_vs_shots": png_path, "cost_vs_shots": cost_path})
    return EvalOutcome(rows, report, chance, task.metric)


def report_markdown(rows: list[dict], chance: float | None, metric: str) -> str:
    """The methods table, and AIM's share of vanilla ICL's gain when both were evaluated."""
    report = markdown_table(rows, chance, metric=metric)
    comparison = aim_vs_icl(rows)
    return report + ("\n\n" + aim_vs_icl_markdown(comparison) if comparison else "")
