"""The demonstration bank: what AIM reads from each demo, computed once, kept on disk, reused everywhere.

AIM reads every demo alone, so the frozen model's reading of a fixed demo never changes: the bank computes
it once per demo (in batches, with a progress bar) and every later trial, seed, shot count and run that
shows the demo looks it up by id instead of running the backbone over its image tokens again.

What is stored per demo (`store`):
- ``hidden`` (default): the reader's hidden states at the demo's text positions, before the projector. One
  bank then serves every projector trained on this backbone and layer (every checkpoint of every run); the
  projection (a d x d matmul over the demo's text tokens) runs at lookup.
- ``fused``: the projected fused tokens; the projector's weights are then part of the key.

Layout: ``<root>/<pool>/<key hash>/index.json`` and ``shard-*.safetensors`` next to it. The key holds every
part the stored tensors depend on: the backbone (name_or_path, family, dtype and a fingerprint of its config
and weights), the reader's layer and final norm, how a demo is read (AIM's ``read_format``, ``read_span``,
answer cues and chat template, where they are not the default raw whole-text reading), the store, the projector
hash (``fused`` only) and the format version: a bank built with one reading is never used for another. The
index maps each demo id to its shard, the content hash of the demo (its text and its preprocessed image) and a
checksum of the stored bytes.

Nothing is used without being checked, nothing is wrong without a warning that names the file:
- the index is read on the first lookup (lazy), a shard is opened (memory-mapped) when one of its entries is
  first needed, and each tensor's checksum is verified when it is loaded;
- an index that cannot be parsed or holds another key, a shard that cannot be opened and a tensor whose bytes
  do not match their checksum are reported and their demos recomputed and rewritten;
- a demo whose text or image changed since it was stored (same id, other content) is stale: recomputed;
- files are written to a temporary name and renamed, and the index is merged under a file lock, so a crash
  never leaves a half-written file and concurrent evaluations can share one bank;
- files no index entry names (a deleted index, an interrupted write) are removed, with a warning, when a key
  folder is opened; a folder that cannot be written (found then, or when a write fails) is named in a warning and
  demos are kept in memory for the run only (``stats["cache"]``: "read-only: not cached"): `mmict.bank_files`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmict.bank_files import clean_orphans, unwritable, warn_not_cached
from mmict.config.schema import BANK_STORES
from mmict.hashing import tensor_bytes, tensor_checksum, tensors_stamp, update_with_pixels, update_with_weight_samples
from mmict.segments import Pixels

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORES = BANK_STORES  # the one list, in the config schema (eval.bank.store)
INDEX = "index.json"

Compute = Callable[[list[Pixels], list[str]], list[torch.Tensor]]


# ---- hashing -----------------------------------------------------------------------------------------


def content_hash(text: str, image: Pixels | None = None, source: tuple | None = None) -> str:
    """What makes a stored reading valid for a demo: its text and its image as the backbone sees it, i.e. the
    preprocessed pixels, or (cheaper, and no decoding) the `source` they are made from (`image_source`)."""
    h = hashlib.blake2b(digest_size=16)
    data = text.encode()
    h.update(len(data).to_bytes(8, "little") + data)
    if source is not None:
        for part in source:
            part = part.encode() if isinstance(part, str) else bytes(part)
            h.update(b"S" + len(part).to_bytes(8, "little") + part)
    else:
        update_with_pixels(h, image)
    return h.hexdigest()


_TRANSFORM_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transform_identity(transform: Any) -> str:
    """A backbone image transform's identity: its image processor's class and full configuration."""
    try:
        return _TRANSFORM_IDS[transform]
    except (KeyError, TypeError):
        pass
    processor = getattr(transform, "image_processor", transform)
    config = processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)
    identity = f"{type(transform).__name__}|{type(processor).__name__}|{config}"
    with contextlib.suppress(TypeError):
        _TRANSFORM_IDS[transform] = identity
    return identity


def image_source(example: Any) -> tuple | None:
    """What an example's image is made from, when it keeps it encoded (`data_modules.downstream.Example` loaded
    from shards): the transform's identity and the encoded bytes (every frame of a video). None when the example
    holds decoded pixels only; the bank then hashes those."""
    transform = getattr(example, "transform", None)
    frames = getattr(example, "frames_bytes", None) or None
    raw = getattr(example, "image_bytes", None)
    if transform is None or (frames is None and raw is None):
        return None
    return (transform_identity(transform), *(frames if frames is not None else (raw,)))


def backbone_fingerprint(backbone: Any, sample: int = 4096) -> str:
    """A cheap identity of the loaded frozen model: its config, and the first and last `sample` elements of
    every weight tensor with its name and shape. Exact for any retrained or rebuilt model in practice, while
    a 7B model costs milliseconds (hashing all its bytes would take tens of seconds on every evaluation)."""
    h = hashlib.sha256()
    config = backbone.config.to_dict() if hasattr(backbone.config, "to_dict") else dict(backbone.config)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    update_with_weight_samples(h, backbone.model.named_parameters(), sample)
    return h.hexdigest()[:32]


class ModuleHash:
    """The hash of a module's weights (the "checkpoint hash" of a fused-token bank), recomputed only when a
    parameter changed: optimizer steps and `load_state_dict` write in place and bump the tensors' versions."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._stamp: tuple | None = None
        self._hash = ""

    def __call__(self) -> str:
        stamp = tensors_stamp(self.module.state_dict(keep_vars=True).items())
        if stamp != self._stamp:
            h = hashlib.sha256()
            for name, t in sorted(self.module.state_dict().items()):
                h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
                h.update(tensor_bytes(t))
            self._stamp, self._hash = stamp, h.hexdigest()[:32]
        return self._hash


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---- the bank ------------------------------------------------------------------------------------------


