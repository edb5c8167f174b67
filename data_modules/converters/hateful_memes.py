"""Hateful Memes -> downstream shards (``hateful_memes``), from either released folder::

    <in>/                            (or <in>/data/, as the first release's zip unpacks)
        train.jsonl  dev_seen.jsonl  dev_unseen.jsonl  test_seen.jsonl  test_unseen.jsonl   (second release)
        train.jsonl  dev.jsonl  test.jsonl                                                  (first release)
                     one meme a line: {"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}
        img/42953.png ...            the memes, relative to the jsonl's folder (or --images DIR: DIR/<img>)

``--split`` is a file's stem: ``dev`` is the first release's dev set, ``dev_seen``/``dev_unseen`` the
second's; asking for one release's name in the other's folder is an error naming the split there. One
sample per meme: its image and a ``json``::

    {"id": "42953", "task": "hateful_memes", "text": "its their character not their color that matters",
     "label": 0}

The meme's written text is the example's question (see `data_modules.downstream.decode_example`); the
label (1 = hateful) is its answer. The first release's ``test.jsonl`` has no labels: a split none of whose
lines has one is refused; a single unlabelled line in a labelled split is skipped and counted.
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
    iter_json_lines,
    read_image_file,
    register,
    require_file,
    safe_key,
)

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen", "dev")
# What a split of one release is called in the other: named in the error when only the other's files are there.
OTHER_RELEASE = {"dev": ("dev_seen", "dev_unseen"), "dev_seen": ("dev",), "dev_unseen": ("dev",)}

LAYOUT = """\
<in>/            (or <in>/data/, as the first release's zip unpacks)
    train.jsonl dev_seen.jsonl dev_unseen.jsonl test_seen.jsonl test_unseen.jsonl   (second release)
    train.jsonl dev.jsonl                   (first release: --split dev; its test.jsonl has no labels)
                 a line: {"id", "img": "img/42953.png", "label": 0|1, "text"}
    img/<id>.png relative to the jsonl's folder (or --images DIR: DIR/<img>)"""


def _label(value: Any) -> int | None:
    """A 0/1 label, or None when the line has none (or something else)."""
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int) and value in (0, 1) else None


def _meme_sample(line: Any, images: Path, ctx: Context) -> Sample | None:
    if not isinstance(line, dict) or not isinstance(line.get("img"), str) or not isinstance(line.get("text"), str) \
            or not isinstance(line.get("id"), int | str):
        ctx.skip("malformed line")
        return None
    label = _label(line.get("label"))
    if label is None:
        ctx.skip("no label")
        return None
    image = read_image_file(images / line["img"], ctx)
    if image is None:
        return None
    meta = {"id": str(line["id"]), "task": "hateful_memes", "text": line["text"], "label": label}
    return example_sample(safe_key(str(line["id"])), meta, image)


def _split_file(src: Path, split: str) -> Path:
    """``<in>/<split>.jsonl``, or ``<in>/data/<split>.jsonl``; when the folder is the other release's, a
    ConvertError naming the split to ask for there (``dev.jsonl`` for ``--split dev_seen``, and the reverse)."""
    folders = (src, src / "data")
    for folder in folders:
        if (folder / f"{split}.jsonl").is_file():
            return folder / f"{split}.jsonl"
    for folder in folders:
        there = [name for name in OTHER_RELEASE.get(split, ()) if (folder / f"{name}.jsonl").is_file()]
        if there:
            release = "second" if split == "dev" else "first"
            raise ConvertError(f"hateful_memes --split {split}: {folder} holds the {release} release, which has "
                               f"no {split}.jsonl; ask for --split {' or --split '.join(there)}")
        if split.startswith("test_") and (folder / "test.jsonl").is_file():
            raise ConvertError(f"hateful_memes --split {split}: {folder} holds the first release, whose only test "
                               f"file (test.jsonl) has no labels; evaluate on --split dev, or get the second "
                               f"release (test_seen/test_unseen with labels)")
    return require_file(src / f"{split}.jsonl", f"hateful_memes {split} split", LAYOUT)


@register("hateful_memes", kind="image", layout=LAYOUT, splits=SPLITS, unavailable={
    "test": "the first release's test.jsonl has no labels; use test_seen or test_unseen (released with labels), "
            "or the first release's --split dev"})
def read_hateful_memes(ctx: Context) -> Iterator[Sample]:
    extra_options(ctx, {})
    split = str(ctx.options.split)
    path = _split_file(ctx.options.src, split)
    # The split is small (at most ~9k memes): read it whole, so an unlabelled split is refused before any
    # shard is written. Lines that do not parse are counted (and advanced past) by iter_json_lines.
    lines = [line for _, line in iter_json_lines(path, ctx)]
    if lines and not any(isinstance(line, dict) and _label(line.get("label")) is not None for line in lines):
        raise ConvertError(f"{path}: no line has a label (0 or 1); an unlabelled test file cannot be evaluated\n"
                           f"expected layout:\n{LAYOUT}")
    ctx.total(len(lines) + sum(ctx.skipped.values()))  # the lines read so far that did not parse count too
    images = ctx.options.images or path.parent
    yield from each_sample(lines, lambda line: _meme_sample(line, images, ctx), ctx)
