"""A cache of what the frozen vision path gives each image, for evaluation.

Evaluation shows the same images again and again: a vanilla-ICL demo in every trial, seed and shot count that draws
it, a query at every shot count and demo mode. `Backbone.assemble` sends every Image segment through
`embed_images` (vision tower, projector or resampler, and the family's wrapper-token rows): everything the backbone
inserts into the LM's embeddings for an image. That output depends only on the image's preprocessed pixels and on
frozen weights, so it is cached per image (`VisionCache`), in memory by default (an LRU bounded in MB) and, when a
folder is given, on disk as well (one safetensors file per image under a folder named by the key's hash).

What an entry depends on, and how each is checked:
- the image: a content hash of the exact preprocessed pixels, every tensor the transform gives (LLaVA-NeXT's tiles
  and ``image_sizes``, Qwen2-VL's ``image_grid_thw``, Idefics' crops and masks), so another view or size of the
  same picture is another entry;
- the backbone (`vision_key`): family, adapter class, name_or_path, dtype, device kind, torch and transformers
  versions, the image processor's and tokenizer's configuration, and a fingerprint of the config and of the
  weights of the vision path (every weight outside the language model, plus the input embeddings, which give the
  wrapper-token rows; LoRA on the language model leaves it unchanged, so every checkpoint of a run shares it);
- in memory, a stamp of those weights (storage and in-place version of each tensor) is compared before every
  lookup: a changed, moved or re-typed weight empties the cache instead of serving features of other weights.

On disk, a folder holds ``key.json`` (the full key, compared on open: a mismatch is reported and its entries
removed) and ``<pixels hash>.safetensors`` files written through a temporary name and renamed. Each file records
its key hash and a checksum of its bytes; a file that cannot be read or does not match is reported, removed and
recomputed. A folder that cannot be written is reported once and the cache stays in memory.

Never under gradients: with grad enabled (training, or anything that backpropagates through the vision path) the
cache steps aside and the images are encoded as without it (counted as ``bypassed``).

Exactness: an entry is the image encoded alone, by the backbone's own `embed_images` (a batch of one), so it is the
same whatever batch, evaluation order, process count or earlier run made it: an evaluation with the cache gives the
same numbers on 1 or N processes and with a cold or warm disk cache. Without the cache all images of a batch go
through the vision tower together, and some towers do not give bit-identical rows for an image in a batch and alone
(matrix kernels block by batch size): on CPU in float32 the tiny LLaVA, LLaVA-NeXT (base view), Qwen2-VL and
Idefics2 differ by up to 1.5e-6, BLIP-2 and Idefics3 not at all. The cache's features then differ from the uncached
path's by that rounding, as two uncached batches of other sizes already do (docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from mmict.hashing import pixels_hash, tensor_checksum, tensors_stamp, update_with_weight_samples
from mmict.segments import Pixels

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEY_FILE = "key.json"
TENSOR = "embeds"
_WARN_EACH = 3  # corrupt files named one by one; past that only counted (stats["corrupt"]) and summed up at close

Encode = Callable[[list[Pixels]], list[torch.Tensor]]


# ---- hashing -----------------------------------------------------------------------------------------


def vision_weights(backbone: Any) -> list[tuple[str, torch.Tensor]]:
    """The weights `embed_images` can read: every parameter and buffer of the model outside its language model,
    plus the input embeddings (the rows of wrapper tokens such as Qwen2-VL's <|vision_start|>)."""
    language_model = {id(t) for t in (*backbone.language_model.parameters(), *backbone.language_model.buffers())}
    embeddings = backbone.model.get_input_embeddings()
    keep = {id(t) for t in (*embeddings.parameters(), *embeddings.buffers())}
    named = [*backbone.model.named_parameters(), *backbone.model.named_buffers()]
    return [(name, t) for name, t in named if id(t) not in language_model or id(t) in keep]


def weights_fingerprint(weights: list[tuple[str, torch.Tensor]], sample: int = 4096) -> str:
    """The first and last `sample` elements of every weight with its name, shape and dtype, as the demonstration
    bank's `backbone_fingerprint` hashes them (`mmict.hashing`)."""
    h = hashlib.sha256()
    update_with_weight_samples(h, weights, sample)
    return h.hexdigest()[:32]


def _json_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _processor_config(processor: Any) -> str:
    return processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor)


