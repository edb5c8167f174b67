"""Random access into webdataset shards: an index of every sample's member offsets, built once and cached.

A shard is a plain tar and a sample is a run of consecutive members sharing a key, so a member can be read back
with one seek and one read. `index_shards` reads each shard once, groups its members into samples exactly as
`webdataset.tarfile_to_samples` does (`tariterators.group_by_keys`, the same skipped members and tar errors) and
asks a ``record`` function what to keep of each sample: a small JSON-able record (kept in memory by the caller)
and the members whose bytes are left on disk, or the reason the sample is unusable. The result is cached per
shard as JSON, next to the shard (``train-000000.tar`` -> ``train-000000.tar.idx.json``) or, where the shard's
folder is read-only, under ``$XDG_CACHE_HOME/mmict/shard-index/`` (said in the log). A cached index is used only
when its format, its ``recipe`` (what the record function keeps) and the shard's name, size and mtime match; any
other is rebuilt, never trusted stale. Reading a member (`ShardFile.read`) checks the shard's size and mtime again
and the tar header in front of the member, so a shard rewritten under a running process fails loudly
(`StaleShardError`) instead of returning other bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webdataset.tariterators import group_by_keys

logger = logging.getLogger(__name__)

FORMAT = "mmict shard index"
VERSION = 1
SUFFIX = ".idx.json"
BLOCK = tarfile.BLOCKSIZE  # 512: the tar header right in front of every member's data
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members

# A sample (member suffix -> bytes, plus "__key__") -> (the record to keep, the suffixes whose offsets to keep, in
# the order wanted), or a string: why the sample is skipped.
RecordFn = Callable[[dict[str, Any]], "tuple[Any, list[str]] | str"]


class StaleShardError(RuntimeError):
    """A shard changed after its index was read: the offsets no longer point at the members they name."""


@dataclass(frozen=True)
class ShardFile:
    """One shard as it was indexed: reads its members by offset, refusing a shard that changed since."""

    path: str
    size: int
    mtime_ns: int

    def read(self, spans: Sequence[int]) -> list[bytes]:
        """The data of the members at ``spans`` = (offset, size, offset, size, ...), in that order. One seek and
        read covers them all (a sample's members are consecutive); each member's tar header is checked."""
        pairs = list(zip(spans[0::2], spans[1::2], strict=True))
        if not pairs:
            return []
        start = min(offset for offset, _ in pairs) - BLOCK
        end = max(offset + size for offset, size in pairs)
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
                raise self._stale("its size or mtime changed")
            f.seek(start)
            block = f.read(end - start)
        out = []
        for offset, size in pairs:
            at = offset - start
            try:
                header = tarfile.TarInfo.frombuf(block[at - BLOCK : at], tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError as e:
                raise self._stale(f"no tar header in front of offset {offset} ({e})") from e
            if header.size != size or len(block) < at + size:
                raise self._stale(f"the member at offset {offset} is not the one indexed")
            out.append(block[at : at + size])
        return out

    def _stale(self, why: str) -> StaleShardError:
        return StaleShardError(f"{self.path} changed after its index was read ({why}); run again: the index is "
                               "rebuilt for the shard as it is now")


@dataclass
class ShardIndex:
    """One shard's samples in file order: ``(key, record, spans)`` for a kept one (spans: an ``array('q')`` of
    offset, size pairs of the members the record function named), ``(key, reason)`` for a skipped one; ``errors``:
    tar errors that cost the rest of the shard ("tar: ReadError", as `skips.skip_handler("tar")` names them)."""

    shard: ShardFile
    samples: list[tuple]
    errors: list[str]
    built: bool = False  # built now (False: read from the cache)
    cache_path: Path | None = None


class _Member(bytes):
    """A member's data that remembers where it lies in the shard (grouped as data by `group_by_keys`)."""

    offset: int
    size: int


def _members(path: str, errors: list[str]) -> Iterator[dict]:
    """The regular members of one shard as webdataset's `tar_file_iterator` yields them, each data remembering its
    offset; a tar error ends the shard and is recorded as webdataset's ``skip_handler("tar")`` counts it."""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as stream:
            for info in stream:
                fname = info.name
                try:
                    if not info.isreg() or fname is None:
                        continue
                    if "/" not in fname and fname.startswith("__") and fname.endswith("__"):
                        continue
                    if _SKIP_META.match(fname):
                        continue
                    member = _Member(stream.extractfile(info).read())
                    member.offset, member.size = info.offset_data, info.size
                    yield {"fname": fname, "data": member, "__url__": path}
                    stream.members = []
                except Exception as exn:  # noqa: BLE001 - counted, as webdataset's handler does
                    errors.append(f"tar: {type(exn).__name__}")
            # tarfile ends quietly where a header is missing or cut short: only the end-of-archive marker (a zero
            # block) tells a whole shard from one truncated at a member boundary
            f.seek(stream.offset)
            if not errors and f.read(BLOCK).count(0) != BLOCK:
                errors.append("tar: no end-of-archive marker")
    except Exception as exn:  # noqa: BLE001 - a truncated or unreadable shard: the rest of it is lost
        errors.append(f"tar: {type(exn).__name__}")


