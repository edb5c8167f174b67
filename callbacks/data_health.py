"""Reports the samples the data pipeline skipped (corrupt, malformed, unusable).

DataLoader workers count skips in their own process and put the counts into each batch under
"skipped" (`data_modules.skips`); this callback sums them in the main process, logs the total, and
prints a summary per reason at the end of each epoch and of the run. Nothing is skipped silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from data_modules.skips import is_cut
from mmict.batch import EpisodeBatch

log = logging.getLogger(__name__)


class SkippedSamplesReport(L.Callback):
    def __init__(self, report_path: str | Path | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.report_path = Path(report_path) if report_path else None

    def _add(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, stage: str) -> None:
        skipped = batch.skipped if isinstance(batch, EpisodeBatch) else None
        if skipped:
            self.counts.update({f"{stage}/{k}": v for k, v in skipped.items()})
            pl_module.log("data/skipped_total", float(self._total(cut=False)), reduce_fx="max")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._add(trainer, pl_module, batch, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._add(trainer, pl_module, batch, "val")

    def _total(self, cut: bool) -> int:
        """Skipped samples (cut=False) or texts cut to the token budget, kept (cut=True; `skips.record_cut`)."""
        return sum(n for reason, n in self.counts.items() if is_cut(reason) == cut)

    def summary(self) -> str:
        if not self.counts:
            return "data: no samples skipped"
        cut = self._total(cut=True)
        lines = [f"data: {self._total(cut=False)} samples skipped" + (f"; {cut} texts cut (kept)" if cut else "")]
        lines += [f"  {n:6d}  {reason}" for reason, n in self.counts.most_common()]
        return "\n".join(lines)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.counts:
            rank_zero_info(self.summary())

    def on_fit_end(self, trainer, pl_module) -> None:
        rank_zero_info(self.summary())
        if self.report_path is not None and trainer.is_global_zero:
            self.report_path.write_text(json.dumps(dict(self.counts), indent=2, sort_keys=True))

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = Counter(state_dict.get("counts", {}))
