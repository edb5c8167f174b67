"""Downstream examples (queries) and the demonstration pool they draw from.

Shards hold one example per sample: an image (``jpg``/``jpeg``/``png``/``webp``) and a ``json`` with
``id``, ``task``, ``question`` (or ``prompt``; Hateful Memes: the meme's written ``text``) and ``answers`` (or
``captions``, or ``label``; a 0/1 ``label`` is also kept as ``Example.label`` for classification). A video
sample has frame members ``frame_000.jpg``, ``frame_001.jpg``, ... instead of one image. Splits are
separate shard sets under ``root/<task folder>/{split}-*.tar``; the demo pool is the train split.

`DownstreamDataModule` reads a split through its index (`shard_index`, built once per shard and cached next to
it): every example's metadata (id, question, answers, task, episode, label, Karpathy split) is in memory, its
encoded image stays in the shard and is read (one seek) whenever ``image_bytes``, ``frames_bytes`` or ``image`` is
asked for, so a pool of 10^5 videos costs its metadata, not its frames. Building the index decodes every image once,
so a corrupt sample is known from then on: skipped and counted (`skips`) every time the split is opened, at the
same positions as a full read (`load_examples`, which keeps the bytes in memory: small sets, converters, tests).
What the pool and the queries lost is kept for the caller to report (`pool_loss`, `query_loss`, `query_loss_at`:
`skips.SplitLoss`): skipped samples by reason, shards that broke off or are empty, and samples missing against the
size the split was written with.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import webdataset as wds

from .episodes import ImageTransform, decode_image
from .shard_index import ShardFile, index_shards
from .skips import SplitLoss, broken_shards, record_skip, recorded_size, skip_handler
from .streaming import find_shards, missing_shards_error

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class StoredImages:
    """Where an indexed example's encoded image (a video: its frames) lies in its shard: read on every access, never
    kept."""

    __slots__ = ("shard", "spans", "video")

    def __init__(self, shard: ShardFile, spans: array, video: bool) -> None:
        self.shard, self.spans, self.video = shard, spans, video

    def first(self) -> bytes:
        """The image (a video: its first frame)."""
        return self.shard.read(self.spans[:2])[0]

    def frames(self) -> list[bytes] | None:
        return self.shard.read(self.spans) if self.video else None


@dataclass
class Example:
    """One downstream example. Examples loaded from shards keep their *encoded* image(s) and decode on access
    (``example.image`` runs the backbone's transform each time): a demo pool of 10^5 examples then costs its
    JPEG bytes in memory, not 10^5 preprocessed tensors (1.3 MB each at 336 px). Examples of an indexed split
    (`DownstreamDataModule`) do not even keep the bytes: ``stored`` says where they are, and ``image_bytes`` /
    ``frames_bytes`` read them from the shard on every access."""

    id: str
    # The backbone's image input (a video: one per frame, MMICT). Set directly (tests, in-memory data), or
    # None with `transform` + encoded bytes: then it is decoded on every access.
    image: Any = field(repr=False, compare=False)
    question: str
    answers: list[str]
    task: str
    group: str | None = None  # the episode an example belongs to (binding tasks), from json "episode"
    label: int | None = None  # a binary class (Hateful Memes: 1 = hateful), from json "label" when it is 0/1
    # The split of the dataset's own release the example came from where a converter merges several into one of
    # ours (Karpathy's "train" vs "restval" in our coco_caption train split), from json "karpathy_split".
    source_split: str | None = None
    # The encoded image as stored (a video: its first frame): RICES embeds it with CLIP's own preprocessing.
    image_bytes: bytes | None = field(default=None, repr=False, compare=False)
    frames_bytes: list[bytes] | None = field(default=None, repr=False, compare=False)  # a video's frames
    transform: ImageTransform | None = field(default=None, repr=False, compare=False)
    # Where the encoded image(s) lie in their shard (an indexed split): image_bytes / frames_bytes read from it.
    stored: StoredImages | None = field(default=None, repr=False, compare=False)

    @property
    def has_encoded_image(self) -> bool:
        """Whether the encoded image is known (kept or stored), without reading it."""
        return self.stored is not None or self.__dict__.get("_image_bytes") is not None or bool(
            self.__dict__.get("_frames_bytes"))


def _example_image(self: Example) -> Any:
    value = self.__dict__.get("_image")
    if value is not None or self.transform is None:
        return value
    frames = self.frames_bytes
    if frames:
        return [self.transform(decode_image(data)) for data in frames]
    return self.transform(decode_image(self.image_bytes))


def _set_example_image(self: Example, value: Any) -> None:
    self.__dict__["_image"] = value


def _example_image_bytes(self: Example) -> bytes | None:
    value = self.__dict__.get("_image_bytes")
    stored = self.__dict__.get("stored")
    return stored.first() if value is None and stored is not None else value


def _set_example_image_bytes(self: Example, value: bytes | None) -> None:
    self.__dict__["_image_bytes"] = value


def _example_frames_bytes(self: Example) -> list[bytes] | None:
    value = self.__dict__.get("_frames_bytes")
    stored = self.__dict__.get("stored")
    return stored.frames() if value is None and stored is not None else value


def _set_example_frames_bytes(self: Example, value: list[bytes] | None) -> None:
    self.__dict__["_frames_bytes"] = value


# Properties set after the dataclass is made, so that its __init__ (and the fields' defaults) stay as declared.
Example.image = property(_example_image, _set_example_image)  # type: ignore[assignment,method-assign]
Example.image_bytes = property(_example_image_bytes, _set_example_image_bytes)  # type: ignore[assignment]
Example.frames_bytes = property(_example_frames_bytes, _set_example_frames_bytes)  # type: ignore[assignment]


def _answers(meta: dict) -> list[str] | None:
    for key in ("answers", "captions"):
        values = meta.get(key)
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            return values
    if "label" in meta and meta["label"] is not None:
        return [str(meta["label"])]
    return None


def _binary_label(meta: dict) -> int | None:
    """json "label" as 0/1 when it is one (an int, a bool or the strings "0"/"1"), else None."""
    value = meta.get("label")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | str) and str(value).strip() in ("0", "1"):
        return int(str(value).strip())
    return None


def _frame_keys(sample: dict) -> list[str]:
    """A video sample's frame members (``frame_000.jpg``, ``frame_001.jpg``, ...) in order."""
    return sorted(k for k in sample if k.startswith("frame") and k.rsplit(".", 1)[-1] in IMAGE_KEYS)


def _check(sample: dict) -> tuple[dict[str, Any], list[str], list[Any]] | str:
    """A sample's example fields (all but its images), the members holding its image(s) in order and those images
    decoded (so a corrupt one is found here); or why the sample is unusable (the skip reason)."""
    raw = sample.get("json")
    if raw is None:
        return "missing json"
    try:
        meta = json.loads(raw)
    except ValueError:
        return "json does not parse"
    if not isinstance(meta, dict):
        return "malformed example"
    answers = _answers(meta)
    if answers is None:
        return "missing answers"
    keys = [key for key in IMAGE_KEYS if key in sample][:1] or _frame_keys(sample)
    if not keys:
        return "missing image"
    try:
        decoded = [decode_image(sample[key]) for key in keys]
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return "image does not decode"
    fields = {
        "id": str(meta.get("id", sample["__key__"])),
        # Hateful Memes keeps the meme's words in "text" (the dataset's own field): they are its question.
        "question": str(meta.get("question", meta.get("prompt", meta.get("text", "")))),
        "answers": answers,
        "task": str(meta.get("task", "")),
        "group": str(meta["episode"]) if meta.get("episode") is not None else None,
        "label": _binary_label(meta),
        "source_split": str(meta["karpathy_split"]) if meta.get("karpathy_split") is not None else None,
    }
    return fields, keys, decoded


def decode_example(sample: dict, image_transform: ImageTransform, eager: bool = False) -> Example | None:
    """One sample -> an Example (None, counted, when unusable). ``eager``: transform now and keep the tensor
    (a training stream uses each example once); else keep the bytes and transform on access."""
    checked = _check(sample)  # decoded here so a corrupt example is skipped now, not in the middle of an evaluation
    if isinstance(checked, str):
        record_skip(checked)
        return None
    fields, keys, decoded = checked
    video = keys[0] not in IMAGE_KEYS
    data = [sample[key] for key in keys]
    image = None
    if eager:
        try:
            image = [image_transform(im) for im in decoded] if video else image_transform(decoded[0])
        except Exception:  # noqa: BLE001 - as a corrupt image
            record_skip("image does not decode")
            return None
    return Example(**fields, image=image, transform=None if eager else image_transform, image_bytes=data[0],
                   frames_bytes=data if video else None)


def _samples(urls: list[str]) -> Iterator[dict]:
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=skip_handler("tar"))))


