"""Companion experiments: other methods trained and evaluated on this run's backbone, data and evaluation
settings, so that one table compares them (`eval.companions`; toy_aim's table gets MMICT this way).

A companion is an ordinary experiment with its own training recipe and its own run folder, named with
optional overrides of its own ("toy_mmict_binding trainer.max_steps=500"). From this run it takes what
makes the numbers comparable: the backbone and the data exactly as this run used them (the folders are
loaded as they are, never rebuilt from a toy recipe), the seed, the evaluation settings and the logger (the
same W&B project and group). A companion's own companions are dropped, so there are no chains.

A method whose trained parts belong to one task (`task_specific`: LIVE's and MimIC's vectors are learnt from one
task's k-shot teacher) is not evaluated on the run's other tasks: such a companion keeps the task its experiment
names (one of the run's: eval.task or a further task, whose entry's overrides it gets), is evaluated on that task
alone, and its rows join that task's section of the joint table.

On W&B every experiment is a run of its own, all in one group (`wandb_group`: `logger.group`, else
"<name>-<time>" of the run that has the companions): the run's W&B run ends after its own evaluation, each
companion's after its own, and the joint table and plot (methods.md/json, methods_vs_shots.png) go to one more run
of the group, "<name>/<time>/methods" (job type "methods"), since the run's own W&B run has ended by the time the
companions' rows exist (an ended W&B run cannot be reopened offline).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmict.bookkeeping.folders import unique_path, write_text_unique
from mmict.bookkeeping.slurm import format_value
from mmict.config import ConfigError, load_config
from mmict.config.checks import parse_extra_task
from mmict.eval.ranks import Ranks
from mmict.eval.runner import EvalOutcome, log_to_wandb, report_markdown
from mmict.methods import method_class
from mmict.plots import plot_score_vs_shots

log = logging.getLogger(__name__)

# What a companion takes from the run it joins (dotted config keys).
SHARED_KEYS = ("backbone.family", "backbone.name_or_path", "backbone.dtype", "data.root", "run_root", "seed",
               "eval.task", "eval.shots", "eval.seeds", "eval.num_queries", "eval.selection", "eval.batch_size",
               "eval.max_new_tokens", "eval.extra_tasks", "logger.wandb", "logger.offline", "logger.project",
               "logger.group")


def companion_configs(cfg: DictConfig) -> list[DictConfig]:
    """The configs of `cfg.eval.companions`, loaded now so that a bad name or override fails before this run
    trains."""
    # The backbone and toy world exist by the time companions train: they are loaded as they are (a toy
    # recipe that differs from this run's must not rebuild them under this run's feet).
    fixed = ["backbone.toy=null", "data.toy=null", "eval.companions=[]"]
    extra = dict(parse_extra_task(spec) for spec in cfg.eval.extra_tasks)  # further task -> its entry's overrides
    configs = []
    for spec in cfg.eval.companions:
        name, *own = str(spec).split()
        clash = [o for o in own if o.split("=", 1)[0] in SHARED_KEYS]
        if clash:
            raise ConfigError(f"eval.companions: '{spec}' overrides {clash}, which a companion takes from the run "
                              f"it joins (so that the table compares like with like): {', '.join(SHARED_KEYS)}")
        try:
            keys, after = SHARED_KEYS, []
            its = load_config(name, own)  # to learn its method and task
            if task_specific(its.method.name):  # its own task, alone, with that task's entry's overrides
                task = its.eval.task
                if task != cfg.eval.task and task not in extra:
                    raise ConfigError(
                        f"{its.method.name}'s trained parts belong to its task ({task}), which this run does not "
                        f"evaluate (eval.task={cfg.eval.task}, eval.extra_tasks: {sorted(extra) or 'none'}): add "
                        f"{task} to eval.extra_tasks, or give the companion one of the run's tasks")
                keys = tuple(k for k in SHARED_KEYS if k not in ("eval.task", "eval.extra_tasks"))
                after = ["eval.extra_tasks=[]", *extra.get(task, [])]
            shared = [f"{key}={format_value(OmegaConf.select(cfg, key))}" for key in keys]
            configs.append(load_config(name, [*own, *shared, *fixed, *after]))
        except ConfigError as err:
            raise ConfigError(f"eval.companions: '{spec}': {err}") from None
    return configs


def task_specific(method: str) -> bool:
    """Whether `method`'s trained parts belong to the one task it was trained for (LIVE's, MimIC's vectors)."""
    return bool(getattr(method_class(method), "task_specific", False))


def wandb_group(cfg: DictConfig, run_dir: str | Path) -> str | None:
    """The W&B group of a run: `logger.group` when set (a sweep's id); else, for a run with companions,
    "<name>-<run folder name>" (the run's name and time), which its companions join; else none."""
    if cfg.logger.group:
        return str(cfg.logger.group)
    return f"{cfg.name}-{Path(run_dir).name}" if cfg.eval.companions else None


def merge_rows(rows: Sequence[dict], companion: str, others: Sequence[dict]) -> list[dict]:
    """This run's rows and a companion's; a companion row whose method name this run already has (its own
    zero-shot, say) is kept under "<method> [<companion>]", unless it is the same measurement (the same method and
    shots with the same numbers: a training-free baseline both runs evaluated on the same backbone and queries),
    which is listed once. Sorted by shots, then method."""
    seen = {r["method"] for r in rows}
    same = {(r["method"], r["shots"], _numbers(r)) for r in rows}
    renamed = [r if r["method"] not in seen else {**r, "method": f"{r['method']} [{companion}]"} for r in others
               if (r["method"], r["shots"], _numbers(r)) not in same]
    return sorted([*rows, *renamed], key=lambda r: (r["shots"], r["method"]))


