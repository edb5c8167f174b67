"""Caption sets in Karpathy's split files -> downstream shards: COCO (``coco_caption``) and Flickr30k.

COCO, splits train, val, test (Karpathy's; train includes ``restval``, as is usual practice)::

    <in>/                                  (or --in the json itself: images relative to its folder)
        dataset_coco.json                  {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}],
                                             "cocoid", ...}]}
        train2014/COCO_train2014_000000000009.jpg      <in>/<filepath>/<filename>
        val2014/...                                    (or --images DIR: DIR/<filepath>/<filename>)

Flickr30k, the same with ``dataset_flickr30k.json`` and the images in ``<in>/flickr30k-images/<filename>``
(or --images DIR: DIR/<filename>).

One sample per image: the image and a ``json`` such as::

    {"id": "391895", "task": "coco_caption", "image_id": 391895,
     "captions": ["A man with a red helmet on a small moped on a dirt road. ", ...]}

(Flickr30k: ``id`` and ``image_id`` are the file name's stem, "1000092795".) An image that is missing or
does not decode, or has no captions, is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import (
    Context,
    ConvertError,
    Sample,
    each_sample,
    example_sample,
    extra_options,
    read_image_file,
    register,
    safe_key,
)
from .vqa import load_json

SPLITS = ("train", "val", "test")
# Karpathy's "restval" (COCO val2014 images left out of his val and test) is training data, as usual.
SPLIT_MEMBERS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}

COCO_LAYOUT = """\
<in>/                          (or --in the json: images relative to its folder)
    dataset_coco.json          Karpathy split: {"images": [{filepath, filename, split, sentences, cocoid}]}
    <filepath>/<filename>      train2014/..., val2014/... (or --images DIR: DIR/<filepath>/<filename>)
--split train is Karpathy's train + restval"""

FLICKR_LAYOUT = """\
<in>/                          (or --in the json: images relative to its folder)
    dataset_flickr30k.json     Karpathy split: {"images": [{filename, split, sentences}]}
    flickr30k-images/<filename>   (or --images DIR: DIR/<filename>)
--split train is Karpathy's train (+ restval, if any)"""


def _karpathy_records(ctx: Context, json_name: str, layout: str) -> tuple[list, Path]:
    """The records of the split asked for, and the folder the image paths are relative to (sets the total)."""
    extra_options(ctx, {})
    src = ctx.options.src
    path = src if src.is_file() else src / json_name
    data = load_json(path, f"Karpathy split file {json_name}", layout)
    records = data.get("images") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ConvertError(f"{path}: expected a json object with an 'images' list\nexpected layout:\n{layout}")
    members = SPLIT_MEMBERS[str(ctx.options.split)]
    chosen = [r for r in records if isinstance(r, dict) and r.get("split") in members]
    malformed = sum(1 for r in records if not isinstance(r, dict))
    ctx.total(len(chosen) + malformed)
    if malformed:  # not in any split we can tell: counted, not dropped unseen
        ctx.skip("malformed image record", malformed)
        ctx.advance(malformed)
    return chosen, path.parent


def _captions(record: dict) -> list[str]:
    sentences = record.get("sentences")
    if not isinstance(sentences, list):
        return []
    return [s["raw"] for s in sentences if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()]


def _caption_sample(record: dict, path: Path, task: str, id_: str, image_id: Any, ctx: Context) -> Sample | None:
    captions = _captions(record)
    if not captions:
        ctx.skip("no captions")
        return None
    image = read_image_file(path, ctx)
    if image is None:
        return None
    # Karpathy's own split of the image ("train" or "restval" in our train split): OpenFlamingo's harness draws
    # caption demos from "train" only (eval_datasets.py CaptionDataset, line 29), the eval protocol filters by it.
    meta = {"id": id_, "task": task, "captions": captions, "image_id": image_id, "karpathy_split": record.get("split")}
    return example_sample(safe_key(id_), meta, image)


def _coco_sample(record: dict, root: Path, ctx: Context) -> Sample | None:
    filepath, filename, cocoid = record.get("filepath"), record.get("filename"), record.get("cocoid")
    if not isinstance(filepath, str) or not isinstance(filename, str) or not isinstance(cocoid, int):
        ctx.skip("malformed image record")
        return None
    return _caption_sample(record, root / filepath / filename, "coco_caption", str(cocoid), cocoid, ctx)


def _flickr_sample(record: dict, images: Path, ctx: Context) -> Sample | None:
    filename = record.get("filename")
    if not isinstance(filename, str) or not filename:
        ctx.skip("malformed image record")
        return None
    stem = Path(filename).stem
    return _caption_sample(record, images / filename, "flickr30k", stem, stem, ctx)


@register("coco_caption", kind="image", layout=COCO_LAYOUT, splits=SPLITS)
def read_coco_caption(ctx: Context) -> Iterator[Sample]:
    records, folder = _karpathy_records(ctx, "dataset_coco.json", COCO_LAYOUT)
    root = ctx.options.images or folder
    yield from each_sample(records, lambda record: _coco_sample(record, root, ctx), ctx)


@register("flickr30k", kind="image", layout=FLICKR_LAYOUT, splits=SPLITS)
def read_flickr30k(ctx: Context) -> Iterator[Sample]:
    records, folder = _karpathy_records(ctx, "dataset_flickr30k.json", FLICKR_LAYOUT)
    images = ctx.options.images or folder / "flickr30k-images"
    yield from each_sample(records, lambda record: _flickr_sample(record, images, ctx), ctx)
