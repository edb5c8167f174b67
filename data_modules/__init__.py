"""LightningDataModules over webdataset shards, and skip counting (the toy world's writers are in mmict.toy).

The names below are imported on first use (PEP 562), not with the package: `data_modules.converters` (what
`mmict data convert --help` lists) must not pull Lightning and torch in through this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real imports, for type checkers and the import-graph test
    from .downstream import DownstreamDataModule, Example, load_examples
    from .episodes import collate_episodes
    from .skips import drain_skips, record_skip, skip_handler
    from .web_corpus import WebCorpusDataModule

_WHERE = {
    "DownstreamDataModule": "downstream",
    "Example": "downstream",
    "load_examples": "downstream",
    "collate_episodes": "episodes",
    "drain_skips": "skips",
    "record_skip": "skips",
    "skip_handler": "skips",
    "WebCorpusDataModule": "web_corpus",
}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
