"""LightningDataModules over webdataset shards, the toy world, and skip counting."""

from .downstream import DownstreamDataModule, Example, load_examples
from .skips import drain_skips, record_skip, skip_handler
from .toy_world import (
    COLORS,
    POSITIONS,
    SHAPES,
    draw_shape,
    toy_vocabulary,
    toy_world_exists,
    vqa_demo_text,
    vqa_prompt,
    write_toy_world,
)
from .web_corpus import WebCorpusDataModule, collate_episodes

__all__ = [
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "DownstreamDataModule",
    "Example",
    "WebCorpusDataModule",
    "collate_episodes",
    "draw_shape",
    "drain_skips",
    "load_examples",
    "record_skip",
    "skip_handler",
    "toy_vocabulary",
    "toy_world_exists",
    "vqa_demo_text",
    "vqa_prompt",
    "write_toy_world",
]
