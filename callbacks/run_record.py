"""Which run a checkpoint belongs to: its run folder and W&B run id, saved with every checkpoint.

A resumed run continues the same W&B run: `train` derives the id from the run folder, and this record lets
anyone holding only the checkpoint find both (and warns when a checkpoint is resumed into another run).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn


class RunRecord(L.Callback):
    def __init__(self, run_dir: str, wandb_id: str) -> None:
        self.run_dir = run_dir
        self.wandb_id = wandb_id

    def state_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "wandb_id": self.wandb_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("wandb_id") not in (None, self.wandb_id):
            rank_zero_warn(f"this checkpoint belongs to run {state_dict.get('run_dir')} (W&B id "
                           f"{state_dict.get('wandb_id')}); it continues here as {self.run_dir} ({self.wandb_id})")
