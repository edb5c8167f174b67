"""Web corpora -> web shards: MMC4 and OBELICS documents in OpenFlamingo's MMC4 convention.

MMC4 (``mmc4``), as released, with its images downloaded to one folder::

    <in>/                              a folder of these, or one of them as --in
        docs_shard_0_v2.jsonl.zip      a .jsonl, .jsonl.gz or .jsonl.zip (holding one .jsonl)
        docs_shard_1_v2.jsonl.zip      one document per line: {"url", "text_list": [str],
        ...                              "image_info": [{"image_name", "raw_url", "matched_text_index",
                                         "matched_sim", ...}], "similarity_matrix": [[float]] (images x texts)}
    <images>/<image_name>              --images: the downloaded images
    <images>/<N>/<image_name>          or per shard (--set images=per_shard), as mmc4's download_images.py
                                         --input_shards saves them (N from docs_shard_<N>_v2)

OBELICS (``obelics``), its parquet files (or the same rows as jsonl) with the images downloaded::

    <in>/                              a folder of these, or one of them as --in
        train-00000-of-01335.parquet   rows {"images": [url | null], "texts": [str | null],
        ...                              "general_metadata": json str with "url", "metadata": ...}
    <images>/                          --images: an image url -> <images>/<path from --url-map> when given
                                         (tsv/csv with a url,path header, jsonl {"url", "path"}, or parquet
                                         with url and path columns), else <images>/<last segment of the
                                         url's path>; an entry that is not a url is a path relative to <images>

    --url-map may also be img2dataset's own output (``--output_format files``): one of its
    ``<shard>.parquet`` files, or its output folder for all of them. A url with status "success" maps to
    ``<that folder>/<shard>/<key>.jpg`` (or .png/.webp, as encoded) beside the parquet file; the others
    are dropped, counted as "image dropped: not downloaded (img2dataset status)".

Both write one sample per document::

    __key__ = docs_shard_0_v2-0000012
    json    = {"url": ..., "text_list": [...], "image_info": [{"image_name": "img_0.jpg",
               "matched_text_index": 3, "matched_sim": 0.31}, ...]}   (OBELICS: no matched_sim)
    img_0.jpg, img_1.png, ...     the images, as stored (anything but JPEG/PNG/WEBP re-encoded as PNG)

An image that is missing, does not decode or matches no text is dropped from its document (counted as
"image dropped: ..."); a document left with fewer than 2 image-text pairs is skipped: an episode needs a
demonstration and a query. ``matched_sim`` is kept so a data module can threshold on it.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .common import (
    JSONL_SUFFIXES,
    Context,
    ConvertError,
    Sample,
    extra_options,
    iter_json_lines,
    pyarrow_parquet,
    read_image_file,
    register,
    safe_key,
)
from .url_map import NOT_DOWNLOADED, load_url_map

MMC4_LAYOUT = """\
<in>/                              a folder of these, or one of them as --in
    docs_shard_0_v2.jsonl.zip      .jsonl / .jsonl.gz / .jsonl.zip; a line: {"url", "text_list",
    ...                              "image_info": [{"image_name", "matched_text_index", "matched_sim"}],
                                     "similarity_matrix"}
<images>/<image_name>              --images (required): the downloaded images, in one folder
<images>/<N>/<image_name>          ... or per shard, as mmc4's download_images.py --input_shards saves
                                     them (N from docs_shard_<N>_v2): --set images=per_shard"""

OBELICS_LAYOUT = """\
<in>/                              a folder of these, or one of them as --in
    train-00000-of-01335.parquet   .parquet or .jsonl(.gz/.zip); a row: {"images": [url|null],
    ...                              "texts": [str|null], "general_metadata"}
<images>/                          --images (required): url -> <images>/<path> via --url-map FILE
                                     (tsv/csv with url,path header, jsonl {"url","path"}, parquet with
                                     url,path columns), else <images>/<url's file name>; a non-url
                                     entry: <images>/<entry>
--url-map <img2dataset output>     or img2dataset's output (--output_format files): a <shard>.parquet
                                     or the folder of them; url -> <shard>/<key>.jpg beside it
