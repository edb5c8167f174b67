"""The shot count of every training step: fixed, uniform in a range, or a schedule over training.

`DemoSampler` owns the run's `ShotPolicy` (`data_modules.shots`). At setup it hands the policy to the data
module, whose workers cut each episode with the k of the step that episode is for (deterministic in
(seed, step, episode), so no demo is decoded for nothing and a resume gives the same shots). During
training it checks that every batch was cut for the step it trains (a stream out of step with the trainer
would silently give other shot counts), logs the shots, and keeps the policy in the checkpoint: resuming
under a different policy is said, not silent.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from data_modules.shots import ShotPolicy
from mmict.batch import EpisodeBatch

log = logging.getLogger(__name__)


class DemoSampler(L.Callback):
    def __init__(self, policy: ShotPolicy) -> None:
        self.policy = policy
        self.loaded_policy: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "shot_policy"):
            raise TypeError(f"DemoSampler needs a data module with a `shot_policy` (got {type(datamodule).__name__})")
        datamodule.shot_policy = self.policy
        rank_zero_info(f"demos per episode: {self.policy.describe()}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = batch.step if isinstance(batch, EpisodeBatch) else None
        expected = trainer.fit_loop.total_batch_idx
        if step is not None and step != expected:
            raise RuntimeError(f"the data stream gave the batch for step {step} at step {expected}: its shot counts "
                               "would not follow the schedule (was the loader built outside the data module?)")
        counts = batch.demo_counts if isinstance(batch, EpisodeBatch) else None
        if counts:
            stage = self.policy.stage(expected)
            pl_module.log("train/shots_min", float(min(counts)), batch_size=len(counts))
            pl_module.log("train/shots_max", float(max(counts)), batch_size=len(counts))
            pl_module.log("train/shots_stage_max", float(stage.max_shots), batch_size=len(counts))

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded_policy = state_dict.get("policy")
        if self.loaded_policy is not None and self.loaded_policy != self.policy.to_dict():
            rank_zero_warn(f"resuming with another shot policy than the checkpoint's: now {self.policy.describe()}; "
                           f"checkpoint: {self.loaded_policy}")

