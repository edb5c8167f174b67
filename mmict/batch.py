"""The episode batch: what every training stream, the evaluation loop and the benchmarks hand a method.

An episode is k demonstrations (image + text) and one query (image, prompt, target). A batch holds several,
with their demonstrations flattened in episode order: `demo_counts[b]` says how many belong to episode b, and
`demos_of(b)` gives their slice. Images stay lists of per-image model inputs, not stacked tensors: families
with dynamic resolution (Qwen2-VL, LLaVA-NeXT tiles, Idefics crops) give images of different sizes, and the
backbone adapter batches them. `data_modules.episodes.collate_episodes` is the one function that builds it.

What a method may need beyond the episode content rides along as typed fields, so nothing is parked on a module
between calls: the demos' ids and image sources (the demonstration bank looks readings up by them), and the
stream bookkeeping (`step`, `resume`: where the stream stands, for exact resume; `skipped`: corrupt samples the
DataLoader worker skipped while making the batch, summed by the `SkippedSamplesReport` callback).

Lightning moves a batch to the device field by field (dataclasses are collections to its `apply_to_collection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# What follows each demo's text in a prompt unless a batch says otherwise: one space, so word-level text does not
# glue to what comes next. The evaluation protocol may set another (OpenFlamingo's: "<|endofchunk|>\n").
DEMO_SEPARATOR = " "


@dataclass
class EpisodeBatch:
    demo_images: list[Any]  # every episode's demo images, flattened in episode order
    demo_texts: list[str]
    demo_counts: list[int]  # demos per episode; sum(demo_counts) == len(demo_images)
    query_images: list[Any]
    query_prompts: list[str]
    query_targets: list[str]
    sources: list[str] = field(default_factory=list)  # where each episode came from (shard, document)
    demo_ids: list[str] | None = None  # stable ids of the demos (evaluation: the pool's example ids)
    demo_sources: list[Any] | None = None  # what identifies each demo's image without decoding it (the bank)
    skipped: dict[str, int] = field(default_factory=dict)
    step: int | None = None  # the global batch index in the stream (the shot policy's schedule)
    resume: dict[str, Any] | None = None  # the stream position after this batch (exact resume)
    demo_separator: str = DEMO_SEPARATOR  # after each demo's text (mmict.eval.protocol: per protocol and model)

    def __post_init__(self) -> None:
        n = len(self.query_targets)
        if not (len(self.demo_counts) == len(self.query_images) == len(self.query_prompts) == n):
            raise ValueError(f"an episode batch needs one demo count, query image and prompt per query target "
                             f"(got {len(self.demo_counts)}, {len(self.query_images)}, {len(self.query_prompts)} "
                             f"for {n} targets)")
        if sum(self.demo_counts) != len(self.demo_images) or len(self.demo_texts) != len(self.demo_images):
            raise ValueError(f"demo_counts sum to {sum(self.demo_counts)} but the batch holds "
                             f"{len(self.demo_images)} demo images and {len(self.demo_texts)} demo texts")

    def __len__(self) -> int:
        """The number of episodes (queries)."""
        return len(self.query_targets)

    def demos_of(self, b: int) -> slice:
        """The slice of the flattened demo lists that belongs to episode `b`."""
        start = sum(self.demo_counts[:b])
        return slice(start, start + self.demo_counts[b])

    def head(self, n: int) -> EpisodeBatch:
        """The first `n` episodes (the same stream bookkeeping)."""
        k = sum(self.demo_counts[:n])
        return replace(
            self, demo_images=self.demo_images[:k], demo_texts=self.demo_texts[:k], demo_counts=self.demo_counts[:n],
            query_images=self.query_images[:n], query_prompts=self.query_prompts[:n],
            query_targets=self.query_targets[:n], sources=self.sources[:n],
            demo_ids=None if self.demo_ids is None else self.demo_ids[:k],
            demo_sources=None if self.demo_sources is None else self.demo_sources[:k],
        )


__all__ = ["DEMO_SEPARATOR", "EpisodeBatch"]
