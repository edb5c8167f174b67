"""Lightning callbacks (data health now; demo sampling, precision and FSDP builders join here)."""

from callbacks.data_health import SkippedSamplesReport

__all__ = ["SkippedSamplesReport"]
