"""Episodes of interleaved web documents (MMC4 convention) for in-context tuning.

One document -> one episode: a window of k+1 consecutive (image, text) pairs; the first k are the
demonstrations, the last is the query (empty prompt, its text is the target). Shards are webdataset
tars under ``root/web/{train,val}-*.tar``, one document per sample: a ``json`` member with
``text_list`` and ``image_info`` (images as ``image_base64`` or as separate tar members named by
``image_name``). Corrupt documents are skipped and counted (see ``skips.py``).
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from .shots import ShotPolicy
from .skips import drain_skips, record_skip, skip_handler

logger = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image], torch.Tensor]
Pair = tuple[Image.Image, str]

# A train stream that drops this many documents (or opens this many shards) in a row without producing
# an episode would otherwise spin forever on resampled shards: fail loudly instead.
MAX_CONSECUTIVE_DROPS = 10_000
MAX_CONSECUTIVE_EMPTY_SHARDS = 1_000


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
            f"{what} must be webdataset shards in the format the README describes (section 'Data formats')"
            + (f"; convert it from its public release with:\n  {build}\n" if build else "; ")
            + f"for a synthetic stand-in, build the toy world with: {toy}"
        )
    return FileNotFoundError(f"no shards found at {searched}. {hint}")


# ---------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into an RGB PIL image (raises on anything undecodable)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # convert() forces the full decode, so errors surface here


def _image_bytes(info: dict, sample: dict) -> bytes | None:
    encoded = info.get("image_base64")
    if isinstance(encoded, str) and encoded:
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return b""  # present but garbage: counts as "image does not decode"
    name = info.get("image_name")
    if isinstance(name, str):
        # webdataset keys members by what follows the sample key, lower-cased: "doc.img_0.jpg" -> "img_0.jpg"
        return sample.get(name.lower(), sample.get(name))
    return None


def document_pairs(sample: dict, *, min_similarity: float | None = None, min_image_size: int = 0) -> list[Pair] | None:
    """The usable (image, text) pairs of one web sample, in text order; None (counted) if unusable.

    ``min_similarity``: drop images whose ``matched_sim`` (MMC4's CLIP image-text similarity) is below it, as
    OpenFlamingo does (0.24 for MMC4); images without a ``matched_sim`` (OBELICS: paired by adjacency) are
    kept. ``min_image_size``: drop images whose shorter side is smaller (logos, icons, tracking pixels).
    """
    raw = sample.get("json")
    if raw is None:
        record_skip("missing json")
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        record_skip("json does not parse")
        return None
    texts = doc.get("text_list") if isinstance(doc, dict) else None
    infos = doc.get("image_info") if isinstance(doc, dict) else None
    if not isinstance(texts, list) or not isinstance(infos, list):
        record_skip("malformed document")
        return None
    found: list[tuple[int, int, Image.Image, str]] = []
    for order, info in enumerate(infos):
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(texts) or not isinstance(texts[index], str):
            record_skip("image matched to no text")
            continue
        sim = info.get("matched_sim")
        if min_similarity is not None and isinstance(sim, int | float) and sim < min_similarity:
            record_skip("image-text similarity below data.min_similarity")
            continue
        data = _image_bytes(info, sample)
        if data is None:
            record_skip("missing image")
            continue
        try:
            image = decode_image(data)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad bytes
            record_skip("image does not decode")
            continue
        if min(image.size) < min_image_size:
            record_skip("image smaller than data.min_image_size")
            continue
        found.append((index, order, image, texts[index]))
    if len(found) < 2:
        record_skip("too few image-text pairs")
        return None
    found.sort(key=lambda item: item[:2])  # text position, then image_info order for ties
    return [(image, text) for _, _, image, text in found]


def make_episode(window: list[Pair], image_transform: ImageTransform, source: str = "") -> dict:
    """All pairs but the last are demonstrations; the last is the query (its text is the target)."""
    *demos, (query_image, query_text) = window
    return {
        "source": source,
        "demo_images": [image_transform(image) for image, _ in demos],
        "demo_texts": [text for _, text in demos],
        "query_image": image_transform(query_image),
        "query_prompt": "",
        "query_target": query_text,
    }


def collate_episodes(episodes: list[dict]) -> dict:
    """Batch episodes; demonstrations are flattened in episode order, ``demo_counts`` splits them back.

    Images stay lists of per-image inputs (not stacked): families with dynamic resolution (Qwen2-VL,
    LLaVA-NeXT tiles, Idefics crops) give images of different sizes; the backbone batches them.
    """
    if not episodes:
        raise ValueError("collate_episodes needs at least one episode")
    return {
        "demo_images": [image for episode in episodes for image in episode["demo_images"]],
        "demo_texts": [text for episode in episodes for text in episode["demo_texts"]],
        "demo_counts": [len(episode["demo_images"]) for episode in episodes],
        "query_images": [episode["query_image"] for episode in episodes],
        "query_prompts": [episode["query_prompt"] for episode in episodes],
        "query_targets": [episode["query_target"] for episode in episodes],
        "sources": [episode.get("source", "") for episode in episodes],
        # Runs in the worker that decoded these episodes: hand its skip counts to the main process.
        "skipped": drain_skips(),
    }


# ---------------------------------------------------------------------------------------------------
# Pipeline stages

# n-th episode of a worker's stream -> (k to cut, the fewest demos acceptable); see `shots.ShotPolicy`.
ShotPlan = Callable[[int], tuple[int, int]]


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


def _cut_episodes(
    samples: Iterable[dict],
    *,
    image_transform: ImageTransform,
    plan: ShotPlan,
    rng: random.Random | None,
    seed: int,
    watchdog: _Watchdog,
    min_similarity: float | None = None,
    min_image_size: int = 0,
) -> Iterator[dict]:
    """Decode documents and cut one episode from each: k from ``plan``, at a random window (``rng``, training)
    or at a window drawn from (seed, document key) (validation: identical on every pass and worker split)."""
    drops = 0
    made = 0
    for sample in samples:
        watchdog.shards_since_sample = 0
        pairs = document_pairs(sample, min_similarity=min_similarity, min_image_size=min_image_size)
        k, fewest = plan(made)
        if pairs is not None and len(pairs) < fewest + 1:
            record_skip("too few image-text pairs")
            pairs = None
        if pairs is None:
            drops += 1
            if drops >= MAX_CONSECUTIVE_DROPS:
                raise RuntimeError(
                    f"{drops} documents in a row were skipped (corrupt, or fewer than {fewest + 1} usable "
                    "image-text pairs); check the shards and the shot counts"
                )
            continue
        drops = 0
        k = min(k, len(pairs) - 1)
        pick = rng if rng is not None else random.Random(f"{seed}/{sample.get('__key__')}")
        start = pick.randint(0, len(pairs) - k - 1)
        yield make_episode(pairs[start : start + k + 1], image_transform, source=source_of(sample))
        made += 1


class EpisodeStream(IterableDataset):
    """Batches of episodes from shards; the webdataset pipeline is built where it is iterated (the worker).

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
        min_similarity: float | None = None,
        min_image_size: int = 0,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("EpisodeStream needs at least one shard")
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
        self.min_similarity = min_similarity
        self.min_image_size = min_image_size
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
        return _cut_episodes(samples, image_transform=self.image_transform, plan=plan, rng=rng, seed=self.seed,
                             watchdog=watchdog, min_similarity=self.min_similarity,
                             min_image_size=self.min_image_size)

    # ---- train --------------------------------------------------------------------------------------
    def slots(self, num_workers: int) -> tuple[int, bool]:
        """(readers over all ranks, whether they split by shard (True) or by document (False))."""
        slots = self.world_size * num_workers
        return slots, len(self.urls) >= slots

    def worker_batches(self, worker: int, num_workers: int) -> int:
        """Batches worker ``worker`` yields per epoch (the rank's batches dealt out, the first workers +1)."""
        base, extra = divmod(self.batches_per_rank, num_workers)
        return base + (1 if worker < extra else 0)

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
        samples: Iterable[dict] = wds.tarfile_to_samples(handler=skip_handler("tar"))(_count_shards(urls, watchdog))
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
            batch["step"] = self.epoch * self.batches_per_rank + j * num_workers + worker
            batch["resume"] = {"epoch": self.epoch, "rank": self.rank, "worker": worker, "batches": j + 1,
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
            samples = wds.tarfile_to_samples(handler=skip_handler("tar"))(_count_shards(urls, watchdog))
            episodes: Iterable[dict] = self._episode_stage(samples, plan, None, watchdog)
        else:
            share = self._val_share(worker, num_workers)
            if share == 0:
                return iter(())
            urls = _passes(self.urls[worker::num_workers], seed=None, repeat_warning=(
                f"validation rank {self.rank}: the val shards hold fewer than the {share} episodes this worker "
                "must give (data.val_episodes split over ranks); repeating them"))
            samples = wds.tarfile_to_samples(handler=skip_handler("tar"))(_count_shards(urls, watchdog))
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


def head_of_batch(batch: dict, n: int) -> dict:
    """The first ``n`` episodes of a collated batch."""
    num_demos = sum(batch["demo_counts"][:n])
    return {
        "demo_images": batch["demo_images"][:num_demos],
        "demo_texts": batch["demo_texts"][:num_demos],
        "demo_counts": batch["demo_counts"][:n],
        "query_images": batch["query_images"][:n],
        "query_prompts": batch["query_prompts"][:n],
        "query_targets": batch["query_targets"][:n],
        "sources": batch["sources"][:n],
        "skipped": batch["skipped"],
    }


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
            size = len(batch["query_targets"])
            yield batch if size <= remaining else head_of_batch(batch, remaining)
            remaining -= size


# ---------------------------------------------------------------------------------------------------
# DataModule


class WebCorpusDataModule(L.LightningDataModule):
    """Episodes from interleaved web documents under ``root/<corpus>/{train,val}-*.tar``.

    Batches come ready from the pipeline (``collate_episodes``), so the loaders use ``batch_size=None``.
    One training epoch is about ``epoch_size`` episodes over all ranks: each rank yields
    ``epoch_size // (batch_size * world_size)`` full batches, shared out among its workers. How many
    demos each episode gets is ``shot_policy``'s (the `DemoSampler` callback sets it; by default
    uniform in [min_shots, max_shots]).

    The stream position of every trained batch is kept (`on_before_batch_transfer`) and saved with the
    checkpoint (`state_dict`), so a resumed run continues the data exactly where it stopped.
    """

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
        corpus: str = "web",
        min_similarity: float | None = None,
        min_image_size: int = 0,
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
        self.corpus = corpus
        self.min_similarity = min_similarity
        self.min_image_size = min_image_size
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        # Exact resume: the loader epoch in progress and, per worker, the state after its last trained batch.
        self._epoch = 0
        self._trained: dict[int, dict] = {}
        self._resume_from: dict[str, Any] | None = None

    # Where the shards are and what they are called; a data module over other shards overrides these.
    @property
    def folder(self) -> str:
        return self.corpus

    def _split_name(self, split: str) -> str:
        """The shard-file prefix of a split ("train", "val")."""
        return split

    def _describe(self, split: str) -> str:
        return "The web corpus"

    def _build_command(self) -> str:
        """The command that writes this module's training shards (named in the missing-shards error)."""
        return (f"mmict data convert mmc4 --in <mmc4 docs> --images <image folder> "
                f"--out {self.root / self.folder}/train-%06d.tar   (or: obelics)")

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
        """Keyword arguments a subclass's stream takes beyond `EpisodeStream`'s."""
        return {"min_similarity": self.min_similarity, "min_image_size": self.min_image_size}

    stream_class: type[EpisodeStream] = EpisodeStream

    def _stream(self, urls: list[str], train: bool) -> EpisodeStream:
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
        # exactly its share (see EpisodeStream), so no cap is needed.
        cap = self.val_episodes if stream.world_size == 1 else None
        return EpisodeLoader(stream, max_episodes=cap, batch_size=None, num_workers=self.num_workers)

    # ---- exact resume -------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs in the main process right before the step that trains on `batch` (the loader's prefetched
        # batches have not reached here): so what is recorded is exactly what was trained on.
        record = batch.get("resume") if isinstance(batch, dict) else None
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

    def _take_resume(self, stream: EpisodeStream, workers: int) -> tuple[int, dict[int, dict]]:
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
