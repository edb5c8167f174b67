"""Demo selection: which k pool examples a query sees as its demonstrations.

`random` draws k distinct examples from the whole pool (OpenFlamingo's protocol). `episodic` (binding and
concept tasks: their answers are the classes) draws them from the query's own episode, cycling over its classes
from a random start, so from k >= N every class has a demo and the query's class may or may not have one at
k < N: answering with a demo's word is right 1 time in N at every k >= 1 (the chance rate the tables report;
concept: yes / no, 1/2).

`rices` (Retrieval-based In-Context Example Selection, OpenFlamingo's `eval/rices.py`) takes the k pool
examples whose open_clip image features are closest (cosine) to the query's, most similar last. The pool's
features are computed once and cached on disk (`FeatureCache`); `make_selector` is the one entry point.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import logging
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from data_modules.downstream import Example

logger = logging.getLogger(__name__)

SELECTION_MODES = ("random", "episodic", "rices")
# Bump when anything that changes the cached features changes (how images are read, normalisation, dtype):
# caches written by another version are then recomputed instead of silently reused.
FEATURE_VERSION = 1

ImageFn = Callable[[Example], Image.Image]


class Selector(Protocol):
    episodic: bool

    def prepare(self, queries: Sequence[Example]) -> None: ...

    def select(self, rng: random.Random, query: Example, k: int) -> list[Example]: ...


class DemoSelector:
    def __init__(self, pool: Sequence[Example], episodic: bool = False) -> None:
        self.pool, self.episodic = list(pool), episodic
        self.episodes: dict[str, dict[str, list[Example]]] = defaultdict(lambda: defaultdict(list))
        if episodic:
            for ex in self.pool:
                if ex.group is None:
                    raise ValueError(f"episodic task, but pool example {ex.id} has no 'episode' in its json")
                self.episodes[ex.group][ex.answers[0]].append(ex)

    def prepare(self, queries: Sequence[Example]) -> None:
        """Nothing to precompute: random draws need no features (the same interface as `RICESSelector`)."""

    def classes(self, query: Example) -> int:
        """How many classes the query's episode has (its chance rate is 1 / this)."""
        return len(self._episode(query))

    def _episode(self, query: Example) -> dict[str, list[Example]]:
        if query.group not in self.episodes:
            raise ValueError(f"query {query.id} is from episode {query.group!r}, which has no demos in the pool")
        return self.episodes[query.group]

    def select(self, rng: random.Random, query: Example, k: int) -> list[Example]:
        if not self.episodic:
            if k > len(self.pool):
                raise ValueError(f"{k} shots asked but the demo pool has only {len(self.pool)} examples")
            return rng.sample(self.pool, k)
        by_class = self._episode(query)
        labels = sorted(by_class)
        start = rng.randrange(len(labels))
        counts = [sum(1 for i in range(k) if (start + i) % len(labels) == c) for c in range(len(labels))]
        demos = []
        for label, n in zip(labels, counts):
            if n > len(by_class[label]):
                raise ValueError(f"{k} shots need {n} demos of class {label!r} in episode {query.group}, "
                                 f"the pool has {len(by_class[label])}: raise the toy world's "
                                 "binding_pool_per_class (concept_pool_per_class on a concept task)")
            demos += rng.sample(by_class[label], n)
        rng.shuffle(demos)
        return demos


# ---------------------------------------------------------------------------------------------------
# CLIP image features


def _sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed, so ("ab", "c") != ("a", "bc")
        h.update(data)
    return h.hexdigest()


def _file_stamp(path: str | Path) -> str:
    # Size + mtime rather than a content hash: hashing a multi-GB checkpoint on every eval would cost
    # seconds, and rewriting or copying the file changes its mtime, which only ever errs towards recomputing.
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the image tower's weights: the identity of a model that has no named source."""
    tower = getattr(model, "visual", model)
    h = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"weights:{h.hexdigest()}"


def _weights_help(model: str, pretrained: str | None, download_dir: str | None) -> str:
    args = [repr(model)] + ([f"pretrained={pretrained!r}"] if pretrained else []) + (
        [f"cache_dir={download_dir!r}"] if download_dir else [])
    fetch = f"python -c \"import open_clip; open_clip.create_model_and_transforms({', '.join(args)})\""
    return (
        "RICES needs pretrained CLIP weights and none could be loaded (offline, there is nothing to download). "
        f"Fetch them once on a machine with internet: {fetch} (without cache_dir they land in the Hugging Face "
        "cache, ~/.cache/huggingface/hub, which you can copy here), or point `pretrained` at a local checkpoint "
        "file, or `model` at 'local-dir:<folder with open_clip_config.json and the weights>'. Offline, "
        "HF_HUB_OFFLINE=1 makes this fail at once instead of after the hub's retries. "
        f"Known tags for {model}: {_known_tags(model)}"
    )


