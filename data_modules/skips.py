"""Counting corrupt or malformed samples that the data pipelines skip.

A bad sample is skipped, never a crash, and never silent: every skip is counted under a short readable
reason ("image does not decode", "json does not parse", ...). DataLoader workers are separate processes,
so the counts live in a process-local Counter. The stage that builds a batch runs in the same process as
the decoding stages, so it drains the counter into the batch (key "skipped") and the main process sums
what the batches carry. Skips recorded after a worker's last batch of an epoch stay in that process and
ride along with its next batch (or are lost when a non-persistent worker exits).

An evaluation reads its splits in the main process and reports what each lost as a `SplitLoss`: the skipped
examples by reason, the shards that broke off or held nothing, and the samples missing against the size the
split's converter (``<split>.summary.json``) or the toy world's manifest recorded.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_counts: Counter[str] = Counter()


def record_skip(reason: str, n: int = 1) -> None:
    """Count ``n`` skipped samples under ``reason`` in this process."""
    _counts[reason] += n


# Texts cut to a budget (`text_budget`) are kept, not skipped, but counted and reported the same way, under reasons
# with this prefix; the report (`callbacks.data_health`) counts them apart from the skipped samples.
CUT_PREFIX = "cut: "


def record_cut(reason: str, n: int = 1) -> None:
    """Count ``n`` texts shortened (kept, not skipped) under ``reason``, e.g. "text to 512 tokens"."""
    _counts[CUT_PREFIX + reason] += n


def is_cut(reason: str) -> bool:
    """Whether a reported reason (possibly prefixed by its stage, "train/cut: ...") counts cut texts."""
    return reason.rpartition("/")[2].startswith(CUT_PREFIX) or reason.startswith(CUT_PREFIX)


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


@dataclass
class SplitLoss:
    """What one split lost on its way into an evaluation: ``reasons``, the examples skipped by reason (those in
    broken or missing shards included when the split's recorded size tells how many); ``shards``, shard name ->
    what was wrong with it; ``kept``, the examples used; ``recorded``, the split's size as written (None: unknown)."""

    kept: int
    reasons: dict[str, int] = field(default_factory=dict)
    shards: dict[str, str] = field(default_factory=dict)
    recorded: int | None = None

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def __bool__(self) -> bool:
        """Whether anything was lost."""
        return bool(self.reasons or self.shards)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": self.skipped, "reasons": dict(self.reasons), "shards": dict(self.shards),
                "recorded": self.recorded}

    def describe(self, noun: str) -> str:
        """E.g. "4 test queries (image does not decode: 3, json does not parse: 1)", the broken shards after the
        reasons ("...; shards train-000001.tar broke off after 6 samples ...")."""
        said = ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        if self.shards:
            said += ("; " if said else "") + "shards " + ", ".join(f"{n} {w}" for n, w in self.shards.items())
            if self.recorded is None:
                said += " (what they lost is not counted: no converter summary or toy manifest records the size)"
        return f"{self.skipped} {noun} ({said})" if self.reasons else f"{noun}: {said}"


def skip_line(losses: Mapping[str, SplitLoss | None], nouns: Mapping[str, str]) -> str | None:
    """One line over every split that lost something ("Skipped: 4 test queries (...); 3 pool examples (...)"), or
    None when nothing was lost. ``nouns``: what a split's examples are called ("test queries", "pool examples")."""
    said = [loss.describe(nouns.get(name, name)) for name, loss in losses.items() if loss]
    return "Skipped: " + "; ".join(said) if said else None


def skip_record(losses: Mapping[str, SplitLoss | None]) -> dict:
    """The JSON record: per split its skipped examples by reason, and every split's details under "detail"."""
    return {**{name: dict(loss.reasons) if loss else {} for name, loss in losses.items()},
            "detail": {name: loss.as_dict() for name, loss in losses.items() if loss is not None}}


def broken_shards(shards: Sequence[tuple[str, int, int, Sequence[str]]]) -> dict[str, str]:
    """Shard name -> what was wrong with it, for the shards that broke off (a tar error: the rest of the shard is
    lost), could not be read or held nothing; ``shards``: (name, first sample position, end position, tar errors)."""
    out = {}
    for name, start, end, errors in shards:
        why = ", ".join(sorted(set(errors)))
        if errors:
            out[name] = (f"broke off after {end - start} samples ({why}): the rest of it is lost" if end > start
                         else f"is unreadable or empty ({why})")
        elif end == start:
            out[name] = "is empty"
    return out


def recorded_size(root: str | Path, folder: str, split: str) -> tuple[int, list[str]] | None:
    """The size a split was written with and its shard names: from its converter's summary
    (``root/folder/<split>.summary.json``), else the toy world's manifest (``root/manifest.json``); None if
    neither records it (or it does not parse)."""
    root = Path(root)
    try:
        summary = root / folder / f"{split}.summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            return int(data["written"]), [str(s) for s in data.get("shards", [])]
        manifest = root / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            count = data["counts"].get(f"{folder}/{split}")
            names = [Path(s).name for s in data.get("shards", {}).get(f"{folder}/{split}", [])]
            return (int(count), names) if count is not None else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.debug("the recorded size of %s/%s does not read: %s", folder, split, e)
    return None
