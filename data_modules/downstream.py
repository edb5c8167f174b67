"""Downstream examples (queries) and the demonstration pool they draw from.

Shards hold one example per sample: an image (``jpg``/``jpeg``/``png``/``webp``) and a ``json`` with
``id``, ``task``, ``question`` (or ``prompt``; Hateful Memes: the meme's written ``text``) and ``answers`` (or
``captions``, or ``label``; a 0/1 ``label`` is also kept as ``Example.label`` for classification). A video
sample has frame members ``frame_000.jpg``, ``frame_001.jpg``, ... instead of one image. Splits are
separate shard sets under ``root/<task folder>/{split}-*.tar``; the demo pool is the train split. The
sets are small (thousands), so they are loaded into memory once; corrupt samples are skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import webdataset as wds

from .episodes import ImageTransform, decode_image
from .skips import record_skip, skip_handler
from .streaming import find_shards, missing_shards_error

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Example:
    """One downstream example. Examples loaded from shards keep their *encoded* image(s) and decode on access
    (``example.image`` runs the backbone's transform each time): a demo pool of 10^5 examples then costs its
    JPEG bytes in memory, not 10^5 preprocessed tensors (1.3 MB each at 336 px)."""

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


def _example_image(self: Example) -> Any:
    value = self.__dict__.get("_image")
    if value is not None or self.transform is None:
        return value
    if self.frames_bytes:
        return [self.transform(decode_image(data)) for data in self.frames_bytes]
    return self.transform(decode_image(self.image_bytes))


def _set_example_image(self: Example, value: Any) -> None:
    self.__dict__["_image"] = value


Example.image = property(_example_image, _set_example_image)  # type: ignore[assignment,method-assign]


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


def decode_example(sample: dict, image_transform: ImageTransform, eager: bool = False) -> Example | None:
    """One sample -> an Example (None, counted, when unusable). ``eager``: transform now and keep the tensor
    (a training stream uses each example once); else keep the bytes and transform on access."""
    raw = sample.get("json")
    if raw is None:
        record_skip("missing json")
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        record_skip("json does not parse")
        return None
    if not isinstance(meta, dict):
        record_skip("malformed example")
        return None
    answers = _answers(meta)
    if answers is None:
        record_skip("missing answers")
        return None
    data = next((sample[key] for key in IMAGE_KEYS if key in sample), None)
    frames = _frame_keys(sample) if data is None else []
    if data is None and not frames:
        record_skip("missing image")
        return None
    frames_bytes = [sample[key] for key in frames] if frames else None
    try:  # decoded here so a corrupt example is skipped now, not in the middle of an evaluation
        decoded = [decode_image(encoded) for encoded in frames_bytes or [data]]
        image = None
        if eager:
            image = [image_transform(im) for im in decoded] if frames_bytes else image_transform(decoded[0])
    except Exception:  # PIL raises many types for bad bytes
        record_skip("image does not decode")
        return None
    return Example(
        id=str(meta.get("id", sample["__key__"])),
        image=image,
        transform=None if eager else image_transform,
        image_bytes=frames_bytes[0] if frames_bytes else data,
        frames_bytes=frames_bytes,
        # Hateful Memes keeps the meme's words in "text" (the dataset's own field): they are its question.
        question=str(meta.get("question", meta.get("prompt", meta.get("text", "")))),
        answers=answers,
        task=str(meta.get("task", "")),
        group=str(meta["episode"]) if meta.get("episode") is not None else None,
        label=_binary_label(meta),
        source_split=str(meta["karpathy_split"]) if meta.get("karpathy_split") is not None else None,
    )


def _samples(urls: list[str]) -> Iterator[dict]:
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=skip_handler("tar"))))


def _examples(urls: list[str], image_transform: ImageTransform) -> Iterator[Example]:
    for sample in _samples(urls):
        example = decode_example(sample, image_transform)
        if example is not None:
            yield example


def count_samples(urls: list[str]) -> int:
    """How many samples the shards hold (read, not decoded): what a seeded subset of positions is drawn from."""
    return sum(1 for _ in _samples(urls))


def load_examples_at(urls: list[str], image_transform: ImageTransform, positions: Collection[int]
                     ) -> dict[int, Example]:
    """The examples at these sample positions (0-based, in shard order, the file order the converter kept), by
    position; a corrupt sample at a chosen position is skipped and counted like any other."""
    wanted, found = set(positions), {}
    for position, sample in enumerate(_samples(urls)):
        if position in wanted:
            example = decode_example(sample, image_transform)
            if example is not None:
                found[position] = example
    return found


def load_examples(
    urls: list[str] | str, image_transform: ImageTransform, limit: int | None = None
) -> list[Example]:
    """Read examples from shards in order (a brace pattern or a list); at most ``limit`` good ones."""
    if isinstance(urls, str):
        urls = list(wds.shardlists.expand_urls(urls))
    if not urls:
        return []
    examples: list[Example] = []
    for example in _examples(urls, image_transform):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(example)
    return examples


def convert_command(task: str, folder: Path, split: str) -> str:
    """The `mmict data convert` line that writes ``folder/split-*.tar`` for ``task`` (named in errors)."""
    return f"mmict data convert {task} --in <{task} release folder> --split <its split> --out {folder}/{split}-%06d.tar"


class DownstreamDataModule(L.LightningDataModule):
    """The demo pool (``pool``, ``pool_by_id``) and the evaluation queries (``queries``) of one task."""

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
        self.pool: list[Example] = []
        self.pool_by_id: dict[str, Example] = {}
        self.queries: list[Example] = []

    def shards(self, split: str) -> list[str]:
        """The split's shards; FileNotFoundError (with the command that builds them) if there are none."""
        folder = self.folder
        urls = find_shards(self.root, folder, split)
        if not urls:
            searched = str(self.root / folder / f"{split}-*.tar")
            raise missing_shards_error(self.root, searched, f"The {self.task} {split} split",
                                       convert_command(self.task, self.root / folder, split))
        return urls

    def setup(self, stage: str | None = None) -> None:
        self.pool = load_examples(self.shards(self.pool_split), self.image_transform)
        self.pool_by_id = {example.id: example for example in self.pool}
        if len(self.pool_by_id) != len(self.pool):
            logger.warning(
                "%s %s split: %d duplicate example ids; pool_by_id keeps the last of each",
                self.task, self.pool_split, len(self.pool) - len(self.pool_by_id),
            )  # fmt: skip
        if self.load_queries:
            self.queries = load_examples(self.shards(self.query_split), self.image_transform, self.num_queries)

    def count_queries(self) -> int:
        """Samples in the query split (corrupt ones included: positions are stable)."""
        return count_samples(self.shards(self.query_split))

    def queries_at(self, positions: Collection[int]) -> dict[int, Example]:
        """The query split's examples at these positions (those that decode), by position."""
        return load_examples_at(self.shards(self.query_split), self.image_transform, positions)