class DemoBank:
    """Stored readings of demos by id. `compute(images, texts)` makes the missing ones (a batch of demos ->
    one tensor each); `key` (a dict, or a callable returning one, re-evaluated at every lookup so a changed
    projector switches to its own folder) names what they depend on. Lookups return CPU tensors; `stats` counts
    lookups served from memory (hits), loaded from disk, computed, and stale or corrupt entries replaced."""

    def __init__(
        self,
        root: str | Path,
        compute: Compute,
        key: dict[str, Any] | Callable[[], dict[str, Any]],
        *,
        pool: str = "pool",
        store: str = "hidden",
        batch_size: int = 16,
        shard_size: int = 256,
        progress: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.store = store  # what the tensors are (AIM: "hidden" states or "fused" tokens); the key holds it too
        self.compute = compute
        self._key_fn = key if callable(key) else (lambda: key)
        self.pool = "".join(c if c.isalnum() or c in "-_." else "_" for c in pool) or "pool"
        self.batch_size, self.shard_size, self.progress = max(1, batch_size), max(1, shard_size), progress
        self._dir: Path | None = None  # the folder of the key the open state belongs to
        self._key: dict[str, Any] | None = None
        self._entries: dict[str, dict[str, Any]] | None = None  # None: index not read yet (lazy)
        self._shards: dict[str, Any] = {}  # shard file name -> safe_open handle
        self._mem: dict[str, tuple[str, torch.Tensor]] = {}  # id -> (content hash, verified tensor)
        self._seen: dict[str, tuple[str, Any, str]] = {}  # id -> (text, image object or source, content hash)
        self.stats: dict[str, Any] = {"hits": 0, "loaded": 0, "computed": 0, "stale": 0, "corrupt": 0,
                                      "cache": "on disk"}
        self.read_only: str | None = None  # why the current folder cannot be written (None: it can)

    # ---- key and folder ------------------------------------------------------------------------------
    @property
    def key(self) -> dict[str, Any]:
        return self._key_fn()

    @property
    def path(self) -> Path:
        """The folder of the current key (its index and shards)."""
        return self.root / self.pool / key_hash(self.key)

    def _ensure_open(self) -> None:
        key = self.key
        folder = self.root / self.pool / key_hash(key)
        if folder == self._dir and self._entries is not None:
            return
        if self._dir is not None and folder != self._dir:
            log.info("demo bank: key changed (%s), switching to %s", _changed(self._key or {}, key), folder)
        self._dir, self._key = folder, key
        self._shards, self._mem = {}, {}
        self.read_only = None
        if (why := unwritable(folder)) is not None:
            self._not_cached(folder, why)
        self._entries = self._read_index(folder, key)
        # every write holds the lock: under it, a shard the index does not name is not one being written
        with contextlib.nullcontext() if self.read_only else self._lock(folder):
            entries = self._entries if self.read_only else self._read_index_quiet(folder / INDEX)
            clean_orphans(folder, {e.get("shard") for e in entries.values()}, removable=not self.read_only)

    def _not_cached(self, folder: Path, why: str) -> None:
        """From now on demos are computed and held in memory only: `folder` cannot be written."""
        self.read_only, self.stats["cache"] = why, "read-only: not cached"
        warn_not_cached(folder, why)

    def _read_index(self, folder: Path, key: dict[str, Any]) -> dict[str, dict[str, Any]]:
        path = folder / INDEX
        if not path.exists():
            return {}
        try:
            index = json.loads(path.read_text())
            entries, stored_key = index["entries"], index["key"]
            if not isinstance(entries, dict):
                raise ValueError("entries is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("demo bank: index %s is unreadable (%s); rebuilding the bank in %s", path, e, folder)
            self.stats["corrupt"] += 1
            self._wipe(folder)
            return {}
        if stored_key != key:
            log.warning("demo bank: index %s was written for another key (changed: %s); rebuilding it", path,
                        _changed(stored_key if isinstance(stored_key, dict) else {}, key))
            self.stats["stale"] += 1
            self._wipe(folder)
            return {}
        return entries

    def _wipe(self, folder: Path) -> None:
        """Remove the bank files of one key folder (only ours: the index and its shards); none in a read-only one."""
        if self.read_only:
            return
        with self._lock(folder):
            for p in [folder / INDEX, *folder.glob("shard-*.safetensors")]:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    @contextlib.contextmanager
    def _lock(self, folder: Path) -> Iterator[None]:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- lookups ---------------------------------------------------------------------------------------
    def _content(self, demo_id: str, images: Sequence[Pixels], j: int, text: str, source: tuple | None) -> str:
        """The demo's content hash, memoised per id while the same text and the same image (object) or source
        come back. With a source the image is never read: a lazily decoded image stays undecoded on a hit."""
        seen = self._seen.get(demo_id)
        if source is not None:
            if seen is not None and seen[0] == text and seen[1] == source:
                return seen[2]
            digest = content_hash(text, source=source)
            self._seen[demo_id] = (text, source, digest)
            return digest
        image = images[j]
        if seen is not None and seen[1] is image and seen[0] == text:
            return seen[2]
        digest = content_hash(text, image)
        self._seen[demo_id] = (text, image, digest)
        return digest

    def lookup(self, ids: Sequence[str], images: Sequence[Pixels], texts: Sequence[str],
               sources: Sequence[tuple | None] | None = None) -> list[torch.Tensor]:
        """The stored reading of each demo, computing (and storing) the ones the bank lacks. `images` is read
        only for what must be hashed or computed (it may decode on access); `sources` (`image_source`, one per
        demo or None) identify the images without reading them."""
        ids = [str(i) for i in ids]
        if not len(ids) == len(images) == len(texts):
            raise ValueError(f"demo bank lookup: {len(ids)} ids, {len(images)} images and {len(texts)} texts")
        sources = [None] * len(ids) if sources is None else list(sources)
        self._ensure_open()
        contents = [self._content(i, images, j, t, src) for j, (i, t, src) in enumerate(zip(ids, texts, sources))]
        out: list[torch.Tensor | None] = [self._get(i, c) for i, c in zip(ids, contents)]
        missing = [j for j, t in enumerate(out) if t is None]
        if missing:
            self._fill([ids[j] for j in missing], [images[j] for j in missing], [texts[j] for j in missing],
                       [contents[j] for j in missing], progress=False)
            for j in missing:
                out[j] = self._mem[ids[j]][1]
        return out  # type: ignore[return-value]

    def build(self, ids: Sequence[str], images: Sequence[Pixels], texts: Sequence[str], *,
              sources: Sequence[tuple | None] | None = None, desc: str = "demo bank") -> int:
        """Make sure every given demo is in the bank (computed in batches with a progress bar, each shard
        written as soon as it is full); the number of demos computed (0 when all were stored)."""
        self._ensure_open()
        sources = [None] * len(ids) if sources is None else list(sources)
        todo: dict[str, int] = {}
        for j, (i, t, src) in enumerate(zip(ids, texts, sources)):
            i = str(i)
            if i not in todo and self._get(i, self._content(i, images, j, t, src)) is None:
                todo[i] = j
        before, stale = self.stats["computed"], self.stats["stale"]
        if todo:
            js = list(todo.values())
            self._fill([str(ids[j]) for j in js], [images[j] for j in js], [texts[j] for j in js],
                       [self._seen[str(ids[j])][2] for j in js], progress=self.progress, desc=desc)
        if self.stats["stale"] > stale:
            log.warning("demo bank %s: %d stored demos were stale (their text or image changed) and were recomputed",
                        self.path, self.stats["stale"] - stale)
        stored = len({str(i) for i in ids})
        log.info("demo bank %s: %d demos, %d computed, %d reused", self.path, stored, len(todo), stored - len(todo))
        return self.stats["computed"] - before

    def _get(self, demo_id: str, content: str) -> torch.Tensor | None:
        held = self._mem.get(demo_id)
        if held is not None and held[0] == content:
            self.stats["hits"] += 1
            return held[1]
        entry = (self._entries or {}).get(demo_id)
        if entry is None:
            return None
        if entry.get("content") != content:
            self.stats["stale"] += 1
            if self.stats["stale"] <= 3:
                log.warning("demo bank: stored entry for demo %r in %s is stale (its text or image changed); "
                            "recomputing it", demo_id, self._dir)
            return None
        tensor = self._load(demo_id, entry)
        if tensor is None:
            return None
        self._mem[demo_id] = (content, tensor)
        self.stats["loaded"] += 1
        return tensor

    def _load(self, demo_id: str, entry: dict[str, Any]) -> torch.Tensor | None:
        from safetensors import safe_open

        assert self._dir is not None and self._entries is not None
        name = entry.get("shard", "")
        path = self._dir / name
        handle = self._shards.get(name)
        try:
            if handle is None:
                handle = safe_open(str(path), framework="pt", device="cpu")  # memory-mapped, header checked
                self._shards[name] = handle
            tensor = handle.get_tensor(entry["tensor"])
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for broken files
            log.warning("demo bank: shard %s is unreadable (%s); recomputing its demos", path, e)
            self.stats["corrupt"] += 1
            self._drop_shard(name)
            return None
        if tensor_checksum(tensor) != entry.get("checksum"):
            log.warning("demo bank: demo %r in shard %s does not match its checksum (corrupt file); recomputing "
                        "it", demo_id, path)
            self.stats["corrupt"] += 1
            self._entries.pop(demo_id, None)
            return None
        return tensor

    def _drop_shard(self, name: str) -> None:
        assert self._entries is not None
        self._shards.pop(name, None)
        for demo_id in [i for i, e in self._entries.items() if e.get("shard") == name]:
            del self._entries[demo_id]

    # ---- computing and writing -------------------------------------------------------------------------
    def _fill(self, ids: list[str], images: list[Pixels], texts: list[str], contents: list[str], *,
              progress: bool, desc: str = "demo bank") -> None:
        # One computation per distinct (id, content); longest texts together, so batches pad little.
        unique: dict[str, int] = {}
        for j, (i, c) in enumerate(zip(ids, contents)):
            unique.setdefault(f"{i}\0{c}", j)
        order = sorted(unique.values(), key=lambda j: len(texts[j]))
        pending: dict[str, tuple[str, torch.Tensor]] = {}
        with tqdm(total=len(order), desc=desc, unit="demo", disable=not progress) as bar:
            for start in range(0, len(order), self.batch_size):
                js = order[start : start + self.batch_size]
                with torch.no_grad():
                    tensors = self.compute([images[j] for j in js], [texts[j] for j in js])
                for j, t in zip(js, tensors):
                    stored = t.detach().to("cpu").contiguous().clone()  # its own storage, not a view of the batch
                    self._mem[ids[j]] = (contents[j], stored)
                    pending[ids[j]] = (contents[j], stored)
                self.stats["computed"] += len(js)
                bar.update(len(js))
                if len(pending) >= self.shard_size:
                    self._write(pending)
                    pending = {}
        if pending:
            self._write(pending)

    def _write(self, items: dict[str, tuple[str, torch.Tensor]]) -> None:
        """One new shard with `items`, then the index merged, all under the folder's lock (atomic renames). A write
        that fails (a folder gone read-only, a full disk) leaves nothing behind and turns caching off."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        assert self._dir is not None and self._key is not None and self._entries is not None
        if self.read_only:
            return  # held in memory only (`_fill` keeps every computed demo in `_mem`)
        folder = self._dir
        shard = f"shard-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.safetensors"
        tensors = {f"t{n}": t for n, (_, t) in enumerate(items.values())}
        new = {demo_id: {"shard": shard, "tensor": f"t{n}", "content": content, "checksum": tensor_checksum(t),
                         "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
               for n, (demo_id, (content, t)) in enumerate(items.items())}
        tmp, tmp_index = folder / f".{shard}.tmp{os.getpid()}", folder / f".{INDEX}.tmp{os.getpid()}"
        try:
            # locked from the shard's first byte to the index merge: a shard no index names is never one being
            # written (`_ensure_open` removes those as orphans under the same lock)
            with self._lock(folder):
                save_file(tensors, str(tmp), metadata={"key_hash": key_hash(self._key)})
                os.replace(tmp, folder / shard)
                self._merge_index(folder, tmp_index, new)
        except (OSError, SafetensorError) as e:
            for path in (tmp, tmp_index, folder / shard):  # the index does not name the shard: it would be orphaned
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            self._not_cached(folder, f"writing {shard} failed: {e}")
            return
        self._entries.update(new)

    def _merge_index(self, folder: Path, tmp_index: Path, new: dict[str, dict[str, Any]]) -> None:
        on_disk = self._read_index_quiet(folder / INDEX)
        merged = {**on_disk, **new}
        index = {"format": FORMAT_VERSION, "key": self._key, "key_hash": key_hash(self._key), "entries": merged}
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, folder / INDEX)
        # shards every entry of which was superseded are deleted (a reader holding one keeps its mapping); one that
        # will not go is an orphan for the next open to report, never a failed write
        referenced = {e["shard"] for e in merged.values()}
        for old in {e.get("shard") for e in on_disk.values()} - referenced:
            with contextlib.suppress(OSError, TypeError):
                (folder / old).unlink()

    def _read_index_quiet(self, path: Path) -> dict[str, dict[str, Any]]:
        """The entries on disk right now when they are for this key (another process may have added some)."""
        try:
            index = json.loads(path.read_text())
            if index.get("key") == self._key and isinstance(index.get("entries"), dict):
                return index["entries"]
        except (OSError, ValueError, AttributeError):
            pass
        return {}

    def __len__(self) -> int:
        self._ensure_open()
        return len(self._entries or {})

    def __repr__(self) -> str:
        return f"DemoBank({self.path}, store={self.store})"


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))) or "nothing"


# ---- AIM's bank ------------------------------------------------------------------------------------------