--set pair=next|previous           the text an image goes with: the next text (default) or the
                                     previous one, falling back to the other side"""

MIN_PAIRS = 2  # a demonstration and a query

# One kept image of a document: (member extension, bytes), its text index, its similarity (MMC4 only).
Kept = tuple[tuple[str, bytes], int, float | None]


# ---------------------------------------------------------------------------------------------------
# Shared


def _source_files(src: Path, suffixes: tuple[str, ...], layout: str) -> list[Path]:
    """``src`` itself if it is a file with one of ``suffixes``, else the folder's such files, sorted."""
    if src.is_file():
        if not src.name.endswith(suffixes):
            raise ConvertError(f"{src}: expected a file ending in {' / '.join(suffixes)}\nexpected layout:\n{layout}")
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise ConvertError(f"no {' / '.join(suffixes)} files in {src}\nexpected layout:\n{layout}")
    return files


def _stem(path: Path, suffixes: tuple[str, ...]) -> str:
    """``docs_shard_0_v2.jsonl.zip`` -> ``docs_shard_0_v2`` (the longest matching suffix removed)."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _images_dir(ctx: Context, name: str, layout: str) -> Path:
    images = ctx.options.images
    if images is None:
        raise ConvertError(f"{name} needs --images DIR, the folder of the downloaded images\n"
                           f"expected layout:\n{layout}")
    if not images.is_dir():
        raise ConvertError(f"--images {images} is not a folder\nexpected layout:\n{layout}")
    return images


def _read_image(path: Path, ctx: Context) -> tuple[str, bytes] | None:
    """An image of a document; None (counted) when missing or undecodable: the image, not the document, goes."""
    return read_image_file(path, ctx, missing="image dropped: missing file",
                           undecodable="image dropped: does not decode")


def _doc_sample(key: str, url: Any, texts: list, kept: list[Kept], ctx: Context) -> Sample | None:
    """The MMC4-convention sample of one document; None (counted) with fewer than MIN_PAIRS pairs."""
    if len(kept) < MIN_PAIRS:
        ctx.skip(f"fewer than {MIN_PAIRS} image-text pairs")
        return None
    sample: Sample = {"__key__": key}
    infos = []
    for j, ((ext, data), index, sim) in enumerate(kept):
        name = f"img_{j}.{ext}"  # lower case: webdataset lower-cases member suffixes when it reads them
        sample[name] = data
        info: dict[str, Any] = {"image_name": name, "matched_text_index": index}
        if sim is not None:
            info["matched_sim"] = sim
        infos.append(info)
    doc = {"url": url, "text_list": texts, "image_info": infos}
    sample["json"] = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    return sample


def _is_text(texts: list, index: Any) -> bool:
    return isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(texts) \
        and isinstance(texts[index], str)


# ---------------------------------------------------------------------------------------------------
# MMC4


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _mmc4_match(info: dict, row: Any) -> tuple[Any, float | None]:
    """(matched_text_index, matched_sim) of an image: its own, else the argmax of its similarity row."""
    numbers = [_number(v) for v in row] if isinstance(row, list) else []
    if info.get("matched_text_index") is not None:
        index = info["matched_text_index"]
        sim = _number(info.get("matched_sim"))
        if sim is None and isinstance(index, int) and 0 <= index < len(numbers):
            sim = numbers[index]
        return index, sim
    if not numbers or any(v is None for v in numbers):
        return None, None
    index = max(range(len(numbers)), key=numbers.__getitem__)
    return index, numbers[index]


def _mmc4_doc(doc: Any, key: str, images: Path, ctx: Context) -> Sample | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("text_list"), list) \
            or not isinstance(doc.get("image_info"), list):
        ctx.skip("malformed document")
        return None
    texts: list = doc["text_list"]
    matrix = doc.get("similarity_matrix")
    kept: list[Kept] = []
    for j, info in enumerate(doc["image_info"]):
        name = info.get("image_name") if isinstance(info, dict) else None
        if not isinstance(name, str) or not name:
            ctx.skip("image dropped: no image_name")
            continue
        row = matrix[j] if isinstance(matrix, list) and j < len(matrix) else None
        index, sim = _mmc4_match(info, row)
        if not _is_text(texts, index):
            ctx.skip("image dropped: matched to no text")
            continue
        image = _read_image(images / name, ctx)
        if image is not None:
            kept.append((image, index, sim))
    return _doc_sample(key, doc.get("url"), texts, kept, ctx)


def _shard_number(path: Path) -> str:
    """``docs_shard_17_v2.jsonl.zip`` -> ``17``: mmc4's download_images.py puts a shard's images in <dir>/17/."""
    found = re.search(r"shard_(\d+)", path.name)
    if found is None:
        raise ConvertError(f"--set images=per_shard: {path.name} has no shard number (docs_shard_<N>_v2.jsonl.zip)")
    return found.group(1)


@register("mmc4", kind="web", layout=MMC4_LAYOUT)
def read_mmc4(ctx: Context) -> Iterator[Sample]:
    """MMC4 documents, one sample each (the number of documents is not known before reading them)."""
    per_shard = extra_options(ctx, {"images": ("flat", "per_shard")})["images"] == "per_shard"
    images = _images_dir(ctx, "mmc4", MMC4_LAYOUT)
    for path in _source_files(ctx.options.src, JSONL_SUFFIXES, MMC4_LAYOUT):
        stem = _stem(path, JSONL_SUFFIXES)
        folder = images / _shard_number(path) if per_shard else images
        for number, doc in iter_json_lines(path, ctx):
            sample = _mmc4_doc(doc, safe_key(f"{stem}-{number:07d}"), folder, ctx)
            ctx.advance()
            if sample is not None:
                yield sample


# ---------------------------------------------------------------------------------------------------
# OBELICS


OBELICS_SUFFIXES = (".parquet", *JSONL_SUFFIXES)
OBELICS_COLUMNS = ("images", "texts", "general_metadata")


def _is_url(entry: str) -> bool:
    parts = urlsplit(entry)
    return bool(parts.scheme and parts.netloc)  # "C:\\x.jpg" has a scheme but no netloc: a path


class ImageResolver:
    """An OBELICS image entry (url or relative path) -> its local file, or None with the reason counted."""

    def __init__(self, images: Path, url_map: dict[str, str | None] | None) -> None:
        self.images = images
        self.url_map = url_map

    def __call__(self, entry: str, ctx: Context) -> Path | None:
        if not _is_url(entry):
            return self.images / entry
        if self.url_map is not None:
            if entry not in self.url_map:
                ctx.skip("image dropped: url not in --url-map")
                return None
            mapped = self.url_map[entry]
            if mapped is None:
                ctx.skip(NOT_DOWNLOADED)
                return None
            return self.images / mapped  # an absolute path (img2dataset's) stays as it is
        name = urlsplit(entry).path.rsplit("/", 1)[-1]
        if not name:
            ctx.skip("image dropped: url names no file")
            return None
        return self.images / name


def obelics_pairs(images: list, texts: list, prefer: str) -> tuple[list[str], list[tuple[int, int | None]]]:
    """(text_list, [(position of an image, its index in text_list or None)]) of one interleaved document.

    An image goes with the nearest text after it (``prefer="next"``) or before it (``"previous"``),
    falling back to the other side when there is none on the preferred one.
    """
    text_list: list[str] = []
    index_at: dict[int, int] = {}  # position in the document -> index in text_list
    for position, text in enumerate(texts):
        if isinstance(text, str):
            index_at[position] = len(text_list)
            text_list.append(text)
    positions = sorted(index_at)
    pairs = []
    for position, entry in enumerate(images):
        if entry is None:
            continue
        later = bisect.bisect_right(positions, position)  # the first text strictly after the image
        earlier = bisect.bisect_left(positions, position)  # one past the last text strictly before it
        after = positions[later] if later < len(positions) else None
        before = positions[earlier - 1] if earlier else None
        first, second = (after, before) if prefer == "next" else (before, after)
        chosen = first if first is not None else second
        pairs.append((position, None if chosen is None else index_at[chosen]))
    return text_list, pairs


def _obelics_url(general_metadata: Any) -> Any:
    """The page url from ``general_metadata`` (a json string in the release, a dict in some exports)."""
    meta = general_metadata
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    return meta.get("url") if isinstance(meta, dict) else None


def _obelics_doc(row: Any, key: str, resolve: ImageResolver, prefer: str, ctx: Context) -> Sample | None:
    images = row.get("images") if isinstance(row, dict) else None
    texts = row.get("texts") if isinstance(row, dict) else None
    if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
        ctx.skip("malformed document")
        return None
    text_list, pairs = obelics_pairs(images, texts, prefer)
    kept: list[Kept] = []
    for position, index in pairs:
        entry = images[position]
        if not isinstance(entry, str) or not entry:
            ctx.skip("image dropped: not a url or path")
            continue
        if index is None:
            ctx.skip("image dropped: matched to no text")
            continue
        path = resolve(entry, ctx)
        image = None if path is None else _read_image(path, ctx)
        if image is not None:
            kept.append((image, index, None))
    return _doc_sample(key, _obelics_url(row.get("general_metadata")), text_list, kept, ctx)


def _parquet_rows(path: Path, ctx: Context) -> Iterator[tuple[int, dict]]:
    """(row number, row) of a parquet file, one row group in memory at a time.

    A row group that does not read (a damaged file) costs its rows, counted, not the run.
    """
    pq = pyarrow_parquet(path, "; or give OBELICS as jsonl rows")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        raise ConvertError(f"{path} is not a readable parquet file ({err})\n"
                           f"expected layout:\n{OBELICS_LAYOUT}") from err
    names = set(parquet.schema_arrow.names)
    if not {"images", "texts"} <= names:
        raise ConvertError(f"{path} has no images/texts columns (has {sorted(names)})\n"
                           f"expected layout:\n{OBELICS_LAYOUT}")
    columns = [c for c in OBELICS_COLUMNS if c in names]
    start = 1
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        try:
            rows = parquet.read_row_group(group, columns=columns).to_pylist()
        except Exception:  # pyarrow's errors for damaged data are several types (ArrowInvalid, OSError, ...)
            ctx.skip("parquet row group does not read", size)
            ctx.advance(size)
            rows = []
        yield from enumerate(rows, start)
        start += size


def _obelics_rows(path: Path, ctx: Context) -> Iterator[tuple[int, Any]]:
    """(row number, row) of one OBELICS file; jsonl lines that do not parse are counted and advanced past."""
    if path.name.endswith(".parquet"):
        yield from _parquet_rows(path, ctx)
    else:
        yield from iter_json_lines(path, ctx)


def _parquet_total(files: list[Path]) -> int | None:
    """The number of rows in all files when they are all parquet (from their footers), else None."""
    if not all(f.name.endswith(".parquet") for f in files):
        return None
    pq = pyarrow_parquet(files[0], "; or give OBELICS as jsonl rows")

    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception:  # an unreadable file gets its clear error when it is read; the bar just has no total
        return None


@register("obelics", kind="web", layout=OBELICS_LAYOUT)
def read_obelics(ctx: Context) -> Iterator[Sample]:
    """OBELICS documents, one sample each, images paired with adjacent texts."""
    prefer = extra_options(ctx, {"pair": ("next", "previous")})["pair"]
    images = _images_dir(ctx, "obelics", OBELICS_LAYOUT)
    url_map = load_url_map(ctx.options.url_map) if ctx.options.url_map is not None else None
    resolve = ImageResolver(images, url_map)
    files = _source_files(ctx.options.src, OBELICS_SUFFIXES, OBELICS_LAYOUT)
    total = _parquet_total(files)
    if total is not None:
        ctx.total(total)
    for path in files:
        stem = _stem(path, OBELICS_SUFFIXES)
        for number, row in _obelics_rows(path, ctx):
            sample = _obelics_doc(row, safe_key(f"{stem}-{number:07d}"), resolve, prefer, ctx)
            ctx.advance()
            if sample is not None:
                yield sample
