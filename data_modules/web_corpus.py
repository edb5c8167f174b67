"""`WebCorpusDataModule`: training episodes from an interleaved web corpus (MMC4, OBELICS), for Lightning.

The engine (shards split over ranks and workers, exact resume, the loaders) is `streaming_module`'s
`StreamingDataModule`; how documents become episodes is `web_documents`'. This module only says where the
corpus is, what to call it in errors, and how the images are filtered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .streaming_module import StreamingDataModule
from .text_budget import TextBudget
from .web_documents import EpisodeStream


class WebCorpusDataModule(StreamingDataModule):
    """Episodes from interleaved web documents under ``root/<corpus>/{train,val}-*.tar``.

    Everything but the corpus is `StreamingDataModule`'s (epoch size, shot policy, exact resume, the
    ``state_dict`` saved with the checkpoint). ``min_similarity`` and ``min_image_size`` filter the images
    of each document (`web_documents.document_pairs`); every text an episode takes is cut to ``max_text_tokens``
    tokens of ``tokenizer`` (the backbone's; None: to 8 characters per token), and each cut counted
    (`text_budget.TextBudget`).
    """

    stream_class = EpisodeStream

    def __init__(self, root: str | Path, *, corpus: str = "web", min_similarity: float | None = None,
                 min_image_size: int = 0, max_text_tokens: int = 512, tokenizer: Any = None, **kwargs: Any) -> None:
        """`kwargs`: `StreamingDataModule`'s (image_transform, batch_size, num_workers, shots, epoch_size, ...)."""
        super().__init__(root, **kwargs)
        self.corpus = corpus
        self.min_similarity = min_similarity
        self.min_image_size = min_image_size
        self.text_budget = TextBudget(max_text_tokens, tokenizer)  # refuses a budget below 1 here, not in a worker

    @property
    def folder(self) -> str:
        return self.corpus

    def _describe(self, split: str) -> str:
        return "The web corpus"

    def _build_command(self) -> str:
        return (f"mmict data convert mmc4 --in <mmc4 docs> --images <image folder> "
                f"--out {self.root / self.folder}/train-%06d.tar   (or: obelics)")

    def _stream_extra(self) -> dict[str, Any]:
        return {"min_similarity": self.min_similarity, "min_image_size": self.min_image_size,
                "text_budget": self.text_budget}


__all__ = ["WebCorpusDataModule"]
