"""Lightning callbacks: data health (skipped samples), demo sampling (shots per step), RNG states and the run
record (exact resume), NaN/inf loss guard; the precision policy; the FSDP strategy builder (callbacks.fsdp)."""

from callbacks.data_health import SkippedSamplesReport
from callbacks.demo_sampler import DemoSampler
from callbacks.nan_guard import NonFiniteLossError, NonFiniteLossGuard
from callbacks.precision import PrecisionDecision, apply_precision_policy, resolve_precision
from callbacks.rng_state import RNGState
from callbacks.run_record import RunRecord

__all__ = [
    "DemoSampler",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PrecisionDecision",
    "RNGState",
    "RunRecord",
    "SkippedSamplesReport",
    "apply_precision_policy",
    "resolve_precision",
]
# FSDP: callbacks.fsdp.build_fsdp_strategy (imported on use: it loads torch.distributed.fsdp).
