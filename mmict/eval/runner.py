"""Evaluate a module on its experiment's downstream task and write the report files."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data_modules.downstream import DownstreamDataModule
from mmict.eval.loop import (
    aim_vs_icl,
    aim_vs_icl_markdown,
    as_dicts,
    chance_rate,
    evaluate,
    markdown_table,
    summary_rows,
)
from mmict.eval.selection import DemoSelector
from mmict.eval.tasks import get_task
from mmict.plots import plot_score_vs_shots
from mmict.runs import unique_path, write_text_unique

log = logging.getLogger(__name__)


def run_eval(module, cfg: DictConfig, out_dir: str | Path, checkpoint: str | None = None) -> tuple[list[dict], str]:
    """Shots x seeds x demo modes on `cfg.eval.task`; writes results.json, results.md, score_vs_shots.png.

    Returns (summary rows, the report as markdown)."""
    ev = cfg.eval
    task = get_task(ev.task)
    dm = DownstreamDataModule(cfg.data.root, task=ev.task, image_transform=module.backbone.image_transform,
                              num_queries=ev.num_queries)
    dm.setup("test")
    results = evaluate(module, dm.queries, dm.pool, shots=list(ev.shots), seeds=list(ev.seeds),
                       demo_modes=list(ev.demo_modes), task=task, batch_size=ev.batch_size,
                       max_new_tokens=ev.max_new_tokens)
    rows = summary_rows(results)
    chance = chance_rate(dm.queries, DemoSelector(dm.pool, episodic=task.episodic))
    comparison = aim_vs_icl(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_table(rows, chance)
    if comparison:
        report += "\n\n" + aim_vs_icl_markdown(comparison)
    payload = {
        "task": ev.task, "metric": "exact_match", "checkpoint": checkpoint, "summary": rows,
        "chance": chance, "aim_vs_icl": comparison,
        "trials": as_dicts(results), "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    json_path = unique_path(out_dir / "results.json")
    json_path.write_text(json.dumps(payload, indent=2))
    md_path = write_text_unique(out_dir / "results.md", f"# {cfg.name}: {ev.task}\n\n{report}\n")
    png_path = plot_score_vs_shots(rows, unique_path(out_dir / "score_vs_shots.png"), chance=chance,
                                   title=f"{cfg.name}: {ev.task}")
    log.info("wrote %s, %s, %s", json_path, md_path, png_path)
    return rows, report