def _numbers(row: dict) -> str:
    """A row's measured values (all but its name and the timings: the peak memory and the time per query vary run
    to run)."""
    return json.dumps({k: v for k, v in row.items() if k not in ("method", "peak_memory_mb", "ms_per_query")},
                      sort_keys=True, default=str)


def run_companions(cfg: DictConfig, configs: Sequence[DictConfig], outcomes: dict[str, EvalOutcome], eval_dir: Path,
                   train_fn: Callable[[DictConfig], dict[str, Any]],
                   wandb_group: str | None = None) -> tuple[dict[str, EvalOutcome], dict[str, str]]:
    """Train and evaluate each companion with `train_fn`, merge its rows into this run's task by task (`outcomes`:
    eval.task's first, then each of eval.extra_tasks), and write the joint table (methods.md: one section per task;
    methods.json: eval.task's at the top, the further tasks under "extra_tasks") and one plot per task
    (methods_vs_shots.png; methods_vs_shots_<task>.png) next to this run's own report.

    `wandb_group`: this run logs to W&B (its own W&B run has ended by now). Each companion then logs to a W&B run
    of its own in that group (`train_fn` ends it), and the joint table goes to the group's "methods" run."""
    main = cfg.eval.task
    rows = {task: list(outcome.rows) for task, outcome in outcomes.items()}
    runs: dict[str, str] = {}
    for companion in configs:
        name = companion.name
        log.info("companion experiment %s: training and evaluating it on this run's backbone and data", name)
        if wandb_group is not None:
            companion.logger.group = wandb_group  # its own W&B run, beside this run's
        summary = train_fn(companion)
        runs[name] = summary["run_dir"]
        if not summary.get("eval"):
            log.warning("companion %s was not evaluated (eval.enabled=false in it?): it adds no rows", name)
        # its rows by task: its eval.task's (the run's, or a task-specific companion's own) and its further tasks'
        theirs = {companion.eval.task: summary.get("eval") or [], **(summary.get("eval_tasks") or {})}
        rows = {task: merge_rows(mine, name, theirs.get(task) or []) for task, mine in rows.items()}
    merged = {task: o._replace(rows=rows[task], report=report_markdown(rows[task], o.chance, o.metric, o.how))
              for task, o in outcomes.items()}
    payload: dict[str, Any] = {"task": main, "metric": merged[main].metric, "chance": merged[main].chance,
                               "summary": rows[main], "companion_runs": runs, "wandb_group": wandb_group,
                               "extra_tasks": {task: {"metric": o.metric, "chance": o.chance, "summary": o.rows}
                                               for task, o in merged.items() if task != main}}
    if not Ranks.current().main:  # each rank trained and evaluated the companions with this run; rank 0 writes
        return merged, runs
    json_path = unique_path(eval_dir / "methods.json")
    json_path.write_text(json.dumps(payload, indent=2))
    sections = [f"## {task}\n\n{o.report}\n" for task, o in merged.items()] if len(merged) > 1 else \
        [f"{merged[main].report}\n"]
    md_path = write_text_unique(eval_dir / "methods.md", f"# {cfg.name} and its companions: {', '.join(merged)}\n\n"
                                + "\n".join(sections))
    plots = {}
    for task, o in merged.items():
        stem = "methods_vs_shots" if task == main else f"methods_vs_shots_{task}"
        plots[task] = plot_score_vs_shots(o.rows, unique_path(eval_dir / f"{stem}.png"), metric=o.metric,
                                          chance=o.chance, title=f"{cfg.name} + {', '.join(runs)}: {task}")
    log.info("wrote %s, %s, %s", json_path, md_path, ", ".join(map(str, plots.values())))
    if wandb_group is not None:
        log_joint_table(cfg, wandb_group, eval_dir, merged, plots, payload)
    return merged, runs


def log_joint_table(cfg: DictConfig, group: str, eval_dir: Path, outcomes: dict[str, EvalOutcome],
                    plots: dict[str, Path], payload: dict[str, Any]) -> None:
    """The joint table and plot as a W&B run of their own in `group`: "<name>/<time>/methods", job type "methods",
    in this run's folder (its `wandb/`, beside this run's own W&B run); its id comes from the folder, as a run's does,
    so a run evaluated again continues it."""
    import wandb

    run_dir = eval_dir.parent
    run = wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, group=group, job_type="methods",
        name=f"{cfg.name}/{run_dir.name}/methods", tags=list(cfg.logger.tags), dir=str(run_dir),
        mode="offline" if cfg.logger.offline else "online", resume="allow",
        id=hashlib.sha1(str((eval_dir / "methods").absolute()).encode()).hexdigest()[:16],
        reinit="finish_previous",  # never log into a run left open: each experiment is its own W&B run
        config={k: v for k, v in payload.items() if k != "summary"} | {"run": cfg.name, "run_dir": str(run_dir)},
    )
    try:
        for task, outcome in outcomes.items():  # eval.task's under "methods", a further task's under "methods_<task>"
            prefix = "methods" if task == cfg.eval.task else f"methods_{task}"
            log_to_wandb(run, outcome.rows, {"methods_vs_shots": plots[task]}, prefix=prefix)
        log.info("the joint table is W&B run %s (%s) of group %s", run.id, run.name, group)
    finally:
        run.finish()
