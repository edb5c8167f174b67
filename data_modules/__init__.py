"""LightningDataModules over webdataset shards, and skip counting (the toy world's writers are in mmict.toy)."""

from .downstream import DownstreamDataModule, Example, load_examples
from .episodes import collate_episodes
from .skips import drain_skips, record_skip, skip_handler
from .web_corpus import WebCorpusDataModule

__all__ = [
    "DownstreamDataModule",
    "Example",
    "WebCorpusDataModule",
    "collate_episodes",
    "drain_skips",
    "load_examples",
    "record_skip",
    "skip_handler",
]