def _known_tags(model: str) -> list[str]:
    import open_clip

    try:
        return list(open_clip.list_pretrained_tags_by_model(model))
    except Exception:  # an unknown or schema'd name has no tag list; the message must still be built
        return []


class ClipEncoder:
    """An open_clip model that turns PIL images into L2-normalised float32 image features (on the CPU).

    `identity` names the weights + preprocessing for the feature cache; by default a hash of the image
    tower's weights, which is exact whatever built the model. `images_encoded` counts images through the
    model, so a cache hit (zero new images) can be checked.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        identity: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        input_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.input_dtype, self.autocast_dtype = input_dtype, autocast_dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.batch_size = batch_size
        preprocess_cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
        # The preprocessing is part of what the features mean (image size, mean/std, resize mode).
        self.identity = "|".join([identity or weights_fingerprint(model),
                                  f"preprocess={json.dumps(preprocess_cfg, sort_keys=True, default=str)}"])
        self.images_encoded = 0

    @classmethod
    def from_open_clip(
        cls,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        *,
        precision: str = "fp32",
        device: str | torch.device | None = None,
        batch_size: int = 64,
        download_dir: str | None = None,
    ) -> ClipEncoder:
        """`model`: an open_clip architecture ('ViT-B-32'), 'hf-hub:org/repo' or 'local-dir:/path';
        `pretrained`: a tag ('openai', 'laion2b_s34b_b79k') or a checkpoint file (ignored with a schema);
        `precision`: open_clip's ('fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16', 'amp', 'amp_bf16')."""
        import open_clip
        from open_clip.model import get_input_dtype

        schema = "local-dir" if model.startswith("local-dir:") else "hf-hub" if model.startswith("hf-hub:") else None
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if schema else pretrained, precision=precision, device="cpu",
                cache_dir=download_dir)
        except Exception as e:  # open_clip raises RuntimeError/OSError/ValueError for missing weights or names
            raise RuntimeError(f"could not load open_clip model {model!r} (pretrained={pretrained!r}): "
                               f"{str(e).rstrip('.')}. "
                               + _weights_help(model, pretrained, download_dir)) from e
        identity = cls._source_identity(model, None if schema else pretrained, schema)
        if identity is None:
            logger.warning("open_clip model %r has no pretrained weights (random init): RICES neighbours by "
                           "random features mean little; pass a pretrained tag or checkpoint", model)
        # open_clip's fp16/bf16 keep some weights in fp32 (layer norms, embeddings), so the input dtype is the
        # precision's, not the first parameter's; amp runs fp32 weights under autocast.
        autocast = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
        identity = f"{identity or weights_fingerprint(clip)}|{precision}"  # amp leaves the weights as they are
        return cls(clip, preprocess, identity=identity, device=device,
                   batch_size=batch_size, input_dtype=get_input_dtype(precision) or torch.float32,
                   autocast_dtype=autocast)

    @staticmethod
    def _source_identity(model: str, pretrained: str | None, schema: str | None) -> str | None:
        """Where the weights come from, cheaply; None when they are random (then the weights are hashed)."""
        if schema == "hf-hub":
            return model
        if schema == "local-dir":
            folder = Path(model.removeprefix("local-dir:"))
            checkpoints = sorted(p for ext in ("safetensors", "bin", "pth") for p in folder.glob(f"*.{ext}"))
            if not checkpoints:
                return None
            config = (folder / "open_clip_config.json").read_bytes()
            return f"{model}|config={_sha256(config)[:16]}|" + ",".join(_file_stamp(p) for p in checkpoints)
        if not pretrained:
            return None
        if os.path.isfile(pretrained):
            return f"{model}|file={_file_stamp(pretrained)}"
        return f"{model}|{pretrained}"  # a tag names fixed released weights

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(len(images), dim) unit-norm float32 features on the CPU; one forward pass for all given images."""
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device, dtype=self.input_dtype)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            features = self.model.encode_image(x)
        self.images_encoded += len(images)
        # Normalise in float32 (fp16 norms are coarse) so cosine similarity is a plain dot product.
        return F.normalize(features.float(), dim=-1).cpu()

    def encode_examples(
        self, examples: Sequence[Example], image_fn: ImageFn, *, desc: str = "CLIP features", progress: bool = True
    ) -> torch.Tensor:
        """Features of `examples` in order, in batches, loading each image only when its batch runs."""
        batches = range(0, len(examples), self.batch_size)
        out = [self.encode([image_fn(ex) for ex in examples[i : i + self.batch_size]])
               for i in tqdm(batches, desc=desc, unit="batch", disable=not progress)]
        return torch.cat(out) if out else torch.zeros(0, 0)


def example_image(example: Example) -> Image.Image:
    """The raw image of an example, for CLIP's own preprocessing (not the MLLM-preprocessed `example.image`)."""
    raw = getattr(example, "image_bytes", None)
    if raw is None:
        raise ValueError(
            f"example {example.id} keeps only its MLLM-preprocessed image tensor; RICES needs the raw image for "
            "CLIP's preprocessing: keep the encoded bytes as `Example.image_bytes` when loading "
            "(data_modules/downstream.py), or pass `image_fn` (example -> PIL image) to make_selector")
    with Image.open(io.BytesIO(raw)) as im:
        return im.convert("RGB")


