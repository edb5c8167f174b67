"""Stop a run at the first non-finite (NaN / inf) training loss, before it can spoil weights or checkpoints.

The check runs in `on_before_backward`, i.e. before the backward pass and the optimizer step of the bad
batch: the weights still hold the last good update, and no checkpoint is written after the bad step (the
run ends with an exception, and `ModelCheckpoint` only saves on its own schedule), so the newest checkpoint
on disk (`checkpoints/last.ckpt`, `stepNNNNNN.ckpt`) is the last good one. The message names the step, the
batch, that checkpoint and the command that continues the run from it with a lower learning rate (a resume
applies the command's `optim.lr` over the checkpoint's: mmict/methods/base.py).

Under DDP/FSDP every rank takes the same decision (a NaN on any rank stops all of them), so no rank is left
waiting in a collective.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class TrainingStoppedError(RuntimeError):
    """A guard stopped the run before an optimizer step; the message says why and how to go on."""


class NonFiniteLossError(TrainingStoppedError):
    """Training produced a NaN / inf loss; the run was stopped before the optimizer step."""


class NonFiniteLossGuard(L.Callback):
    def __init__(self, monitor: str = "train/loss") -> None:
        self.monitor = monitor

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        # Every rank must stop together (a lone rank raising would leave the others hanging in all-reduce).
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(self.message(trainer, loss, pl_module))

    def message(self, trainer: L.Trainer, loss: torch.Tensor, pl_module: L.LightningModule | None = None) -> str:
        value = loss.detach().float().flatten()[0].item() if loss.numel() else float("nan")
        step = trainer.global_step  # optimizer steps done so far: this batch would have made step + 1
        text = (f"{self.monitor} is {value} at training step {step + 1} (global_step {step}, epoch "
                f"{trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}); training stopped before "
                f"the optimizer step, so no weight was updated with it and no checkpoint was written after it.")
        last = last_checkpoint(trainer)
        if last is not None:
            text += f" Last good checkpoint: {last[0]} (step {last[1]})."
        else:
            text += " No checkpoint was written before it (checkpoints are saved every "
            text += "trainer.checkpoint_every_n_steps steps)."
        text += (" Usual causes: a learning rate too high (optim.lr), fp16 overflow (try bf16-mixed or 32-true), "
                 "or a broken batch. " + go_on(trainer, pl_module, last[0] if last else None))
        return text


def go_on(trainer: L.Trainer, pl_module: L.LightningModule | None, checkpoint: str | None) -> str:
    """The sentence that says how to go on: continue from `checkpoint` with a tenth of the learning rate, or (no
    checkpoint) start the run again with it."""
    command = retry_command(trainer, pl_module, checkpoint)
    if checkpoint is None:
        return f"Start it again with a lower learning rate: {command}"
    return (f"Continue from that checkpoint with a lower learning rate (the resume applies it over the "
            f"checkpoint's and says so): {command}")


def retry_command(trainer: L.Trainer, pl_module: L.LightningModule | None, checkpoint: str | None) -> str:
    """`mmict train <the run's config.yaml> resume=<checkpoint> optim.lr=<a tenth of the run's>`.

    The run folder's config.yaml is the run's whole config (its command-line overrides included), so the command
    repeats the run exactly but for the learning rate; without one (a Trainer built outside `mmict train`) the
    experiment's name stands in. Without a checkpoint the command starts a new run."""
    config: dict[str, Any] = dict((getattr(pl_module, "hparams", None) or {}).get("config") or {})
    lr = (config.get("optim") or {}).get("lr")
    if lr is None and trainer.optimizers:
        group = trainer.optimizers[0].param_groups[0]
        lr = group.get("initial_lr", group["lr"])
    run_dir = _run_dir(trainer)
    saved = run_dir / "config.yaml" if run_dir is not None else None
    experiment = str(saved) if saved is not None and saved.is_file() else str(config.get("name") or "<experiment>")
    words = ["mmict", "train", experiment]
    if checkpoint is not None:
        words.append(f"resume={checkpoint}")
    if lr:
        words.append(f"optim.lr={float(lr) / 10:.3g}")
    return shlex.join(words)


def _run_dir(trainer: L.Trainer) -> Path | None:
    """The run folder: the one above ModelCheckpoint's `checkpoints/` folder (`mmict train`'s layout)."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath).parent
    return None


def checkpoint_before(trainer: L.Trainer, step: int) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint written before training step `step` (global_step), if any: the last one
    whose weights are from before a problem that began there. A step-numbered file is preferred to `last.ckpt`,
    which the next save overwrites."""
    found: list[tuple[int, bool, str]] = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath).is_dir():
            for path in Path(cb.dirpath).glob("*.ckpt"):
                saved = _step_of(str(path))
                if 0 <= saved < step:
                    found.append((saved, path.name != "last.ckpt", str(path)))
    if not found:
        return None
    saved, _, path = max(found)
    return path, saved


def last_checkpoint(trainer: L.Trainer) -> tuple[str, int] | None:
    """(path, step) of the newest checkpoint the run's ModelCheckpoint wrote, if any."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            path = cb.last_model_path or cb.best_model_path
            if not path and cb.dirpath and Path(cb.dirpath).is_dir():
                saved = sorted(Path(cb.dirpath).glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
                path = str(saved[-1]) if saved else ""
            if path:
                return path, _step_of(path)
    return None


def _step_of(path: str) -> int:
    """The training step a checkpoint was written at, read from the file itself (memory-mapped: the tensors
    are not loaded), rather than from ModelCheckpoint's private bookkeeping; -1 when it cannot be read."""
    import torch

    try:
        step = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    except (OSError, RuntimeError, ValueError, AttributeError):
        return -1
    return int(step) if isinstance(step, int) and step >= 0 else -1
