"""Counting corrupt or malformed samples that the data pipelines skip.

A bad sample is skipped, never a crash, and never silent: every skip is counted under a short readable
reason ("image does not decode", "json does not parse", ...). DataLoader workers are separate processes,
so the counts live in a process-local Counter. The stage that builds a batch runs in the same process as
the decoding stages, so it drains the counter into the batch (key "skipped") and the main process sums
what the batches carry. Skips recorded after a worker's last batch of an epoch stay in that process and
ride along with its next batch (or are lost when a non-persistent worker exits).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

logger = logging.getLogger(__name__)

_counts: Counter[str] = Counter()


def record_skip(reason: str, n: int = 1) -> None:
    """Count ``n`` skipped samples under ``reason`` in this process."""
    _counts[reason] += n


def drain_skips() -> dict[str, int]:
    """Return the counts recorded in this process since the last drain, and reset them."""
    drained = dict(_counts)
    _counts.clear()
    return drained


def skip_handler(stage: str) -> Callable[[Exception], bool]:
    """A webdataset exception handler: count the error under ``"<stage>: <ExceptionType>"`` and go on.

    Used as ``handler=`` of the tar reading stages so that a truncated or unreadable shard costs its
    remaining samples, not the run.
    """

    def handler(exn: Exception) -> bool:
        record_skip(f"{stage}: {type(exn).__name__}")
        logger.debug("skipping after %s error: %s", stage, exn)
        return True

    return handler
