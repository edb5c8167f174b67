"""Lightning callbacks, and nothing else: data health (skipped samples), demo sampling (shots per step), RNG
states and the run record (exact resume), the NaN/inf loss and divergence guards, the checkpoint and exit status
on SIGTERM / SIGINT. The precision policy and the FSDP strategy, which are not callbacks, live in `mmict.training`.

The names below are imported on first use (PEP 562), not with the package, so that importing one callback module
does not import Lightning for all of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports, for type checkers and the import-graph test
    from callbacks.data_health import SkippedSamplesReport
    from callbacks.demo_sampler import DemoSampler
    from callbacks.divergence_guard import DivergenceGuard, LossDivergedError
    from callbacks.nan_guard import NonFiniteLossError, NonFiniteLossGuard, TrainingStoppedError
    from callbacks.rng_state import RNGState
    from callbacks.run_record import RunRecord
    from callbacks.signals import SignalCheckpoint, StoppedBySignal

_WHERE = {
    "SkippedSamplesReport": "data_health",
    "DemoSampler": "demo_sampler",
    "DivergenceGuard": "divergence_guard",
    "LossDivergedError": "divergence_guard",
    "NonFiniteLossError": "nan_guard",
    "NonFiniteLossGuard": "nan_guard",
    "TrainingStoppedError": "nan_guard",
    "RNGState": "rng_state",
    "RunRecord": "run_record",
    "SignalCheckpoint": "signals",
    "StoppedBySignal": "signals",
}

__all__ = [
    "DemoSampler",
    "DivergenceGuard",
    "LossDivergedError",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "RNGState",
    "RunRecord",
    "SignalCheckpoint",
    "SkippedSamplesReport",
    "StoppedBySignal",
    "TrainingStoppedError",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"callbacks.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
