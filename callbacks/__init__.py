"""Lightning callbacks: data health (skipped samples), demo sampling (shots per step)."""

from callbacks.data_health import SkippedSamplesReport
from callbacks.demo_sampler import DemoSampler

__all__ = ["DemoSampler", "SkippedSamplesReport"]
