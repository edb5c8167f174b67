"""`StreamingDataModule`: the LightningDataModule side of the streaming engine (`streaming`), for any stream.

It finds a split's shards (or says which command writes them), builds the stream and `EpisodeLoader` for the
rank it runs on, and keeps the stream position of every trained batch for the checkpoint, so that a resumed
run continues the data exactly where it stopped. `web_corpus.WebCorpusDataModule` and
`task_episodes.TaskEpisodeDataModule` are this with their own stream and shard names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmict.batch import EpisodeBatch

from .episodes import ImageTransform
from .shots import ShotPolicy
from .streaming import EpisodeLoader, ShardStream, find_shards, missing_shards_error

logger = logging.getLogger(__name__)


class StreamingDataModule(L.LightningDataModule):
    """Training episodes streamed from ``root/<folder>/{train,val}-*.tar`` by ``stream_class``.

    Batches come ready from the pipeline (``collate_episodes``), so the loaders use ``batch_size=None``.
    One training epoch is about ``epoch_size`` episodes over all ranks: each rank yields
    ``epoch_size // (batch_size * world_size)`` full batches, shared out among its workers. How many
    demos each episode gets is ``shot_policy``'s (the `DemoSampler` callback sets it; by default
    uniform in [min_shots, max_shots]).

    The stream position of every trained batch is kept (`on_before_batch_transfer`) and saved with the
    checkpoint (`state_dict`), so a resumed run continues the data exactly where it stopped. A subclass
    names its stream (``stream_class``, `_stream_extra`) and its shards (`folder`, `_split_name`,
    `_describe`, `_build_command`).
    """

    stream_class: ClassVar[type[ShardStream]]

    def __init__(
        self,
        root: str | Path,
        *,
        image_transform: ImageTransform,
        batch_size: int = 8,
        num_workers: int = 0,
        min_shots: int = 1,
        max_shots: int = 4,
        shot_policy: ShotPolicy | None = None,
        epoch_size: int = 10_000,
        shuffle_buffer: int = 500,
        seed: int = 0,
        val_episodes: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or epoch_size < 1:
            raise ValueError(f"batch_size and epoch_size must be positive, got {batch_size}, {epoch_size}")
        self.root = Path(root)
        self.image_transform = image_transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shot_policy = shot_policy or ShotPolicy.uniform(min_shots, max_shots, seed=seed)
        self.epoch_size = epoch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_episodes = val_episodes
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        # Exact resume: the loader epoch in progress and, per worker, the state after its last trained batch.
        self._epoch = 0
        self._trained: dict[int, dict] = {}
        self._resume_from: dict[str, Any] | None = None

    # ---- where the shards are and what they are called ----------------------------------------------
    @property
    def folder(self) -> str:
        """The folder under ``root`` that holds the shards."""
        raise NotImplementedError

    def _split_name(self, split: str) -> str:
        """The shard-file prefix of a split ("train", "val")."""
        return split

    def _describe(self, split: str) -> str:
        """What a split's shards are, for the missing-shards error ("The web corpus")."""
        raise NotImplementedError

    def _build_command(self) -> str | None:
        """The command that writes this module's training shards (named in the missing-shards error)."""
        return None

    def _split_glob(self, split: str) -> str:
        """Where a split's shards are looked for (named in errors and warnings)."""
        return str(self.root / self.folder / f"{self._split_name(split)}-*.tar")

    def _shards(self, split: str, required: bool) -> list[str]:
        urls = find_shards(self.root, self.folder, self._split_name(split))
        if not urls and required:
            raise missing_shards_error(self.root, self._split_glob(split), self._describe(split),
                                       self._build_command())
        return urls

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_urls = self._shards("train", required=True)
        if stage in (None, "fit", "validate"):
            # A corpus without a val split can still train; `validate` alone cannot do without one.
            self.val_urls = self._shards("val", required=stage == "validate")

    def has_val(self) -> bool:
        return bool(self._shards("val", required=False))

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _stream_extra(self) -> dict[str, Any]:
        """Keyword arguments ``stream_class`` takes beyond `ShardStream`'s."""
        return {}

    def _stream(self, urls: list[str], train: bool) -> ShardStream:
        rank, world_size = self._rank_and_world()
        return self.stream_class(
            urls,
            **self._stream_extra(),
            image_transform=self.image_transform,
            batch_size=self.batch_size,
            policy=self.shot_policy,
            seed=self.seed,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            batches_per_rank=max(1, self.epoch_size // (self.batch_size * world_size)),
            rank=rank,
            world_size=world_size,
            val_episodes=self.val_episodes,
        )

    def train_dataloader(self) -> DataLoader:
        urls = self.train_urls or self._shards("train", required=True)
        stream = self._stream(urls, train=True)
        workers = max(1, self.num_workers)
        slots, by_shard = stream.slots(workers)
        if not by_shard:
            logger.warning(
                "%d training shards for %d readers (%d ranks x %d workers): every reader reads every shard and "
                "keeps every %d-th document (disjoint, but %dx the reading); write more, smaller shards "
                "(mmict data convert --shard-size) to give each reader its own", len(urls), slots,
                stream.world_size, workers, slots, slots)
        start_epoch, resume = self._take_resume(stream, workers)
        return EpisodeLoader(stream, start_epoch=start_epoch, resume=resume, batch_size=None,
                             num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        urls = self.val_urls or self._shards("val", required=False)
        if not urls:
            logger.warning("no validation shards (%s): skipping validation", self._split_glob("val"))
            return []
        stream = self._stream(urls, train=False)
        # One rank: every document once, capped here at val_episodes. Several: the stream gives each rank
        # exactly its share (see ShardStream), so no cap is needed.
        cap = self.val_episodes if stream.world_size == 1 else None
        return EpisodeLoader(stream, max_episodes=cap, batch_size=None, num_workers=self.num_workers)

    # ---- exact resume -------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process right before the step that trains on `batch` (the loader's prefetched
        # batches have not reached here): so what is recorded is exactly what was trained on.
        record = batch.resume if isinstance(batch, EpisodeBatch) else None
        if record is not None and self.trainer is not None and self.trainer.training:
            self._epoch = int(record["epoch"])
            self._trained = {w: r for w, r in self._trained.items() if r["epoch"] == self._epoch}
            self._trained[int(record["worker"])] = record
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream position (gathered: the checkpoint is written by rank 0 alone)."""
        rank, world_size = self._rank_and_world()
        mine = {"epoch": self._epoch, "workers": dict(self._trained), "num_workers": max(1, self.num_workers)}
        ranks = [mine]
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"world_size": world_size, "seed": self.seed, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_from = state_dict

    def _take_resume(self, stream: ShardStream, workers: int) -> tuple[int, dict[int, dict]]:
        """(loader epoch to start at, worker states) from a loaded checkpoint; (0, {}) without one."""
        state, self._resume_from = self._resume_from, None
        if not state:
            return 0, {}
        rank, world_size = stream.rank, stream.world_size
        mine = state["ranks"][rank] if rank < len(state["ranks"]) else None
        if mine is None:
            return 0, {}
        epoch = int(mine["epoch"])
        same = state["world_size"] == world_size and mine["num_workers"] == workers and state["seed"] == self.seed
        if not same:
            # The stream cannot be continued exactly; a new epoch number still avoids replaying the old order.
            logger.warning(
                "resuming with %d ranks x %d workers (seed %d), the checkpoint's data stream had %d x %d (seed %d): "
                "continuing at the next data epoch in a fresh order, not at the exact position", world_size,
                workers, self.seed, state["world_size"], mine["num_workers"], state["seed"])
            return epoch + 1, {}
        workers_state = {int(w): r for w, r in mine["workers"].items()}
        if sum(int(r["batches"]) for r in workers_state.values()) >= stream.batches_per_rank:
            return epoch + 1, {}  # the epoch was complete
        logger.info("resuming the data stream in epoch %d after %d batches", epoch,
                    sum(int(r["batches"]) for r in workers_state.values()))
        self._epoch, self._trained = epoch, dict(workers_state)
        return epoch, workers_state


__all__ = ["StreamingDataModule"]