def vision_key(backbone: Any) -> dict[str, Any]:
    """Everything a cached image's features depend on besides its pixels (module docstring)."""
    import transformers

    device = backbone.device
    kind = device.type + (f":{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    config = backbone.config.to_dict() if hasattr(backbone.config, "to_dict") else dict(backbone.config)
    tokenizer = backbone.tokenizer
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else repr(tokenizer)
    return {
        "format": FORMAT_VERSION, "family": backbone.family, "adapter": type(backbone).__name__,
        "name_or_path": str(backbone.name_or_path), "dtype": str(backbone.dtype).removeprefix("torch."),
        "device": kind, "torch": torch.__version__, "transformers": transformers.__version__,
        "processor": _json_hash(f"{type(backbone.image_transform).__name__}|"
                                f"{_processor_config(backbone.image_processor)}"),
        "tokenizer": _json_hash([type(tokenizer).__name__, vocab]),
        "config": _json_hash(config),
        "weights": weights_fingerprint(vision_weights(backbone)),
    }


def key_hash(key: dict[str, Any]) -> str:
    return _json_hash(key)[:16]


# ---- the cache -----------------------------------------------------------------------------------------


class VisionCache:
    """Per-image outputs of `backbone.embed_images`, looked up by pixel hash (memory LRU, then disk).

    `max_mb`: memory the held tensors may take (on the model's device; 0: none held, disk only). `folder`: where
    entries are kept across runs (None: memory only). `stats` counts images served from memory (hits), read from
    disk (loaded), encoded (misses), dropped from memory (evicted), disk files found corrupt or of another key, and
    images encoded without the cache because gradients were on (bypassed)."""

    def __init__(self, backbone: Any, max_mb: float = 1024.0, folder: str | Path | None = None) -> None:
        if not max_mb >= 0:
            raise ValueError(f"vision cache max_mb={max_mb}: must be >= 0 (MB of features held in memory)")
        self.backbone = backbone
        self.max_bytes = int(max_mb * 2**20)
        self.root = Path(folder).expanduser() if folder is not None else None
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._stamp: tuple | None = None
        self._dir: Path | None = None  # the disk folder of the current key (None: memory only)
        self._key_hash = ""
        self.read_only: str | None = None  # why the folder cannot be written (None: it can, or no folder)
        self.stats: dict[str, Any] = {"hits": 0, "loaded": 0, "misses": 0, "evicted": 0, "corrupt": 0,
                                      "stale": 0, "bypassed": 0, "peak_mb": 0.0}

    # ---- lookups ---------------------------------------------------------------------------------------
    def embed(self, images: list[Pixels], encode: Encode) -> list[torch.Tensor]:
        """`encode(images)` (the backbone's uncached path) per image: served from the cache where held, else encoded
        alone (a batch of one: the same rows whatever batch it came in) and kept; each distinct image once."""
        if torch.is_grad_enabled():
            self.stats["bypassed"] += len(images)
            return encode(images)
        self._check_weights()
        keys = [pixels_hash(img) for img in images]
        out: list[torch.Tensor | None] = [self._get(k) for k in keys]
        todo: dict[str, int] = {}
        for j, (k, t) in enumerate(zip(keys, out)):
            if t is None:
                todo.setdefault(k, j)
        if todo:
            made = {k: encode([images[j]])[0] for k, j in todo.items()}
            self.stats["misses"] += len(todo)
            for k, t in made.items():
                self._put(k, t)
            for j, k in enumerate(keys):
                if out[j] is None:
                    if todo[k] != j:
                        self.stats["hits"] += 1  # the same image twice in one call: encoded once
                    out[j] = made[k]
        return out  # type: ignore[return-value]

    def _get(self, k: str) -> torch.Tensor | None:
        held = self._mem.get(k)
        if held is not None:
            self._mem.move_to_end(k)
            self.stats["hits"] += 1
            return held
        if self._dir is None:
            return None
        t = self._load(k)
        if t is not None:
            self.stats["loaded"] += 1
            self._hold(k, t)
        return t

    def _put(self, k: str, t: torch.Tensor) -> None:
        stored = t.detach().clone()  # its own storage, not a view that keeps the whole batch's output alive
        self._hold(k, stored)
        if self._dir is not None and not self.read_only:
            self._write(k, stored)

    def _hold(self, k: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return
        self._mem[k] = t
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._mem.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
            self.stats["evicted"] += 1
        self.stats["peak_mb"] = max(self.stats["peak_mb"], self._bytes / 2**20)

    def clear(self) -> None:
        """Drop every entry held in memory (disk files stay)."""
        self._mem.clear()
        self._bytes = 0

    # ---- the weights the entries belong to -----------------------------------------------------------------
    def _check_weights(self) -> None:
        stamp = tensors_stamp(vision_weights(self.backbone))
        if stamp == self._stamp:
            return
        if self._stamp is not None:
            log.info("vision cache: the vision path's weights changed (written, moved or re-typed); dropping %d "
                     "entries held in memory", len(self._mem))
            self.stats["stale"] += len(self._mem)
        self.clear()
        self._stamp = stamp
        if self.root is not None:
            self._open(vision_key(self.backbone))

    # ---- disk ------------------------------------------------------------------------------------------
    def _open(self, key: dict[str, Any]) -> None:
        self._key_hash = key_hash(key)
        folder = self.root / self._key_hash
        self._dir, self.read_only = folder, None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stored = self._read_key(folder / KEY_FILE)
            if stored is not None and stored != key:
                changed = ", ".join(sorted(k for k in stored.keys() | key.keys() if stored.get(k) != key.get(k)))
                log.warning("vision cache: %s was written for another key (changed: %s); removing its entries",
                            folder / KEY_FILE, changed or "format")
                self.stats["stale"] += self._wipe(folder)
            if stored != key:
                self._replace(folder / KEY_FILE, lambda tmp: tmp.write_text(json.dumps(key, indent=1)))
        except OSError as e:
            self._not_cached(folder, f"{e.strerror or e}")

    def _read_key(self, path: Path) -> dict[str, Any] | None:
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            return stored if isinstance(stored, dict) else {"unreadable": True}
        except (OSError, ValueError) as e:
            log.warning("vision cache: %s is unreadable (%s); removing the entries it describes", path, e)
            return {"unreadable": True}

    @staticmethod
    def _wipe(folder: Path) -> int:
        removed = 0
        for p in folder.glob("*.safetensors"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
        return removed

    @staticmethod
    def _replace(path: Path, write: Callable[[Path], Any]) -> None:
        """Write `path` through a temporary name and rename it: a crash never leaves half a file."""
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _not_cached(self, folder: Path, why: str) -> None:
        self.read_only = why
        log.warning("vision cache: %s cannot be written (%s): image features are kept in memory for this run only. "
                    "Fix: make the folder writable or set eval.vision_cache.dir to a writable folder (null: memory "
                    "only)", folder, why)

    def _path(self, k: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{k}.safetensors"

    def _load(self, k: str) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self._path(k)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                t = f.get_tensor(TENSOR)
            why = ("another key" if meta.get("key") != self._key_hash else
                   "another image" if meta.get("pixels") != k else
                   "bytes that do not match their checksum" if meta.get("checksum") != tensor_checksum(t) else None)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for broken files
            why = f"unreadable: {e}"
        if why is not None:
            self.stats["corrupt"] += 1
            if self.stats["corrupt"] <= _WARN_EACH:
                log.warning("vision cache: %s holds %s (a corrupt or foreign file); recomputing it", path, why)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return t.to(self.backbone.device)

    def _write(self, k: str, t: torch.Tensor) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        cpu = t.detach().to("cpu").contiguous()
        meta = {"key": self._key_hash, "pixels": k, "checksum": tensor_checksum(cpu)}
        path = self._path(k)
        try:
            self._replace(path, lambda tmp: save_file({TENSOR: cpu}, str(tmp), metadata=meta))
        except (OSError, SafetensorError) as e:
            self._not_cached(path.parent, f"writing {path.name} failed: {e}")

    # ---- reports ---------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What results.json records: the counts, memory held (MB), the limit and the disk folder."""
        looked = self.stats["hits"] + self.stats["loaded"] + self.stats["misses"]
        return {**self.stats, "peak_mb": round(self.stats["peak_mb"], 3), "entries": len(self._mem),
                "mb": round(self._bytes / 2**20, 3), "max_mb": self.max_bytes / 2**20,
                "hit_rate": round((self.stats["hits"] + self.stats["loaded"]) / looked, 4) if looked else None,
                "dir": None if self._dir is None else str(self._dir), "read_only": self.read_only}

    def close(self) -> dict[str, Any]:
        """Detach from the backbone (when attached), drop what memory holds; the final `report`."""
        if getattr(self.backbone, "vision_cache", None) is self:
            self.backbone.vision_cache = None
        out = self.report()
        self.clear()
        if out["corrupt"] > _WARN_EACH:
            log.warning("vision cache %s: %d corrupt files recomputed in all", out["dir"], out["corrupt"])
        log.info("vision cache: %d hits, %d loaded from disk, %d encoded, %d evicted (peak %.1f MB of %.0f)",
                 out["hits"], out["loaded"], out["misses"], out["evicted"], out["peak_mb"], out["max_mb"])
        return out


def attach_vision_cache(backbone: Any, settings: Any = None) -> VisionCache | None:
    """A `VisionCache` on `backbone` (every `assemble` then goes through it) from `settings` (eval.vision_cache:
    enabled, max_mb, dir), replacing (closing) one already attached; None, and none attached, when it is disabled
    or `settings` is None. `close()` it when the evaluation ends."""
    old = getattr(backbone, "vision_cache", None)
    if old is not None:
        old.close()
    if settings is None or not settings.get("enabled", False):
        return None
    cache = VisionCache(backbone, max_mb=float(settings.get("max_mb", 1024.0)), folder=settings.get("dir"))
    backbone.vision_cache = cache
    return cache


@contextlib.contextmanager
def vision_cache(backbone: Any, max_mb: float = 1024.0, folder: str | Path | None = None) -> Iterator[VisionCache]:
    """`backbone` with a vision cache for the block (closed at its end, whatever happens)."""
    cache = attach_vision_cache(backbone, {"enabled": True, "max_mb": max_mb, "dir": folder})
    assert cache is not None
    try:
        yield cache
    finally:
        cache.close()