def load_examples(
    urls: list[str] | str, image_transform: ImageTransform, limit: int | None = None
) -> list[Example]:
    """Read examples from shards in order (a brace pattern or a list); at most ``limit`` good ones."""
    if isinstance(urls, str):
        urls = list(wds.shardlists.expand_urls(urls))
    if not urls:
        return []
    examples: list[Example] = []
    for sample in _samples(urls):
        example = decode_example(sample, image_transform)
        if example is None:
            continue
        if limit is not None and len(examples) >= limit:
            break
        examples.append(example)
    return examples


# ---------------------------------------------------------------------------------------------------
# Indexed splits: metadata in memory, images in the shards

# What `_index_record` keeps: bump it whenever it changes, so every cached index is rebuilt.
RECIPE = "downstream-example/1"
_FIELDS = ("id", "question", "answers", "task", "group", "label", "source_split")


def _index_record(sample: dict) -> tuple[list, list[str]] | str:
    checked = _check(sample)
    if isinstance(checked, str):
        return checked
    fields, keys, _ = checked
    return [*(fields[name] for name in _FIELDS), keys[0] not in IMAGE_KEYS], keys


class IndexedSplit:
    """One split's shards through their index: every sample by position (corrupt ones included, numbered as a full
    read numbers them), a kept one as its metadata and where its images are, a skipped one as its reason."""

    def __init__(self, urls: list[str], cache_dir: str | Path | None = None) -> None:
        self.samples: list[tuple | str] = []
        self.errors: list[str] = []  # tar errors (each lost the rest of its shard)
        self.shards: list[tuple[str, int, int, list[str]]] = []  # (name, first position, end position, tar errors)
        for index in index_shards(urls, _index_record, recipe=RECIPE, cache_dir=cache_dir):
            start = len(self.samples)
            self.samples += [s[1] if len(s) == 2 else (s[1], index.shard, s[2]) for s in index.samples]
            self.errors += index.errors
            self.shards.append((Path(index.shard.path).name, start, len(self.samples), list(index.errors)))
        self.kept = array("q", (p for p, s in enumerate(self.samples) if not isinstance(s, str)))

    def __len__(self) -> int:
        return len(self.samples)

    def count_skips(self, positions: Collection[int] | None = None) -> int:
        """Count (`skips.record_skip`) what a full read of these positions skips (None: the whole split, tar
        errors included); the number skipped."""
        chosen = range(len(self.samples)) if positions is None else positions
        reasons = [r for r in (self.samples[p] for p in chosen) if isinstance(r, str)]
        if positions is None:
            reasons += self.errors
        for reason in reasons:
            record_skip(reason)
        return len(reasons)

    def loss(self, kept: int, positions: Collection[int] | None = None, read_to: int | None = None,
             recorded: tuple[int, list[str]] | None = None) -> SplitLoss:
        """What reading these positions (None: all) lost: their skipped samples by reason, the shards that broke off
        or held nothing among those starting before position ``read_to`` (None: every shard) and, when the whole
        split was read (``read_to`` None), the samples missing against its ``recorded`` size and shard names."""
        chosen = range(len(self.samples)) if positions is None else positions
        reasons = Counter(r for r in (self.samples[p] for p in chosen) if isinstance(r, str))
        shards = broken_shards([sh for sh in self.shards if read_to is None or sh[1] < read_to])
        if read_to is None and recorded is not None:
            found = {name for name, *_ in self.shards}
            shards.update({name: "is missing" for name in recorded[1] if name not in found})
            if recorded[0] > len(self.samples):
                reasons["lost with broken or missing shards" if shards else "missing (fewer samples than recorded)"] \
                    = recorded[0] - len(self.samples)
        return SplitLoss(kept, dict(reasons), shards, None if recorded is None else recorded[0])

    def example(self, position: int, image_transform: ImageTransform) -> Example | None:
        """The example at a sample position (None: the sample is skipped), its images left in the shard."""
        sample = self.samples[position]
        if isinstance(sample, str):
            return None
        record, shard, spans = sample
        fields = dict(zip(_FIELDS, record, strict=False))
        fields["answers"] = list(fields["answers"])
        return Example(**fields, image=None, transform=image_transform,
                       stored=StoredImages(shard, spans, bool(record[len(_FIELDS)])))

    def examples(self, image_transform: ImageTransform) -> ShardExamples:
        """The kept examples in order, materialised on access."""
        return ShardExamples(self, self.kept, image_transform)

    def at(self, positions: Collection[int], image_transform: ImageTransform) -> dict[int, Example]:
        """The examples at these sample positions, by position; a skipped one is counted and left out."""
        wanted = sorted(set(positions))
        self.count_skips(wanted)
        found = {p: self.example(p, image_transform) for p in wanted}
        return {p: ex for p, ex in found.items() if ex is not None}


