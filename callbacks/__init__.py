"""Lightning callbacks, and nothing else: data health (skipped samples), demo sampling (shots per step), RNG
states and the run record (exact resume), the NaN/inf loss guard. The precision policy and the FSDP strategy,
which are not callbacks, live in `mmict.training`."""

from callbacks.data_health import SkippedSamplesReport
from callbacks.demo_sampler import DemoSampler
from callbacks.nan_guard import NonFiniteLossError, NonFiniteLossGuard
from callbacks.rng_state import RNGState
from callbacks.run_record import RunRecord

__all__ = [
    "DemoSampler",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "RNGState",
    "RunRecord",
    "SkippedSamplesReport",
]
