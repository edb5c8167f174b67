"""Random-number-generator states in the checkpoint, for resumes that give the same losses.

Lightning's checkpoints hold the model, optimizers, schedulers and loop counters, but not the RNG states:
a resumed run would draw other dropout masks (the M-Hub's Q-Former trains with dropout) than the run it
continues. This callback saves Python's, NumPy's and torch's (CPU and every CUDA device) generators with
each checkpoint and puts them back right before the first resumed training step: after validation and
loader setup, which must therefore not draw from the global generators (`EpisodeLoader` has its own).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class RNGState(L.Callback):
    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            # as plain ints: checkpoints load with torch.load(weights_only=True), which refuses numpy arrays
            "numpy": _plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # applied in on_train_start: anything between would shift the streams

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