class ShardExamples(Sequence):
    """A `Sequence[Example]` over an indexed split's kept samples: each Example is made on first access and kept
    (so ``pool[i] is pool[i]``), holding its metadata and where its images are, never their bytes."""

    def __init__(self, split: IndexedSplit, positions: array, image_transform: ImageTransform) -> None:
        self.split, self.positions, self.image_transform = split, positions, image_transform
        self._made: list[Example | None] = [None] * len(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        made = self._made[i]
        if made is None:
            made = self._made[i] = self.split.example(self.positions[i], self.image_transform)
        return made

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __add__(self, other: Sequence[Example]) -> list[Example]:
        return [*self, *other]

    def __radd__(self, other: Sequence[Example]) -> list[Example]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"ShardExamples({len(self)} examples, {len(self.split)} samples indexed)"

    def with_transform(self, image_transform: ImageTransform) -> ShardExamples:
        """The same examples decoding their images with another transform (demo images at the base view)."""
        return ShardExamples(self.split, self.positions, image_transform)

    def by_id(self) -> ExamplesById:
        return ExamplesById(self)


class ExamplesById(Mapping):
    """id -> Example over a `ShardExamples` (the last of duplicate ids wins), materialising on access."""

    def __init__(self, examples: ShardExamples) -> None:
        self.examples = examples
        samples = examples.split.samples
        self._at = {samples[p][0][0]: i for i, p in enumerate(examples.positions)}

    def __getitem__(self, key: str) -> Example:
        return self.examples[self._at[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


def convert_command(task: str, folder: Path, split: str) -> str:
    """The `mmict data convert` line that writes ``folder/split-*.tar`` for ``task`` (named in errors)."""
    return f"mmict data convert {task} --in <{task} release folder> --split <its split> --out {folder}/{split}-%06d.tar"


class DownstreamDataModule(L.LightningDataModule):
    """The demo pool (``pool``, ``pool_by_id``) and the evaluation queries (``queries``) of one task.

    Both are read through the splits' indexes (`IndexedSplit`): ``pool`` is a lazy `Sequence[Example]` whose
    examples hold their metadata only and read their images from the shards when asked; ``index_cache_dir``: where
    the indexes of shards in read-only folders go (default ``$XDG_CACHE_HOME/mmict/shard-index``)."""

    def __init__(
        self,
        root: str | Path,
        *,
        folder: str,
        task: str | None = None,
        image_transform: ImageTransform,
        query_split: str = "test",
        pool_split: str = "train",
        num_queries: int | None = None,
        load_queries: bool = True,
        index_cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.folder = folder  # under root: the task's folder (mmict.eval.tasks names it; no table here)
        self.task = task or folder  # for messages and the convert command they suggest
        self.image_transform = image_transform
        self.query_split = query_split
        self.pool_split = pool_split
        self.num_queries = num_queries
        # False: setup reads the pool only, and the caller picks queries by position (`count_queries`,
        # `queries_at`): a seeded random subset per trial, as OpenFlamingo's harness draws them.
        self.load_queries = load_queries
        self.index_cache_dir = index_cache_dir
        self.pool: Sequence[Example] = []
        self.pool_by_id: Mapping[str, Example] = {}
        self.queries: list[Example] = []
        # What the pool and the queries read in `setup` lost (`skips.SplitLoss`); queries drawn by position:
        # `query_loss_at`.
        self.pool_loss: SplitLoss | None = None
        self.query_loss: SplitLoss | None = None
        self._splits: dict[str, IndexedSplit] = {}

    def shards(self, split: str) -> list[str]:
        """The split's shards; FileNotFoundError (with the command that builds them) if there are none."""
        folder = self.folder
        urls = find_shards(self.root, folder, split)
        if not urls:
            searched = str(self.root / folder / f"{split}-*.tar")
            raise missing_shards_error(self.root, searched, f"The {self.task} {split} split",
                                       convert_command(self.task, self.root / folder, split))
        return urls

    def indexed(self, split: str) -> IndexedSplit:
        """The split through its index (built on first use, then read from its cache), once per data module."""
        if split not in self._splits:
            self._splits[split] = IndexedSplit(self.shards(split), self.index_cache_dir)
        return self._splits[split]

    def setup(self, stage: str | None = None) -> None:
        pool = self.indexed(self.pool_split)
        pool.count_skips()  # the corrupt samples, counted as a full read counts them
        self.pool_loss = pool.loss(len(pool.kept), recorded=self._recorded(self.pool_split))
        if self.pool_loss:
            logger.warning("%s %s split (the demo pool): %s", self.task, self.pool_split,
                           self.pool_loss.describe("corrupt or unusable samples skipped"))
        self.pool = pool.examples(self.image_transform)
        self.pool_by_id = self.pool.by_id()
        if len(self.pool_by_id) != len(self.pool):
            logger.warning(
                "%s %s split: %d duplicate example ids; pool_by_id keeps the last of each",
                self.task, self.pool_split, len(self.pool) - len(self.pool_by_id),
            )  # fmt: skip
        if self.load_queries:
            queries = self.indexed(self.query_split)
            kept = queries.kept if self.num_queries is None else queries.kept[: self.num_queries]
            # What a read up to the last query skips is counted, as `load_examples(limit=...)` counts it.
            every = self.num_queries is None or len(kept) < self.num_queries
            queries.count_skips(None if every else range(kept[-1] + 1))
            self.queries = list(ShardExamples(queries, kept, self.image_transform))
            self.query_loss = queries.loss(len(kept), None if every else range(kept[-1] + 1),
                                           None if every else kept[-1] + 1, self._recorded(self.query_split))
            if self.query_loss:
                logger.warning("%s %s split (the queries): %s", self.task, self.query_split,
                               self.query_loss.describe("corrupt or unusable samples skipped"))

    def count_queries(self) -> int:
        """Samples in the query split (corrupt ones included: positions are stable)."""
        return len(self.indexed(self.query_split))

    def queries_at(self, positions: Collection[int]) -> dict[int, Example]:
        """The query split's examples at these positions (those that decode), by position."""
        return self.indexed(self.query_split).at(positions, self.image_transform)

    def query_loss_at(self, positions: Collection[int]) -> SplitLoss:
        """What queries drawn at these positions lost: theirs skipped by reason, and what the whole split lost to
        broken or missing shards (the draw could not reach it)."""
        split = self.indexed(self.query_split)
        wanted = set(positions)
        kept = sum(1 for p in wanted if not isinstance(split.samples[p], str))
        return split.loss(kept, wanted, recorded=self._recorded(self.query_split))

    def _recorded(self, split: str) -> tuple[int, list[str]] | None:
        return recorded_size(self.root, self.folder, split)