def pool_fingerprint(pool: Sequence[Example]) -> str:
    """A content hash of the pool: its ids in order and each image (raw bytes, else the preprocessed tensor).

    Hashing the bytes needs no decoding, so a cache hit stays cheap; the tensor fallback is exact too but
    depends on the MLLM's preprocessing, so another backbone recomputes (never reuses wrong features).
    """
    h = hashlib.sha256()
    for ex in pool:
        raw = getattr(ex, "image_bytes", None)
        if raw is None:
            raw = ex.image.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        h.update(_sha256(ex.id, raw).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Feature cache


class FeatureCache:
    """Pool features on disk: one file per (pool name, model), holding the full key it was computed for.

    The file name carries the pool's name and a hash of the model identity, so different models never share
    a file; the key inside (feature version, model, pool content, size) is checked on load, and a mismatch
    (a rebuilt pool, a new feature version) is logged with what changed, then recomputed and replaced.
    Writes go through a temporary file + rename, so a crash never leaves a half-written cache behind.
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir).expanduser()

    def path(self, pool_name: str, model_identity: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", pool_name).strip("_") or "pool"
        return self.dir / f"rices-{slug}-{_sha256(model_identity)[:16]}.pt"

    def load(self, path: Path, key: dict[str, Any], ids: list[str]) -> torch.Tensor | None:
        if not path.exists():
            logger.info("RICES: no feature cache at %s, computing the pool's features", path)
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            stored_key, stored_ids, features = stored["key"], stored["ids"], stored["features"]
        except Exception as e:  # truncated / foreign file: recompute rather than fail the eval
            logger.warning("RICES: feature cache %s is unreadable (%s); recomputing and replacing it", path, e)
            return None
        changed = sorted(k for k in key.keys() | stored_key.keys() if key.get(k) != stored_key.get(k))
        if changed:
            logger.warning("RICES: feature cache %s is stale (changed: %s); recomputing and replacing it",
                           path, ", ".join(changed))
            return None
        if stored_ids != ids or features.shape[0] != len(ids):
            # Same content hash but another order or length can only be a bug or a hand-edited file.
            logger.warning("RICES: feature cache %s does not match the pool's ids; recomputing and replacing it",
                           path)
            return None
        logger.info("RICES: reusing pool features from %s", path)
        return features

    def save(self, path: Path, key: dict[str, Any], ids: list[str], features: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save({"key": key, "ids": ids, "features": features.contiguous()}, tmp)
        os.replace(tmp, path)
        logger.info("RICES: wrote pool features (%d x %d) to %s", *features.shape, path)


# ---------------------------------------------------------------------------------------------------
# RICES


class RICESSelector:
    """The k pool examples most similar to the query by CLIP image features (cosine), most similar last.

    Deterministic: `rng` is ignored (every seed sees the same demos), and ties keep pool order (stable sort).
    Query features are not cached on disk: the query split is small next to the pool and its first-N subset
    changes with `num_queries`; `prepare(queries)` computes them once, batched, for the whole evaluation.
    """

    episodic = False

    def __init__(
        self,
        pool: Sequence[Example],
        encoder: ClipEncoder,
        *,
        image_fn: ImageFn = example_image,
        cache_dir: str | Path | None = None,
        pool_name: str = "pool",
        pool_key: str | None = None,
        progress: bool = True,
    ) -> None:
        if not pool:
            raise ValueError("RICES needs a non-empty demo pool")
        self.pool, self.encoder, self.image_fn, self.progress = list(pool), encoder, image_fn, progress
        ids = [ex.id for ex in self.pool]
        key = {"version": FEATURE_VERSION, "model": encoder.identity,
               "pool": pool_key or pool_fingerprint(self.pool), "size": len(self.pool)}
        cache = FeatureCache(cache_dir) if cache_dir is not None else None
        path = cache.path(pool_name, encoder.identity) if cache else None
        features = cache.load(path, key, ids) if cache else None
        self.from_cache = features is not None
        if features is None:
            features = encoder.encode_examples(self.pool, image_fn, desc=f"RICES pool features ({pool_name})",
                                               progress=progress)
            if cache:
                cache.save(path, key, ids, features)
        self.features = features
        # Keyed by object identity (the example is kept alive in the value, so its id() is never reused):
        # query ids need not be unique, and two queries with one id must not share features.
        self._query: dict[int, tuple[Example, torch.Tensor]] = {}
        self._ranked: dict[int, torch.Tensor] = {}

    def prepare(self, queries: Sequence[Example]) -> None:
        """Compute the features of the queries not seen yet, batched (else `select` does them one by one)."""
        todo = list({id(q): q for q in queries if id(q) not in self._query}.values())
        if todo:
            features = self.encoder.encode_examples(todo, self.image_fn, desc="RICES query features",
                                                    progress=self.progress)
            self._query.update({id(q): (q, f) for q, f in zip(todo, features)})

    def similarities(self, query: Example) -> torch.Tensor:
        """Cosine similarity of the query to every pool example, in pool order."""
        self.prepare([query])
        return self.features @ self._query[id(query)][1]

    def select(self, rng: random.Random, query: Example, k: int) -> list[Example]:
        if k > len(self.pool):
            raise ValueError(f"{k} shots asked but the demo pool has only {len(self.pool)} examples")
        if k <= 0:
            return []
        ranked = self._ranked.get(id(query))
        if ranked is None or len(ranked) < k:
            # The loop asks each query for several k: rank once (up to the largest k so far, at least 32).
            order = torch.sort(self.similarities(query), descending=True, stable=True).indices
            ranked = self._ranked[id(query)] = order[: max(k, 32)]
        return [self.pool[i] for i in reversed(ranked[:k].tolist())]


# ---------------------------------------------------------------------------------------------------
# Entry point


def make_selector(
    mode: str,
    pool: Sequence[Example],
    *,
    episodic: bool = False,
    clip: ClipEncoder | dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    pool_name: str = "pool",
    pool_key: str | None = None,
    image_fn: ImageFn = example_image,
    progress: bool = True,
) -> Selector:
    """The demo selector for `mode` (one of `SELECTION_MODES`) over `pool`.

    `episodic` is the task's flag: on an episodic task `random` draws within the query's episode (the only
    meaningful random draw there, as before) and `rices` is refused, because its nearest neighbours leak the
    query's class through the closest demo and break the class-balanced protocol the 1/N chance line assumes.
    `clip`: a `ClipEncoder`, or keyword arguments for `ClipEncoder.from_open_clip` (the evaluation protocol passes
    its model: OpenFlamingo's ViT-L-14/openai, or mmict's ViT-B-32/openai). `cache_dir`: where pool features are
    cached (None: computed, not cached);
    `pool_name` names the cache file (e.g. 'toy_vqa-train'); `pool_key` overrides the pool's content hash.
    `image_fn` must give each example's raw image: the cache key hashes the raw bytes, not what `image_fn`
    does with them, so one that crops or edits needs its own `pool_key` (or `cache_dir=None`).
    """
    if mode not in SELECTION_MODES:
        close = difflib.get_close_matches(str(mode), SELECTION_MODES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown demo selection {mode!r} (known: {', '.join(SELECTION_MODES)}){hint}")
    if mode == "random":
        return DemoSelector(pool, episodic=episodic)
    if mode == "episodic":
        if not any(ex.group is not None for ex in pool):
            raise ValueError("episodic selection needs pool examples with an 'episode' (Example.group); "
                             "this pool has none: use 'random' or 'rices'")
        return DemoSelector(pool, episodic=True)
    if episodic:
        raise ValueError("rices selection is not supported on an episodic task: the nearest image is likely the "
                         "query's own class, which breaks the class-balanced draws and their 1/N chance line; "
                         "use 'random' (episodic draws) for this task")
    encoder = clip if isinstance(clip, ClipEncoder) else ClipEncoder.from_open_clip(**(clip or {}))
    return RICESSelector(pool, encoder, image_fn=image_fn, cache_dir=cache_dir, pool_name=pool_name,
                         pool_key=pool_key, progress=progress)
