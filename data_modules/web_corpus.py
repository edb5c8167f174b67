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
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

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


def missing_shards_error(root: str | Path, searched: str, what: str) -> FileNotFoundError:
    """The error for missing shards: what was searched and the command that builds them."""
    root = Path(root)
    build = f"mmict data toy --root {root}"
    if (root / "manifest.json").is_file() or "toy" in root.name.lower():
        hint = f"Build the toy world with: {build}"
    else:
        hint = (
            f"{what} must be webdataset shards in the format the README describes (section 'Data formats'); "
            f"for a synthetic stand-in, build the toy world with: {build}"
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


def document_pairs(sample: dict) -> list[Pair] | None:
    """The usable (image, text) pairs of one web sample, in text order; None (counted) if unusable."""
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
        data = _image_bytes(info, sample)
        if data is None:
            record_skip("missing image")
            continue
        try:
            image = decode_image(data)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad bytes
            record_skip("image does not decode")
            continue
        found.append((index, order, image, texts[index]))
    if len(found) < 2:
        record_skip("too few image-text pairs")
        return None
    found.sort(key=lambda item: item[:2])  # text position, then image_info order for ties
    return [(image, text) for _, _, image, text in found]


def make_episode(window: list[Pair], image_transform: ImageTransform) -> dict:
    """All pairs but the last are demonstrations; the last is the query (its text is the target)."""
    *demos, (query_image, query_text) = window
    return {
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
        # Runs in the worker that decoded these episodes: hand its skip counts to the main process.
        "skipped": drain_skips(),
    }


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


def _cut_episodes(
    samples: Iterable[dict],
    *,
    image_transform: ImageTransform,
    min_shots: int,
    max_shots: int,
    rng: random.Random | None,
    seed: int,
    watchdog: _Watchdog,
) -> Iterator[dict]:
    """Decode documents and cut one episode from each.

    With ``rng`` (training): k ~ uniform[min_shots, min(max_shots, n - 1)] and a random window. Without
    (validation): the largest k and a window start drawn from (seed, document key), so validation is
    identical on every pass whatever the worker split.
    """
    drops = 0
    for sample in samples:
        watchdog.shards_since_sample = 0
        pairs = document_pairs(sample)
        if pairs is not None and len(pairs) < min_shots + 1:
            record_skip("too few image-text pairs")
            pairs = None
        if pairs is None:
            drops += 1
            if drops >= MAX_CONSECUTIVE_DROPS:
                raise RuntimeError(
                    f"{drops} documents in a row were skipped (corrupt, or fewer than min_shots + 1 = "
                    f"{min_shots + 1} image-text pairs); check the shards and min_shots"
                )
            continue
        drops = 0
        top = min(max_shots, len(pairs) - 1)
        if rng is not None:
            k = rng.randint(min_shots, top)
            start = rng.randint(0, len(pairs) - k - 1)
        else:
            k = top
            start = random.Random(f"{seed}/{sample.get('__key__')}").randint(0, len(pairs) - k - 1)
        yield make_episode(pairs[start : start + k + 1], image_transform)


def _no_worker_seed() -> int:
    # ResampledShards mixes in its own worker seed; ours already contains rank and worker.
    return 0


class EpisodeStream(IterableDataset):
    """Batches of episodes from web shards; the webdataset pipeline is built where it is iterated.

    Building it in ``__iter__`` (inside the DataLoader worker) lets the seeds depend on (seed, epoch,
    rank, worker) -- distinct per worker, deterministic given ``seed`` -- and lets each worker know its
    share of the epoch. Train: resampled shards (an endless stream per worker), cut to
    ``batches_per_rank`` batches per rank, split over the workers. Val: every shard once, split over
    ranks, then workers.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        image_transform: ImageTransform,
        batch_size: int,
        min_shots: int,
        max_shots: int,
        seed: int,
        train: bool,
        shuffle_buffer: int = 0,
        batches_per_rank: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("EpisodeStream needs at least one shard")
        self.urls = list(urls)
        self.image_transform = image_transform
        self.batch_size = batch_size
        self.min_shots = min_shots
        self.max_shots = max_shots
        self.seed = seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_rank = batches_per_rank
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # Counts __iter__ calls on this copy: persistent workers keep their copy, so this still moves on.
        self._iterations = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        self._iterations += 1
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self._train_batches(worker, num_workers) if self.train else self._val_batches()

    def _episode_stage(self, rng: random.Random | None, watchdog: _Watchdog) -> Callable:
        return partial(
            _cut_episodes,
            image_transform=self.image_transform,
            min_shots=self.min_shots,
            max_shots=self.max_shots,
            rng=rng,
            seed=self.seed,
            watchdog=watchdog,
        )

    def _train_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        base, extra = divmod(self.batches_per_rank, num_workers)
        num_batches = base + (1 if worker < extra else 0)
        if num_batches == 0:  # more workers than batches; with_epoch(0) would mean "endless"
            return iter(())
        stream_seed = wds.utils.make_seed(self.seed, self.epoch, self._iterations, self.rank, worker)
        watchdog = _Watchdog()
        stages: list[Any] = [
            wds.ResampledShards(self.urls, seed=stream_seed, worker_seed=_no_worker_seed, deterministic=True),
            partial(_count_shards, watchdog=watchdog),
            wds.tarfile_to_samples(handler=skip_handler("tar")),
        ]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, rng=random.Random(stream_seed + 1)))
        stages += [
            self._episode_stage(random.Random(stream_seed + 2), watchdog),
            wds.batched(self.batch_size, collation_fn=collate_episodes, partial=False),
        ]
        return iter(wds.DataPipeline(*stages).with_epoch(num_batches))

    def _val_batches(self) -> Iterator[dict]:
        # Split by node with the rank captured in the main process: in workers torch.distributed may not
        # be visible, which would make webdataset's split_by_node give every rank every shard.
        urls = self.urls[self.rank :: self.world_size]
        if not urls:
            return iter(())
        watchdog = _Watchdog()
        return iter(
            wds.DataPipeline(
                wds.SimpleShardList(urls),
                wds.split_by_worker,
                wds.tarfile_to_samples(handler=skip_handler("tar")),
                self._episode_stage(None, watchdog),
                wds.batched(self.batch_size, collation_fn=collate_episodes, partial=True),
            )
        )


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
        "skipped": batch["skipped"],
    }


class EpisodeLoader(DataLoader):
    """A DataLoader over pre-collated episode batches that knows epochs and an optional episode cap.

    Epochs: Lightning only calls ``set_epoch`` on samplers, and an IterableDataset has none; the dataset
    is pickled to the workers when iteration starts, so setting the epoch here reaches them and each
    epoch draws fresh episodes. Cap: counted here, in the main process, so it is exact whatever the
    number of workers and however the shards split among them.
    """

    def __init__(self, dataset: IterableDataset, *, max_episodes: int | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.max_episodes = max_episodes
        self._epochs_started = 0

    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self._epochs_started)
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
    """Episodes from interleaved web documents under ``root/web/{train,val}-*.tar``.

    Batches come ready from the pipeline (``collate_episodes``), so the loaders use ``batch_size=None``.
    One training epoch is about ``epoch_size`` episodes over all ranks: each rank yields
    ``epoch_size // (batch_size * world_size)`` full batches, shared out among its workers.
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
        epoch_size: int = 10_000,
        shuffle_buffer: int = 500,
        seed: int = 0,
        val_episodes: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= min_shots <= max_shots:
            raise ValueError(f"need 0 <= min_shots <= max_shots, got {min_shots} and {max_shots}")
        if batch_size < 1 or epoch_size < 1:
            raise ValueError(f"batch_size and epoch_size must be positive, got {batch_size}, {epoch_size}")
        self.root = Path(root)
        self.image_transform = image_transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_shots = min_shots
        self.max_shots = max_shots
        self.epoch_size = epoch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_episodes = val_episodes
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []

    # Where the shards are and what they are called; a data module over other shards overrides these.
    folder = "web"

    def _split_name(self, split: str) -> str:
        """The shard-file prefix of a split ("train", "val")."""
        return split

    def _describe(self, split: str) -> str:
        return "The web corpus"

    def _split_glob(self, split: str) -> str:
        """Where a split's shards are looked for (named in errors and warnings)."""
        return str(self.root / self.folder / f"{self._split_name(split)}-*.tar")

    def _shards(self, split: str, required: bool) -> list[str]:
        urls = find_shards(self.root, self.folder, self._split_name(split))
        if not urls and required:
            raise missing_shards_error(self.root, self._split_glob(split), self._describe(split))
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
        return {}

    stream_class: type[EpisodeStream] = EpisodeStream

    def _stream(self, urls: list[str], train: bool) -> EpisodeStream:
        rank, world_size = self._rank_and_world()
        return self.stream_class(
            urls,
            **self._stream_extra(),
            image_transform=self.image_transform,
            batch_size=self.batch_size,
            min_shots=self.min_shots,
            max_shots=self.max_shots,
            seed=self.seed,
            train=train,
            shuffle_buffer=self.shuffle_buffer,
            batches_per_rank=max(1, self.epoch_size // (self.batch_size * world_size)),
            rank=rank,
            world_size=world_size,
        )

    def train_dataloader(self) -> DataLoader:
        urls = self.train_urls or self._shards("train", required=True)
        return EpisodeLoader(self._stream(urls, train=True), batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        urls = self.val_urls or self._shards("val", required=False)
        if not urls:
            logger.warning("no validation shards (%s): skipping validation", self._split_glob("val"))
            return []
        # val_episodes caps each rank's share: about val_episodes in all.
        _, world_size = self._rank_and_world()
        cap = None if self.val_episodes is None else -(-self.val_episodes // world_size)
        stream = self._stream(urls, train=False)
        return EpisodeLoader(stream, max_episodes=cap, batch_size=None, num_workers=self.num_workers)
