"""Stop a run that has diverged without a NaN: its loss far above where it started for many steps, or its trained
weights blown up (`trainer.divergence_guard`).

Beside the NaN guard (`nan_guard.py`), which only sees losses that stop being numbers. Two signs, each checked in
`on_before_backward`, i.e. before the step's backward pass and optimizer update:

- the loss: its starting value is the mean of the first `warmup` steps' losses; `patience` steps in a row above
  `factor` times that stop the run (a loss that has climbed away and stayed there, not a spike);
- the weights: the norm of the trained parameters above `weight_factor` times its value when training began.
  A learning rate such as `optim.lr=1e10` throws the weights to ~1e10 within a step or two, and a model that
  normalises its inputs (the toy's projector feeds an LM with RMSNorm) can keep a finite, merely mediocre loss
  with them: the loss never says so, the weights do. A healthy run moves its weights by far less (the toy's AIM
  projector, 300 steps at 1e-3: well under 10x).

The message names the sign, the step, the last checkpoint written before the trouble began (a checkpoint written
during a bad streak holds spoiled weights) and the command that continues from it with a lower learning rate.
The reference loss, streak and starting norm are saved with every checkpoint, so a resumed run keeps judging
against the run's own start. Under DDP/FSDP every rank takes the same decision (one stops all).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from callbacks.nan_guard import TrainingStoppedError, checkpoint_before, go_on


class LossDivergedError(TrainingStoppedError):
    """The loss stayed far above its starting value, or the trained weights blew up; stopped before the update."""


class DivergenceGuard(L.Callback):
    def __init__(self, factor: float = 4.0, patience: int = 20, warmup: int = 10, weight_factor: float | None = 100.0,
                 monitor: str = "train/loss") -> None:
        if not (factor > 1 and patience >= 1 and warmup >= 1 and (weight_factor is None or weight_factor > 1)):
            raise ValueError(f"DivergenceGuard needs factor > 1, patience >= 1, warmup >= 1 and weight_factor > 1 or "
                             f"None (got {factor}, {patience}, {warmup}, {weight_factor})")
        self.factor, self.patience, self.warmup, self.weight_factor = factor, patience, warmup, weight_factor
        self.monitor = monitor
        self.reference: list[float] = []  # the first `warmup` losses
        self.streak = 0  # steps in a row above factor x their mean
        self.streak_start = -1  # global_step of the streak's first step
        self.start_norm: float | None = None  # the trained weights' norm when training began

    # ---- checkpointed state: a resumed run judges against this run's own start ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"reference": list(self.reference), "streak": self.streak, "streak_start": self.streak_start,
                "start_norm": self.start_norm}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = [float(v) for v in state_dict.get("reference", [])]
        self.streak = int(state_dict.get("streak", 0))
        self.streak_start = int(state_dict.get("streak_start", -1))
        self.start_norm = state_dict.get("start_norm")

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.weight_factor is not None and self.start_norm is None:
            self.start_norm = weight_norm(pl_module)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        step = trainer.global_step
        reason = self.observe(float(loss.detach().float().mean()), step) or self.weights(pl_module, step)
        bad = reason is not None
        # Every rank must stop together (a lone rank raising would leave the others hanging in all-reduce).
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            reason = reason or ("another rank's loss or weights diverged", step)
            raise LossDivergedError(self.message(trainer, pl_module, *reason))

    def observe(self, value: float, step: int) -> tuple[str, int] | None:
        """Take one step's loss; (what is wrong, global_step it began at) once the streak reaches `patience`."""
        if not math.isfinite(value):
            return None  # the NaN guard's case
        if len(self.reference) < self.warmup:
            self.reference.append(value)
            return None
        start = sum(self.reference) / len(self.reference)
        if value <= self.factor * start:
            self.streak, self.streak_start = 0, -1
            return None
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        if self.streak < self.patience:
            return None
        return (f"{self.monitor} has been above {self.factor:g} x its starting value ({start:.4g}, the mean of the "
                f"first {len(self.reference)} steps' losses) for {self.streak} steps in a row (now {value:.4g}; "
                f"trainer.divergence_guard.factor, .patience)", self.streak_start)

    def weights(self, pl_module: L.LightningModule, step: int) -> tuple[str, int] | None:
        """(what is wrong, global_step) when the trained weights' norm is past `weight_factor` x its start."""
        if self.weight_factor is None or not self.start_norm:
            return None
        norm = weight_norm(pl_module)
        if norm <= self.weight_factor * self.start_norm and math.isfinite(norm):
            return None
        return (f"the trained weights' norm is {norm:.4g}, {norm / self.start_norm:.3g} x its {self.start_norm:.4g} "
                f"when training began (the limit is {self.weight_factor:g} x: trainer.divergence_guard.weight_factor); "
                "updates that large mean the learning rate (optim.lr) is far too high", step)

    def message(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str, began: int) -> str:
        step = trainer.global_step
        text = (f"training diverged: {what}. Stopped at training step {step + 1} (global_step {step}) before the "
                "optimizer step.")
        good = checkpoint_before(trainer, began)
        if good is not None:
            text += (f" The trouble began at global_step {began}; the last checkpoint written before it: {good[0]} "
                     f"(step {good[1]}).")
        else:
            text += f" The trouble began at global_step {began}, before any checkpoint was written."
        return (text + " " + go_on(trainer, pl_module, good[0] if good else None) +
                " (trainer.divergence_guard=null turns this check off.)")


def weight_norm(pl_module: L.LightningModule) -> float:
    """The L2 norm of the module's trained parameters (on this rank: its shards under FSDP; ratios to the start are
    what is compared, so a rank-local norm serves)."""
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in pl_module.parameters()
             if p.requires_grad and p.numel()]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
