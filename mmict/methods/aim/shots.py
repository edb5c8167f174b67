"""The shots AIM actually trained on: how many training episodes showed k demos, for every k.

The shot policy says what k a step asks for; a web document gives at most the image-text pairs it holds after the
similarity filter (MMC4 at 0.24: mostly 1-3), so what training realised can be far below what evaluation shows
(up to 16 or 32). `ShotCounts` keeps the realised histogram: counted per training batch (`EpisodeBatch.demo_counts`,
summed over the ranks), kept in the checkpoint (``checkpoint["mmict"]["trained_shots"]``), written to the run
folder (`trained_shots.json`) and to loggers that take tables at the end of training, and read by evaluation
(`AIMModule.trained_shots`, the line under a results table: `report.trained_shots_line`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "trained_shots"  # under checkpoint["mmict"]
FILE_NAME = "trained_shots.json"  # in the run folder


class ShotCounts:
    """Episodes per realised shot count. Unknown (`as_dict()` is None) before any training episode, and for good
    once a checkpoint without a histogram was loaded (trained before it was kept): counting on from there would
    pass part of a training run off as the whole."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.known = True

    def add(self, demo_counts: Sequence[int]) -> None:
        if self.known:
            self.counts.update(int(k) for k in demo_counts)

    def as_dict(self) -> dict[int, int] | None:
        if not self.known or not self.counts:
            return None
        return {k: self.counts[k] for k in sorted(self.counts)}

    def save(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("mmict", {})[CHECKPOINT_KEY] = self.as_dict()

    def load(self, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get("mmict") or {}).get(CHECKPOINT_KEY)
        self.counts = Counter({int(k): int(n) for k, n in (saved or {}).items()})
        # A checkpoint of a run that trained without keeping the histogram: unknown, not empty.
        self.known = saved is not None or not checkpoint.get("global_step")


def gather_demo_counts(module: Any, demo_counts: Sequence[int], batch_size: int) -> list[int]:
    """Every rank's demo counts of this step (one small all-gather, padded to `batch_size` with -1); this rank's
    own without a trainer or with one process."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size <= 1:
        return list(demo_counts)
    if len(demo_counts) > batch_size:
        raise ValueError(f"a training batch of {len(demo_counts)} episodes is larger than data.batch_size="
                         f"{batch_size}: the shot histogram cannot be gathered over the ranks")
    local = torch.full((batch_size,), -1, dtype=torch.long, device=module.device)
    local[: len(demo_counts)] = torch.tensor(list(demo_counts), dtype=torch.long)
    gathered = module.all_gather(local).reshape(-1)
    return [int(k) for k in gathered.tolist() if k >= 0]


def summary(trained: dict[int, int]) -> str:
    """E.g. "1: 480, 2: 420, 3: 300 (1200 episodes, mean 1.85, max 3)"."""
    total = sum(trained.values())
    mean = sum(k * n for k, n in trained.items()) / total
    return (", ".join(f"{k}: {n}" for k, n in sorted(trained.items()))
            + f" ({total} episodes, mean {mean:.2f}, max {max(trained)})")


def report(trained: dict[int, int] | None, run_dir: str | Path | None, loggers: Sequence[Any]) -> Path | None:
    """The histogram in the run folder (`trained_shots.json`) and in every logger that takes tables (W&B); the
    json's path, or None when nothing was trained or there is no run folder."""
    if trained is None:
        return None
    rows = [[k, n] for k, n in sorted(trained.items())]
    for logger in loggers:
        if hasattr(logger, "log_table"):  # WandbLogger; CSV has no tables: the json is its record
            logger.log_table(key="train/trained_shots", columns=["shots", "episodes"], data=rows)
    log.info("demos per training episode: %s", summary(trained))
    if run_dir is None:
        return None
    path = Path(run_dir) / FILE_NAME
    path.write_text(json.dumps({"episodes_per_shot_count": {str(k): n for k, n in rows},
                                "episodes": sum(trained.values()), "max_shots": max(trained)}, indent=2))
    return path
