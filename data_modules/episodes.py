"""The episode and batch format every training stream yields, and the image helpers that make episodes.

An episode is one dict: ``demo_images``, ``demo_texts``, ``query_image``, ``query_prompt``, ``query_target``
and ``source`` (where it came from); a batch of them is an `mmict.batch.EpisodeBatch`. Web documents
(`web_documents`) and a task's examples (`task_episodes`) both make them, so every method trains on either;
`collate_episodes` batches them in the worker that made them, and the modules read only the batch.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from mmict.batch import DEMO_SEPARATOR, EpisodeBatch

from .skips import drain_skips

ImageTransform = Callable[[Image.Image], torch.Tensor]


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB PIL image (raises on anything undecodable)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # convert() forces the full decode, so errors surface here


def collate_episodes(episodes: list[dict], *, skipped: dict[str, int] | None = None,
                     demo_ids: list[str] | None = None, demo_sources: list | None = None,
                     demo_separator: str = DEMO_SEPARATOR) -> EpisodeBatch:
    """Batch episodes into an `EpisodeBatch`; demonstrations are flattened in episode order, ``demo_counts``
    splits them back. The one function that builds a batch: training streams, the evaluation loop and the
    benchmarks all call it.

    Images stay lists of per-image inputs (not stacked): families with dynamic resolution (Qwen2-VL,
    LLaVA-NeXT tiles, Idefics crops) give images of different sizes; the backbone batches them. An episode's
    ``demo_images`` may be a lazy sequence (evaluation's demos decode only when read): sequences of one type that
    has a ``concat`` classmethod are joined by it, so nothing is decoded here.

    ``skipped``: corrupt samples skipped while making these episodes; by default this worker's skip counter is
    drained into the batch (it runs in the DataLoader worker that decoded them, and the main process sums them).
    ``demo_ids`` / ``demo_sources``: what identifies each demo (flattened), where the caller knows it.
    ``demo_separator``: what follows each demo's text in the prompt (the evaluation protocol's).
    """
    if not episodes:
        raise ValueError("collate_episodes needs at least one episode")
    return EpisodeBatch(
        demo_images=_concat([episode["demo_images"] for episode in episodes]),
        demo_texts=[text for episode in episodes for text in episode["demo_texts"]],
        demo_counts=[len(episode["demo_images"]) for episode in episodes],
        query_images=[episode["query_image"] for episode in episodes],
        query_prompts=[episode["query_prompt"] for episode in episodes],
        query_targets=[episode["query_target"] for episode in episodes],
        sources=[episode.get("source", "") for episode in episodes],
        demo_ids=demo_ids, demo_sources=demo_sources, demo_separator=demo_separator,
        skipped=drain_skips() if skipped is None else skipped,
    )


def _concat(sequences: list[Sequence]) -> Sequence:
    kinds = {type(s) for s in sequences}
    if len(kinds) == 1 and hasattr(kind := kinds.pop(), "concat"):
        return kind.concat(sequences)
    return [item for sequence in sequences for item in sequence]


__all__ = ["ImageTransform", "collate_episodes", "decode_image"]
