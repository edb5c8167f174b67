"""Which interrupted run to continue, and from which checkpoint (config `resume`).

`make train EXP=...` run again after a crash, a `kill -9` or a SLURM requeue continues the run it
interrupted: the most recent run folder of this experiment whose saved config is the same, that has a
checkpoint, and that did not finish (a finished run writes `summary.json`). Lightning restores the
weights, optimizer, scheduler and loop counters; the data module its stream position and the `RNGState`
callback the random generators, so the losses are the ones the uninterrupted run would have had.
`resume=never` always starts a new run; `resume=<checkpoint or run folder>` continues that one. A run whose
training reached `trainer.max_steps` but whose evaluation did not finish is evaluated from its last checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mmict.config import ConfigError, load_config

log = logging.getLogger(__name__)

FINISHED = "summary.json"  # written by train() when a run has finished: such a run is never resumed
# Settings that say where a run goes or whether to resume, not what it computes: two configs that differ
# only in these describe the same run.
_NOT_THE_RUN = ("resume", "run_dir", "run_root", "trainer.progress_bar")


@dataclass
class Resume:
    run_dir: Path
    checkpoint: Path
    # The run trained to its last step but did not finish (its evaluation failed, or was killed): it is evaluated,
    # not trained again.
    trained: bool = False


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first: ModelCheckpoint's and Lightning's SLURM-requeue `hpc_ckpt_*`."""
    found = list((run_dir / "checkpoints").glob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def loadable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that loads. A kill during a save can leave a truncated file: it is named and
    passed over for the previous one, never used."""
    for path in checkpoints_of(run_dir):
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            return path
        except Exception as err:  # a truncated zip raises RuntimeError, a garbled one pickle errors
            log.warning("checkpoint %s does not load (%s: %s); trying the previous one", path, type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "")
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
        ckpt = loadable_checkpoint(run_dir) if run_dir.is_dir() else None
        return Resume(run_dir, ckpt, trained=_trained_to_the_end(ckpt, cfg)) if ckpt else None
    runs = Path(cfg.run_root) / cfg.name
    for run_dir in sorted((p for p in runs.glob("*") if p.is_dir()), key=lambda p: p.name, reverse=True):
        if (run_dir / FINISHED).exists() or not same_run(cfg, run_dir):
            continue
        ckpt = loadable_checkpoint(run_dir)
        if ckpt is None:
            log.info("interrupted run %s has no checkpoint to continue from: starting a new run", run_dir)
            return None
        # Trained to the end without summary.json: its evaluation did not finish (a missing eval split, a crash, a
        # kill). Running the same command again evaluates it; training it again would waste the run.
        return Resume(run_dir, ckpt, trained=_trained_to_the_end(ckpt, cfg))
    return None


def _trained_to_the_end(ckpt: Path, cfg: DictConfig) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    return int(state.get("global_step", 0)) >= int(cfg.trainer.max_steps)


def _explicit(path: Path) -> Resume:
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return Resume(run_dir, path)
    if path.is_dir():
        ckpt = loadable_checkpoint(path)
        if ckpt is None:
            raise ConfigError(f"resume={path}: the run folder has no loadable checkpoint (checkpoints/*.ckpt)")
        return Resume(path, ckpt)
    raise ConfigError(f"resume={path}: no such checkpoint or run folder (use auto, never, a .ckpt or a run folder)")
