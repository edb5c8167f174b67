"""Companion experiments: other methods trained and evaluated on this run's backbone, data and evaluation
settings, so that one table compares them (`eval.companions`; toy_aim's table gets MMICT this way).

A companion is an ordinary experiment with its own training recipe and its own run folder, named with
optional overrides of its own ("toy_mmict_binding trainer.max_steps=500"). From this run it takes what
makes the numbers comparable: the backbone and the data exactly as this run used them (the folders are
loaded as they are, never rebuilt from a toy recipe), the seed, the evaluation settings and the logger (the
same W&B project and group). A companion's own companions are dropped, so there are no chains.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmict.config import ConfigError, load_config
from mmict.eval.runner import EvalOutcome, report_markdown
from mmict.plots import plot_score_vs_shots
from mmict.runs.folders import unique_path, write_text_unique
from mmict.runs.slurm import format_value

log = logging.getLogger(__name__)

# What a companion takes from the run it joins (dotted config keys).
SHARED_KEYS = ("backbone.family", "backbone.name_or_path", "backbone.dtype", "data.root", "run_root", "seed",
               "eval.task", "eval.shots", "eval.seeds", "eval.num_queries", "eval.selection", "eval.batch_size",
               "eval.max_new_tokens", "logger.wandb", "logger.offline", "logger.project", "logger.group")


def companion_configs(cfg: DictConfig) -> list[DictConfig]:
    """The configs of `cfg.eval.companions`, loaded now so that a bad name or override fails before this run
    trains."""
    shared = [f"{key}={format_value(OmegaConf.select(cfg, key))}" for key in SHARED_KEYS]
    # The backbone and toy world exist by the time companions train: they are loaded as they are (a toy
    # recipe that differs from this run's must not rebuild them under this run's feet).
    shared += ["backbone.toy=null", "data.toy=null", "eval.companions=[]"]
    configs = []
    for spec in cfg.eval.companions:
        name, *own = str(spec).split()
        clash = [o for o in own if o.split("=", 1)[0] in SHARED_KEYS]
        if clash:
            raise ConfigError(f"eval.companions: '{spec}' overrides {clash}, which a companion takes from the run "
                              f"it joins (so that the table compares like with like): {', '.join(SHARED_KEYS)}")
        try:
            configs.append(load_config(name, [*own, *shared]))
        except ConfigError as err:
            raise ConfigError(f"eval.companions: '{spec}': {err}") from None
    return configs


def merge_rows(rows: Sequence[dict], companion: str, others: Sequence[dict]) -> list[dict]:
    """This run's rows and a companion's; a companion row whose method name this run already has (its own
    zero-shot, say) is kept under "<method> [<companion>]". Sorted by shots, then method."""
    seen = {r["method"] for r in rows}
    renamed = [r if r["method"] not in seen else {**r, "method": f"{r['method']} [{companion}]"} for r in others]
    return sorted([*rows, *renamed], key=lambda r: (r["shots"], r["method"]))


def run_companions(cfg: DictConfig, configs: Sequence[DictConfig], outcome: EvalOutcome, eval_dir: Path,
                   train_fn: Callable[[DictConfig], dict[str, Any]]) -> tuple[EvalOutcome, dict[str, str]]:
    """Train and evaluate each companion with `train_fn`, merge its rows into this run's, and write the
    joint table (methods.md, methods.json) and plot (methods_vs_shots.png) next to this run's own report."""
    rows, runs = list(outcome.rows), {}
    for companion in configs:
        name = companion.name
        log.info("companion experiment %s: training and evaluating it on this run's backbone and data", name)
        summary = train_fn(companion)
        runs[name] = summary["run_dir"]
        if not summary.get("eval"):
            log.warning("companion %s was not evaluated (eval.enabled=false in it?): it adds no rows", name)
        rows = merge_rows(rows, name, summary.get("eval") or [])
    report = report_markdown(rows, outcome.chance, outcome.metric, outcome.how)
    payload = {"task": cfg.eval.task, "metric": outcome.metric, "chance": outcome.chance, "summary": rows,
               "companion_runs": runs}
    json_path = unique_path(eval_dir / "methods.json")
    json_path.write_text(json.dumps(payload, indent=2))
    md_path = write_text_unique(eval_dir / "methods.md", f"# {cfg.name} and its companions: {cfg.eval.task}\n\n"
                                f"{report}\n")
    png_path = plot_score_vs_shots(rows, unique_path(eval_dir / "methods_vs_shots.png"), metric=outcome.metric,
                                   chance=outcome.chance, title=f"{cfg.name} + {', '.join(runs)}: {cfg.eval.task}")
    log.info("wrote %s, %s, %s", json_path, md_path, png_path)
    return EvalOutcome(rows, report, outcome.chance, outcome.metric, outcome.how), runs
