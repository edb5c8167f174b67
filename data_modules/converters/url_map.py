"""OBELICS ``--url-map``: image url -> local file, from a text map or from img2dataset's own output.

Read (`load_url_map`): a tsv/csv with a ``url,path`` header, a jsonl of ``{"url", "path"}``, a parquet file
with ``url`` and ``path`` columns (recognised by its magic bytes whatever its name), or img2dataset's output
(``--output_format files``): one of its ``<shard>.parquet`` files, or its output folder for all of them. A
file that is none of these is a ConvertError listing them, never a raw decoding traceback.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .common import JSONL_SUFFIXES, ConvertError, iter_jsonl, pyarrow_parquet

PARQUET_MAGIC = b"PAR1"
IMG2DATASET_EXTENSIONS = (".jpg", ".png", ".webp")  # its --encode_format choices
NOT_DOWNLOADED = "image dropped: not downloaded (img2dataset status)"


def _is_parquet(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC


def load_url_map(path: Path) -> dict[str, str | None]:
    """--url-map: image url -> local path (relative to --images, or absolute), None for a url whose download
    failed. A tsv/csv with a url,path header, a jsonl of {"url", "path"}, a parquet file with url and path
    columns, or img2dataset's output (`_img2dataset_map`: a .parquet of its, or its output folder)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".parquet"))
        if not files:
            raise ConvertError(f"--url-map {path} is a folder without .parquet files (img2dataset's output folder "
                               "holds one <shard>.parquet per shard); or pass a tsv/csv/jsonl file")
        mapping: dict[str, str | None] = {}
        for file in files:
            _merge(mapping, _parquet_url_map(file))
        return mapping
    if not path.is_file():
        raise ConvertError(f"--url-map {path} not found")
    if path.name.endswith(".parquet") or _is_parquet(path):
        return _parquet_url_map(path)
    if path.name.endswith(JSONL_SUFFIXES):
        mapping = {}
        for number, line in iter_jsonl(path):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            # The map is the user's own file: a bad line is an error to fix, not a record to skip.
            if not isinstance(row, dict) or not isinstance(row.get("url"), str) or not isinstance(row.get("path"), str):
                raise ConvertError(f"--url-map {path} line {number}: expected {{\"url\": str, \"path\": str}}")
            mapping[row["url"]] = row["path"]
        return mapping
    delimiter = "\t" if path.suffix == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            if not reader.fieldnames or not {"url", "path"} <= set(reader.fieldnames):
                raise ConvertError(f"--url-map {path}: the first line must be a header naming the columns url and "
                                   f"path (got {reader.fieldnames})")
            return {row["url"]: row["path"] for row in reader if row["url"] and row["path"]}
    except UnicodeDecodeError as err:
        raise ConvertError(f"--url-map {path} is not UTF-8 text ({err}); --url-map takes a tsv/csv with a url,path "
                           "header, a jsonl of {\"url\", \"path\"}, a .parquet with url and path columns, or "
                           "img2dataset's output folder") from err


def _merge(mapping: dict[str, str | None], more: dict[str, str | None]) -> None:
    """``more`` into ``mapping``; a url downloaded in one place keeps that file whatever else says it failed."""
    for url, value in more.items():
        if value is not None or url not in mapping:
            mapping[url] = value


def _parquet_url_map(path: Path) -> dict[str, str | None]:
    """A parquet url map: url and path columns (the user's own), or img2dataset's (url, key, status)."""
    pq = pyarrow_parquet(path, "; or convert the map to a tsv with a url,path header")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        raise ConvertError(f"--url-map {path} is not a readable parquet file ({err})") from err
    names = set(parquet.schema_arrow.names)
    if {"url", "path"} <= names:
        table = _read(parquet, path, ["url", "path"])
        return {url: file for url, file in zip(table["url"], table["path"], strict=True) if url and file}
    if {"url", "key"} <= names:
        return _img2dataset_map(path, parquet, "status" in names)
    raise ConvertError(f"--url-map {path}: a parquet url map needs url and path columns, or img2dataset's url and "
                       f"key columns (has {sorted(names)})")


def _read(parquet: Any, path: Path, columns: list[str]) -> dict[str, list]:
    try:
        return parquet.read(columns=columns).to_pydict()
    except Exception as err:  # damaged data: pyarrow's errors are several types (ArrowInvalid, OSError, ...)
        raise ConvertError(f"--url-map {path}: its columns {', '.join(columns)} do not read ({err})") from err


def _img2dataset_map(path: Path, parquet: Any, has_status: bool) -> dict[str, str | None]:
    """img2dataset's ``<shard>.parquet`` -> {url: <folder>/<shard>/<key>.<ext>, or None when not downloaded}.

    With ``--output_format files`` img2dataset writes each shard's images to ``<shard>/<key>.<encode_format>``
    beside ``<shard>.parquet``; the extension is read off the folder's files. Its webdataset output (one
    ``<shard>.tar``) holds the images in the tar: refused with the command that unpacks it to that layout.
    """
    table = _read(parquet, path, ["url", "key", "status"] if has_status else ["url", "key"])
    statuses = table["status"] if has_status else ["success"] * len(table["url"])
    shard = path.name[: -len(".parquet")]
    folder = path.absolute().parent / shard
    tar = folder.parent / f"{shard}.tar"
    if not folder.is_dir() and tar.is_file():
        raise ConvertError(f"--url-map {path}: img2dataset wrote this shard's images into {tar.name} (its "
                           f"webdataset output); unpack it beside the parquet file: mkdir {folder} && tar -xf "
                           f"{tar} -C {folder}   (or run img2dataset with --output_format files)")
    if not folder.is_dir() and "success" in statuses:
        raise ConvertError(f"--url-map {path}: img2dataset's image folder {folder} is missing (it writes "
                           f"<shard>.parquet and the folder <shard>/ side by side: keep them together)")
    folder_files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    mapping: dict[str, str | None] = {}
    for url, key, status in zip(table["url"], table["key"], statuses, strict=True):
        if not url:
            continue
        if status != "success" or not key:
            mapping.setdefault(url, None)  # a url downloaded in another row keeps its file
            continue
        ext = next((e for e in IMG2DATASET_EXTENSIONS if f"{key}{e}" in folder_files), ".jpg")
        mapping[url] = str(folder / f"{key}{ext}")  # absolute: beside the parquet, whatever --images is
    return mapping