def _build(shard: ShardFile, record: RecordFn) -> tuple[list[tuple], list[str]]:
    errors: list[str] = []

    def handler(exn: Exception) -> bool:
        errors.append(f"tar: {type(exn).__name__}")
        return True

    samples: list[tuple] = []
    for sample in group_by_keys(_members(shard.path, errors), handler=handler):
        key = sample["__key__"]
        made = record(sample)  # its members' data are bytes (that remember their offsets)
        if isinstance(made, str):
            samples.append((key, made))
            continue
        kept, suffixes = made
        spans = array("q")
        for suffix in suffixes:
            spans.extend((sample[suffix].offset, sample[suffix].size))
        samples.append((key, kept, spans))
    return samples, errors


def user_cache_dir() -> Path:
    """Where the indexes of shards in read-only folders go."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mmict" / "shard-index"


def folder_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _cache_paths(shard: Path, cache_dir: Path | None) -> list[Path]:
    """Where a shard's index may be, in the order looked at: next to the shard, then the user cache."""
    digest = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
    elsewhere = (cache_dir or user_cache_dir()) / f"{digest}-{shard.name}{SUFFIX}"
    return [shard.with_name(shard.name + SUFFIX), elsewhere]


def _stat(path: str) -> ShardFile:
    st = os.stat(path)
    return ShardFile(str(path), st.st_size, st.st_mtime_ns)


def _load(path: Path, shard: ShardFile, recipe: str) -> ShardIndex | None:
    """The cached index at ``path`` if it is for this very shard and recipe, else None (logged when stale)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("shard index %s does not read (%s): rebuilding it", path, e)
        return None
    want = {"format": FORMAT, "version": VERSION, "recipe": recipe, "shard": Path(shard.path).name,
            "size": shard.size, "mtime_ns": shard.mtime_ns}
    changed = [k for k, v in want.items() if not isinstance(data, dict) or data.get(k) != v]
    if changed:
        logger.info("shard index %s is stale (%s changed): rebuilding it", path, ", ".join(changed))
        return None
    samples = [(s[0], s[1]) if len(s) == 2 else (s[0], s[1], array("q", s[2])) for s in data["samples"]]
    return ShardIndex(shard, samples, list(data["errors"]), built=False, cache_path=path)


def _save(index: ShardIndex, recipe: str, paths: list[Path]) -> Path | None:
    payload = {"format": FORMAT, "version": VERSION, "recipe": recipe, "shard": Path(index.shard.path).name,
               "size": index.shard.size, "mtime_ns": index.shard.mtime_ns, "errors": index.errors,
               "samples": [[s[0], s[1]] if len(s) == 2 else [s[0], s[1], s[2].tolist()] for s in index.samples]}
    text = json.dumps(payload, separators=(",", ":"))
    for i, path in enumerate(paths):
        if i == 0 and not folder_writable(path.parent):
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp",
                                             delete=False) as tmp:
                tmp.write(text)
            os.replace(tmp.name, path)  # atomic: a reader (another rank) never sees half a file
        except OSError as e:
            logger.debug("could not write shard index %s: %s", path, e)
            continue
        if i > 0:
            logger.info("shard folder %s is read-only: its index is cached at %s", Path(index.shard.path).parent,
                        path)
        return path
    logger.warning("could not cache the index of %s anywhere (%s): it is rebuilt on every run", index.shard.path,
                   ", ".join(str(p) for p in paths))
    return None


def _index_one(url: str, record: RecordFn, recipe: str, cache_dir: Path | None) -> ShardIndex:
    shard = _stat(url)
    paths = _cache_paths(Path(url), cache_dir)
    for path in paths:
        found = _load(path, shard, recipe)
        if found is not None:
            return found
    samples, errors = _build(shard, record)
    index = ShardIndex(shard, samples, errors, built=True)
    if _stat(url) != shard:  # rewritten while it was read: use what was read, cache nothing
        logger.warning("%s changed while it was indexed: its index is not cached", url)
        return index
    index.cache_path = _save(index, recipe, paths)
    return index


def index_shards(urls: Sequence[str], record: RecordFn, *, recipe: str, cache_dir: str | Path | None = None,
                 workers: int | None = None) -> list[ShardIndex]:
    """Every shard's index, in the order given: read from its cache when it is current, else built (in up to
    ``workers`` threads, default one per core: the record function's image decoding releases the GIL) and cached.
    ``recipe`` names what ``record`` keeps: change it whenever the record function changes."""
    cache = Path(cache_dir) if cache_dir is not None else None
    workers = max(1, min(len(urls), workers or os.cpu_count() or 1))
    if workers == 1:
        indexes = [_index_one(url, record, recipe, cache) for url in urls]
    else:
        with ThreadPoolExecutor(workers) as pool:
            indexes = list(pool.map(lambda url: _index_one(url, record, recipe, cache), urls))
    built = [ix for ix in indexes if ix.built]
    if built:
        logger.info("indexed %d of %d shards (%s ...): %d samples; cached for later runs", len(built), len(urls),
                    Path(urls[0]).parent, sum(len(ix.samples) for ix in built))
    return indexes


__all__ = ["ShardFile", "ShardIndex", "StaleShardError", "folder_writable", "index_shards", "user_cache_dir"]
