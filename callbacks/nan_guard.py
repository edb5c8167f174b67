"""Stop a run at the first non-finite (NaN / inf) training loss, before it can spoil weights or checkpoints.

The check runs in `on_before_backward`, i.e. before the backward pass and the optimizer step of the bad
batch: the weights still hold the last good update, and no checkpoint is written after the bad step (the
run ends with an exception, and `ModelCheckpoint` only saves on its own schedule), so the newest checkpoint
on disk (`checkpoints/last.ckpt`, `stepNNNNNN.ckpt`) is the last good one. The message names the step, the
batch and that checkpoint.

Under DDP/FSDP every rank takes the same decision (a NaN on any rank stops all of them), so no rank is left
waiting in a collective.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
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
            raise NonFiniteLossError(self.message(trainer, loss))

    def message(self, trainer: L.Trainer, loss: torch.Tensor) -> str:
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
                 "or a broken batch; resume from the checkpoint with a lower lr.")
        return text


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
