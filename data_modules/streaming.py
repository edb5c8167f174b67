"""The generic resumable streaming engine: batches of episodes from webdataset shards, whatever the samples hold.

A `ShardStream` splits its shards over the DDP ranks and DataLoader workers so that every rank yields the same
number of batches per epoch (by shard, or by document when there are fewer shards than readers), tags each
batch with the exact stream position after it, and continues from such a position on resume. `EpisodeLoader`
is the DataLoader over a stream: epochs, an exact episode cap, resume states, and its own generator. How
samples become episodes is a subclass's business (`ShardStream._episode_stage`): `web_documents.EpisodeStream`
cuts them from interleaved web documents, `task_episodes.TaskEpisodeStream` groups a task's examples.
`streaming_module.StreamingDataModule` is the LightningDataModule around both. Skipped samples are counted
(`skips`) and ride to the main process in the batches (`episodes.collate_episodes`).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from .episodes import ImageTransform, collate_episodes
from .shots import ShotPolicy
from .skips import record_skip

logger = logging.getLogger(__name__)

# A train stream that opens this many shards in a row without getting a sample would otherwise spin forever on
# resampled shards: fail loudly instead.
MAX_CONSECUTIVE_EMPTY_SHARDS = 1_000

# n-th episode of a worker's stream -> (k to cut, the fewest demos acceptable); see `shots.ShotPolicy`.
ShotPlan = Callable[[int], tuple[int, int]]


# ---------------------------------------------------------------------------------------------------
# Shards


def find_shards(root: str | Path, subdir: str, split: str) -> list[str]:
    """Sorted ``root/subdir/split-*.tar`` paths (empty when there are none)."""
    return sorted(str(p) for p in (Path(root) / subdir).glob(f"{split}-*.tar"))


def missing_shards_error(root: str | Path, searched: str, what: str, build: str | None = None) -> FileNotFoundError:
    """The error for missing shards: what was searched and the command that builds them."""
    root = Path(root)
    toy = f"mmict data toy --root {root}"
    if (root / "manifest.json").is_file() or "toy" in root.name.lower():
        hint = f"Build the toy world with: {toy}"
    else:
        hint = (
            f"{what} must be webdataset shards in the format docs/data.md describes (section 'Sample formats')"
            + (f"; convert it from its public release with:\n  {build}\n" if build else "; ")
            + f"for a synthetic stand-in, build the toy world with: {toy}"
        )
    return FileNotFoundError(f"no shards found at {searched}. {hint}")


# ---------------------------------------------------------------------------------------------------
# Pipeline stages


class _Watchdog:
    """Shared between two stages of one stream: shards opened since the last sample arrived."""

    def __init__(self) -> None:
        self.shards_since_sample = 0


def _count_shards(urls: Iterable[dict], watchdog: _Watchdog) -> Iterator[dict]:
    for url in urls:
        watchdog.shards_since_sample += 1
        if watchdog.shards_since_sample > MAX_CONSECUTIVE_EMPTY_SHARDS:
            raise RuntimeError(
                f"{MAX_CONSECUTIVE_EMPTY_SHARDS} shards in a row gave no sample (last: {url['url']}); "
                "are the shards readable tar files?"
            )
        yield url


def _tar_samples(urls: Iterable[dict]) -> Iterator[dict]:
    """The samples of each shard in turn (webdataset's tar reading), and what a tar read error loses, counted.

    A read error (a truncated or corrupt shard) ends the shard's reading: the document being read when it came is
    incomplete, so it is dropped and counted, one skip per document ("tar: ReadError in train-000003.tar: ...");
    the documents after it in that shard are lost too, and how many is not known (a tar has no table of contents),
    which the reason says rather than count them. A shard that yields nothing at all is counted once, as such.
    """
    for url in urls:
        errors: list[Exception] = []

        def handler(exn: Exception, errors: list[Exception] = errors) -> bool:
            errors.append(exn)
            return True  # go on with the next shard (or member)

        name = Path(str(url["url"])).name
        seen, read = 0, 0  # errors accounted for; documents yielded from this shard
        for sample in wds.tarfile_to_samples(handler=handler)(iter([url])):
            if len(errors) > seen:
                # An error came while this document's members were being read (webdataset yields a document once
                # the next one starts, or the shard ends): it is cut short.
                seen = len(errors)
                record_skip(f"tar: {type(errors[-1]).__name__} in {name}: the document it cut short is dropped; the "
                            "documents after it in the shard are lost too (how many is not known)")
                logger.warning("shard %s broke off after %d documents (%s): the document being read is dropped and "
                               "the rest of the shard is lost", url["url"], read, _first_line(errors[-1]))
                continue
            read += 1
            yield sample
        if len(errors) > seen:  # the shard did not open, or broke off between documents
            record_skip(f"tar: {type(errors[-1]).__name__} in {name}: "
                        + ("the shard does not read; its documents are lost (how many is not known)" if read == 0
                           else "the documents after the error in the shard are lost (how many is not known)"))
            logger.warning("shard %s: %s", url["url"], f"{_first_line(errors[-1])}: it does not read" if read == 0
                           else f"{_first_line(errors[-1])} after {read} documents; the rest of it is lost")


def _first_line(err: Exception) -> str:
    # webdataset appends the stream and url to the exception's args: the message is the first
    text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _passes(urls: list[str], seed: str | None, repeat_warning: str | None = None) -> Iterator[dict]:
    """The shards over and over (a training epoch may need more documents than one pass holds); each pass in
    its own seeded order (``seed`` None: as given). ``repeat_warning`` is logged when a second pass starts."""
    for n in itertools.count():
        order = list(urls)
        if seed is not None:
            random.Random(f"{seed}/pass/{n}").shuffle(order)
        if n == 1 and repeat_warning:
            logger.warning(repeat_warning)
        yield from ({"url": url} for url in order)


def _every_nth(samples: Iterable[dict], slot: int, slots: int) -> Iterator[dict]:
    """Samples ``slot``, ``slot + slots``, ...: disjoint shares of one stream for ``slots`` readers."""
    return itertools.islice(samples, slot, None, slots)


class _Counted:
    """An iterator that counts what was taken from it: the stream position an exact resume skips to."""

    def __init__(self, items: Iterable[dict], start: int = 0) -> None:
        self._items = iter(items)
        self.n = start

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> dict:
        item = next(self._items)
        self.n += 1
        return item


def _batched(episodes: Iterable[dict], size: int, partial: bool) -> Iterator[dict]:
    """Collated batches of ``size`` episodes, each yielded as soon as it is full. (webdataset's `batched` waits
    for the next episode first: the stream position at a batch would then include an episode it lacks.)"""
    batch: list[dict] = []
    for episode in episodes:
        batch.append(episode)
        if len(batch) == size:
            yield collate_episodes(batch)
            batch = []
    if batch and partial:
        yield collate_episodes(batch)


def source_of(sample: dict) -> str:
    """Where a sample came from, ``shard.tar#key``: batches carry these (disjointness checks, debugging)."""
    return f"{Path(str(sample.get('__url__', '?'))).name}#{sample.get('__key__')}"


# ---------------------------------------------------------------------------------------------------
# Stream and loader


class ShardStream(IterableDataset):
    """Batches of episodes from shards; the webdataset pipeline is built where it is iterated (the worker).

    A subclass says how samples become episodes (`_episode_stage`); everything else is here.

    **Train** (one epoch = ``batches_per_rank`` batches on every rank, so DDP ranks never wait on each other):
    the shards are permuted per (seed, epoch), then dealt out to the ``world_size x num_workers`` readers
    ("slots"): each reads only its own shards, over and over if the epoch needs more, through a seeded
    shuffle buffer. With fewer shards than slots, every slot reads every shard and keeps every
    ``slots``-th document instead: still disjoint, at the cost of reading more (the data module says so).
    Each batch is for a known training step (workers take turns, as the DataLoader does), so the shot
    policy gives its k in the worker, and each batch carries ``resume``: the worker's stream position and
    RNG state after it, which is all an exact resume needs (`set_resume`).

    **Val**: one rank reads every shard once, in order. Several ranks each take every ``world_size``-th
    document and exactly ``val_episodes / world_size`` episodes (repeating a too-small split, with a
    warning), so their batch counts match.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        image_transform: ImageTransform,
        batch_size: int,
        policy: ShotPolicy,
        seed: int,
        train: bool,
        shuffle_buffer: int = 0,
        batches_per_rank: int = 1,
        rank: int = 0,
        world_size: int = 1,
        val_episodes: int | None = None,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError(f"{type(self).__name__} needs at least one shard")
        self.urls = list(urls)
        self.image_transform = image_transform
        self.batch_size = batch_size
        self.policy = policy
        self.seed = seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_rank = batches_per_rank
        self.rank = rank
        self.world_size = world_size
        self.val_episodes = val_episodes
        self.epoch = 0
        self.resume: dict[int, dict] = {}  # worker -> its `resume` record after the last trained batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_resume(self, states: dict[int, dict]) -> None:
        """Continue each worker's stream after the batch its state was recorded with (exact resume)."""
        self.resume = dict(states)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.train:
            return self._val_batches(worker, num_workers)
        # The DataLoader takes batches from its workers in turn, always starting at worker 0. After a resume
        # at batch b of the epoch, batch b belongs to the stream of worker b % W: so worker w continues the
        # stream of worker (w + b) % W, and the batches come in exactly their original order.
        consumed = sum(int(r["batches"]) for r in self.resume.values())
        return self._train_batches((worker + consumed) % num_workers, num_workers)

    def _episode_stage(self, samples: Iterable[dict], plan: ShotPlan, rng: random.Random | None,
                       watchdog: _Watchdog) -> Iterator[dict]:
        """Episodes from decoded ``samples``, ``plan(n)`` giving the n-th one's shots; ``rng`` draws the random
        choices (None: validation, draw them from the seed and the sample so every pass is the same). It must
        reset ``watchdog.shards_since_sample`` at every sample it gets."""
        raise NotImplementedError

    # ---- train --------------------------------------------------------------------------------------
    def slots(self, num_workers: int) -> tuple[int, bool]:
        """(readers over all ranks, whether they split by shard (True) or by document (False))."""
        slots = self.world_size * num_workers
        return slots, len(self.urls) >= slots

    def worker_batches(self, worker: int, num_workers: int) -> int:
        """Batches worker ``worker`` yields per epoch (the rank's batches dealt out, the first workers +1)."""
        base, extra = divmod(self.batches_per_rank, num_workers)
        return base + (1 if worker < extra else 0)

    def _stream_items(self, samples: Iterable[dict]) -> Iterable:
        """What the stream deals, shuffles and counts for resuming: the shards' samples (a subclass may group them,
        e.g. an episodic task's whole episodes, so none of those steps ever splits a group)."""
        return samples

    def _train_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """The batches of stream ``worker`` (of ``num_workers``) in this epoch: steps worker, worker + W, ..."""
        num_batches = self.worker_batches(worker, num_workers)
        resume = self.resume.get(worker) or {}
        if resume and resume.get("epoch") != self.epoch:
            raise ValueError(f"resume state of worker {worker} is for epoch {resume.get('epoch')}, not {self.epoch}")
        done = int(resume.get("batches", 0))
        if done >= num_batches:
            return iter(())
        slots, by_shard = self.slots(num_workers)
        slot = self.rank * num_workers + worker
        order = list(self.urls)
        random.Random(f"{self.seed}/shards/{self.epoch}").shuffle(order)  # the same on every rank and worker
        watchdog = _Watchdog()
        if by_shard:
            urls = _passes(order[slot::slots], seed=f"{self.seed}/{self.epoch}/{slot}")
        else:  # every slot reads the same sequence, so every_nth gives disjoint shares of it
            urls = _passes(order, seed=f"{self.seed}/{self.epoch}")
        samples: Iterable = self._stream_items(_tar_samples(_count_shards(urls, watchdog)))
        if not by_shard:
            samples = _every_nth(samples, slot, slots)
        stream_seed = f"{self.seed}/{self.epoch}/{self.rank}/{worker}"
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, rng=random.Random(f"{stream_seed}/buffer"))(samples)
        docs = _Counted(samples)
        rng = random.Random(f"{stream_seed}/episodes")
        if resume:
            # Replaying the stream up to the saved position reads tars but decodes nothing: cheap, and exact,
            # because shard order and shuffle buffer depend only on the seeds, never on what was decoded.
            for _ in itertools.islice(docs, int(resume["docs"])):
                pass
            rng.setstate(_rng_state(resume["rng"]))
        first_step = self.epoch * self.batches_per_rank

        def plan(n: int) -> tuple[int, int]:
            batch, episode = divmod(done * self.batch_size + n, self.batch_size)
            return self.policy.shots(first_step + batch * num_workers + worker, episode)

        episodes = self._episode_stage(docs, plan, rng, watchdog)
        batches = _batched(episodes, self.batch_size, partial=False)
        return self._tagged(itertools.islice(batches, num_batches - done), done, docs, rng, worker, num_workers)

    def _tagged(self, batches: Iterable[dict], done: int, docs: _Counted, rng: random.Random, worker: int,
                num_workers: int) -> Iterator[dict]:
        for j, batch in enumerate(batches, done):
            batch.step = self.epoch * self.batches_per_rank + j * num_workers + worker
            batch.resume = {"epoch": self.epoch, "rank": self.rank, "worker": worker, "batches": j + 1,
                            "docs": docs.n, "rng": rng.getstate()}
            yield batch

    # ---- val ----------------------------------------------------------------------------------------
    def _val_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        k = self.policy.val_shots

        def plan(n: int) -> tuple[int, int]:
            return k, self.policy.min_shots

        watchdog = _Watchdog()
        if self.world_size == 1:  # every shard once, in order; the loader caps the episodes
            urls = iter({"url": u} for u in self.urls[worker::num_workers])
            samples = _tar_samples(_count_shards(urls, watchdog))
            episodes: Iterable[dict] = self._episode_stage(samples, plan, None, watchdog)
        else:
            share = self._val_share(worker, num_workers)
            if share == 0:
                return iter(())
            urls = _passes(self.urls[worker::num_workers], seed=None, repeat_warning=(
                f"validation rank {self.rank}: the val shards hold fewer than the {share} episodes this worker "
                "must give (data.val_episodes split over ranks); repeating them"))
            samples = _tar_samples(_count_shards(urls, watchdog))
            episodes = itertools.islice(self._episode_stage(_every_nth(samples, self.rank, self.world_size), plan,
                                                            None, watchdog), share)
        return _batched(episodes, self.batch_size, partial=True)

    def _val_share(self, worker: int, num_workers: int) -> int:
        """Episodes this worker gives when several ranks validate: the rank's equal share, dealt to workers."""
        if self.val_episodes is None:
            raise ValueError("validating on several ranks needs data.val_episodes (every rank must run the same "
                             "number of validation batches, or DDP hangs)")
        per_rank = -(-self.val_episodes // self.world_size)
        readers = min(num_workers, len(self.urls))  # workers beyond the shard count read nothing
        if worker >= readers:
            return 0
        base, extra = divmod(per_rank, readers)
        return base + (1 if worker < extra else 0)


def _rng_state(state: Any) -> tuple:
    """`random.getstate()` comes back from a checkpoint as nested lists: make it a tuple again."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class EpisodeLoader(DataLoader):
    """A DataLoader over pre-collated episode batches that knows epochs, an optional episode cap, and resumes.

    Epochs: Lightning only calls ``set_epoch`` on samplers, and an IterableDataset has none; the dataset
    is pickled to the workers when iteration starts, so setting the epoch here reaches them and each
    epoch draws fresh episodes. Cap: counted here, in the main process, so it is exact whatever the
    number of workers and however the shards split among them. Resume: ``start_epoch`` and the workers'
    states continue an interrupted epoch exactly where its last trained batch left it.
    """

    def __init__(self, dataset: IterableDataset, *, max_episodes: int | None = None, start_epoch: int = 0,
                 resume: dict[int, dict] | None = None, **kwargs: Any) -> None:
        # Its own generator: torch draws the workers' base seed from it at every iteration, which would
        # otherwise advance the global generator (and shift dropout masks after a resume). The streams seed
        # themselves from (seed, epoch, rank, worker) and never read that base seed.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, **kwargs)
        self.max_episodes = max_episodes
        self._epochs_started = start_epoch
        self._resume = resume or {}

    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self._epochs_started)
        set_resume = getattr(self.dataset, "set_resume", None)
        if callable(set_resume):
            set_resume(self._resume)  # only the first epoch after a resume continues; later ones start fresh
            self._resume = {}
        self._epochs_started += 1
        batches = super().__iter__()
        return batches if self.max_episodes is None else self._capped(batches, self.max_episodes)

    @staticmethod
    def _capped(batches: Iterator[dict], remaining: int) -> Iterator[dict]:
        for batch in batches:
            if remaining <= 0:
                return
            size = len(batch)
            yield batch if size <= remaining else batch.head(remaining)
            remaining -= size


__all__ = ["MAX_CONSECUTIVE_EMPTY_SHARDS", "EpisodeLoader", "ShardStream", "ShotPlan", "find_shards",
           "missing_shards_error", "source_of"]
