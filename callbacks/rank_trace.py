"""What each rank trained on, step by step: a debug record for checking multi-process training.

Set ``MMICT_RANK_TRACE=<folder>`` and every rank appends one JSON line per trained batch to
``<folder>/rank<global rank>.jsonl``: the step the batch was for, the global step after it, its data epoch, the
documents its episodes were cut from (``shard.tar#key``) and its loss on this rank. That is enough to check that
the ranks ran the same number of batches, that no document was read twice in an epoch across them, and that their
losses average to the one-process loss of the same global batch (tests/mmict/training/test_ddp_cpu.py). Without the
variable the callback is not even added (`enabled`), so normal runs pay nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

ENV = "MMICT_RANK_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


class RankTrace(L.Callback):
    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder or os.environ[ENV])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        resume = getattr(batch, "resume", None) or {}
        record = {
            "rank": trainer.global_rank, "step": getattr(batch, "step", None), "global_step": trainer.global_step,
            "epoch": resume.get("epoch"), "sources": list(getattr(batch, "sources", [])),
            "loss": float(loss.detach()) if isinstance(loss, torch.Tensor) else None, "pid": os.getpid(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        # one short line per write, flushed at once: a run killed mid-step leaves every earlier line whole
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
