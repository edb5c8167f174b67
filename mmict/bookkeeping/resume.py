"""Which interrupted run to continue, and from which checkpoint (config `resume`).

`make train EXP=...` run again after a crash, a `kill -9` or a SLURM requeue continues the run it
interrupted: the most recent run folder of this experiment whose saved config is the same, that has a
checkpoint, and that did not finish (a finished run writes `summary.json`). Lightning restores the
weights, optimizer, scheduler and loop counters; the data module its stream position and the `RNGState`
callback the random generators, so the losses are the ones the uninterrupted run would have had.
`resume=never` always starts a new run; `resume=<checkpoint or run folder>` continues that one. A run whose
training reached `trainer.max_steps` but whose evaluation did not finish is evaluated from its last checkpoint.

The checkpoint continued is the one of the highest training step that loads (the step read from the file name or
the checkpoint, never the file date, which `cp -r` renews); one that does not load (a kill during a save truncates
it) is moved aside as `<name>.corrupt`, with a warning. A run folder that a live process holds (`run.lock`,
`lock.py`) is never continued: the command refuses, naming that process. A validation the interruption cut short is
run again before training continues (`missed_validation`), so the curve has no hole there.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmict.bookkeeping.folders import unique_path
from mmict.bookkeeping.lock import launch_rank, refuse_if_held
from mmict.config import ConfigError, load_config
from mmict.plots import read_metric

log = logging.getLogger(__name__)

FINISHED = "summary.json"  # written by train() when a run has finished: such a run is never resumed
# Settings that say where a run goes or whether to resume, not what it computes: two configs that differ
# only in these describe the same run.
# Settings that do not change what a run computes (the divergence guard only watches it), so changing them does not
# make it another run for resume=auto.
_NOT_THE_RUN = ("resume", "run_dir", "run_root", "trainer.progress_bar", "trainer.divergence_guard")


@dataclass
class Resume:
    run_dir: Path
    checkpoint: Path
    # The run trained to its last step but did not finish (its evaluation failed, or was killed): it is evaluated,
    # not trained again.
    trained: bool = False
    step: int = 0  # the checkpoint's training step (global_step)


# ModelCheckpoint's names here: step000060.ckpt (train.build_trainer), step=60.ckpt (Lightning's default)
_STEP_IN_NAME = re.compile(r"step[=_-]?(\d+)")
CORRUPT_SUFFIX = ".corrupt"


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The run's checkpoints, highest training step first as their names say (`stepNNNNNN`; unnamed ones, such as
    `last.ckpt` and Lightning's SLURM-requeue `hpc_ckpt_*`, after them): ModelCheckpoint's and `hpc_ckpt_*`."""
    found = list((run_dir / "checkpoints").glob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(found, key=lambda p: (_step_or(p, -1), p.stat().st_mtime), reverse=True)


def _named_step(path: Path) -> int | None:
    match = _STEP_IN_NAME.search(path.stem)
    return int(match.group(1)) if match else None


def _step_or(path: Path, default: int) -> int:
    step = _named_step(path)
    return default if step is None else step


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _set_aside(path: Path, err: Exception) -> None:
    """A checkpoint that does not load: moved aside (never deleted: it may still be inspected), and said."""
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if path.is_dir() or launch_rank() != 0:  # a sharded (FSDP) folder, or another rank's look: leave it
        log.warning("checkpoint %s does not load (%s); passing over it", path, reason)
        return
    target = unique_path(path.with_name(path.name + CORRUPT_SUFFIX))
    path.rename(target)
    log.warning("checkpoint %s does not load (%s): moved aside to %s, so no later resume tries it again; the "
                "previous checkpoint is used. Delete it once you have looked at it", path, reason, target.name)


def newest_step(run_dir: Path) -> tuple[Path, int] | None:
    """(checkpoint, its step) of the highest training step that loads. The step is the file name's (`stepNNNNNN`,
    written by ModelCheckpoint from the global step) or, for a name without one (`last.ckpt`, `hpc_ckpt_*`), the
    checkpoint's `global_step`; never the file date (a folder copied with `cp -r` has new dates). For one step,
    an unnamed file (`last.ckpt`: the latest save, a signal's included) wins, then the newer file. A file that
    does not load (a kill during a save truncates it) is moved aside (`_set_aside`)."""
    candidates: list[tuple[int, int, float, Path]] = []
    loaded: set[Path] = set()
    for path in checkpoints_of(run_dir):
        step = _named_step(path)
        if step is None:  # the step is only in the file
            try:
                step = int(_load(path).get("global_step", 0))
            except Exception as err:  # a truncated zip raises RuntimeError, a garbled one pickle errors
                _set_aside(path, err)
                continue
            loaded.add(path)
        candidates.append((step, int(path in loaded), path.stat().st_mtime, path))
    for step, _, _, path in sorted(candidates, key=lambda c: c[:3], reverse=True):
        if path not in loaded:
            try:
                _load(path)
            except Exception as err:
                _set_aside(path, err)
                continue
        return path, step
    return None


def _comparable(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True)
    for dotted in _NOT_THE_RUN:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return data


def same_run(cfg: DictConfig, run_dir: Path) -> bool:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return False
    try:
        return _comparable(load_config(saved)) == _comparable(cfg)
    except ConfigError:
        return False  # a run of an older schema: not this run


def find_resume(cfg: DictConfig, pinned: str | None) -> Resume | None:
    """What `train` continues (see the module docstring); None: a new run."""
    choice = str(cfg.resume)
    if choice == "never":
        return None
    if choice != "auto":
        return _explicit(Path(choice))
    if pinned is not None:
        run_dir = Path(pinned)
        if (run_dir / "config.yaml").is_file() and not same_run(cfg, run_dir):
            raise ConfigError(f"run folder {run_dir} holds a run of another config (its config.yaml); a pinned "
                              "run_dir is reused only by the same run. Choose another run_dir")
        if (run_dir / FINISHED).exists():
            raise ConfigError(f"run folder {run_dir} holds a finished run ({FINISHED}); it is not trained again. "
                              "Choose another run_dir, or delete the folder to redo the run")
        refuse_if_held(run_dir)  # a live run there: its files are not ours to touch (a checkpoint half written)
        found = newest_step(run_dir) if run_dir.is_dir() else None
        return _resume(run_dir, found, cfg) if found else None
    runs = Path(cfg.run_root) / cfg.name
    for run_dir in sorted((p for p in runs.glob("*") if p.is_dir()), key=lambda p: p.name, reverse=True):
        if (run_dir / FINISHED).exists() or not same_run(cfg, run_dir):
            continue
        refuse_if_held(run_dir)  # the same command is running there now: continuing it too would mix two runs
        found = newest_step(run_dir)
        if found is None:
            log.info("interrupted run %s has no checkpoint to continue from: starting a new run", run_dir)
            return None
        # Trained to the end without summary.json: its evaluation did not finish (a missing eval split, a crash, a
        # kill). Running the same command again evaluates it; training it again would waste the run.
        return _resume(run_dir, found, cfg)
    return None


def _resume(run_dir: Path, found: tuple[Path, int], cfg: DictConfig) -> Resume:
    ckpt, step = found
    return Resume(run_dir, ckpt, trained=step >= int(cfg.trainer.max_steps), step=step)


def _explicit(path: Path) -> Resume:
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        refuse_if_held(run_dir)
        try:
            step = int(_load(path).get("global_step", 0))
        except Exception as err:
            raise ConfigError(f"resume={path}: the checkpoint does not load ({type(err).__name__}: {err}); name "
                              "another checkpoint, or the run folder (its newest loadable one is used)") from err
        return Resume(run_dir, path, step=step)
    if path.is_dir():
        refuse_if_held(path)
        found = newest_step(path)
        if found is None:
            raise ConfigError(f"resume={path}: the run folder has no loadable checkpoint (checkpoints/*.ckpt)")
        return Resume(path, found[0], step=found[1])
    raise ConfigError(f"resume={path}: no such checkpoint or run folder (use auto, never, a .ckpt or a run folder)")


# Lightning's launcher for several devices on one machine (no SLURM, no torchrun) starts ranks 1.. by running the same
# command again once rank 0 trains. Each would otherwise pick its own run folder (a new timestamp) and its own resume
# decision: so rank 0 leaves both here, in the environment those processes inherit.
RANK_ZERO_RUN_ENV = "MMICT_RANK_ZERO_RUN"


def share_with_other_ranks(run_dir: Path, resume: Resume | None) -> None:
    """Rank 0: tell the ranks Lightning will start by re-running this command which run folder and checkpoint to use."""
    if launch_rank() == 0:
        os.environ[RANK_ZERO_RUN_ENV] = json.dumps({"run_dir": str(run_dir), "resume": None if resume is None else {
            **asdict(resume), "run_dir": str(resume.run_dir), "checkpoint": str(resume.checkpoint)}})


def rank_zero_run() -> tuple[Path, Resume | None] | None:
    """Ranks above 0 that rank 0 started: (its run folder, its resume decision); None elsewhere (rank 0, SLURM tasks,
    whose folder is pinned per job and which each decide the same from the same files)."""
    shared = os.environ.get(RANK_ZERO_RUN_ENV)
    if launch_rank() == 0 or not shared:
        return None
    run = json.loads(shared)
    found = run["resume"]
    resume = None if found is None else Resume(**{**found, "run_dir": Path(found["run_dir"]),
                                                  "checkpoint": Path(found["checkpoint"])})
    return Path(run["run_dir"]), resume


def missed_validation(resume: Resume, val_check_interval: int) -> int | None:
    """The step whose validation the interruption cut short, to run again before training continues; None if none.

    Lightning continues a checkpoint saved at a validation step (`ModelCheckpoint` saves before that step's
    validation runs) as if the validation had run: a kill during it would leave the curve without that point.
    So when the checkpoint's step is a validation step and no `val/loss` was logged for it, it is owed. (Lightning
    logs the validation after step s at step s - 1, its count of steps finished before it.)"""
    step = resume.step
    if step <= 1 or step % val_check_interval:
        return None
    logged = {s for s, _ in read_metric(resume.run_dir / "logs" / "metrics.csv", "val/loss")}
    return None if step - 1 in logged else step


def redo_validation(trainer: Any, module: Any, datamodule: Any, resume: Resume, step: int) -> list[dict]:
    """Validate `resume`'s checkpoint and log the result at `step` as fit would have (see `missed_validation`)."""
    loggers = trainer.loggers
    trainer.loggers = []  # `validate` would log it at step 0, over the before-training reference point
    try:
        results = trainer.validate(module, datamodule=datamodule, ckpt_path=str(resume.checkpoint), verbose=False)
    finally:
        trainer.loggers = loggers
    for logger in loggers:
        logger.log_metrics({k: float(v) for k, v in (results[0] if results else {}).items()}, step=step - 1)
        logger.save()
    return results
