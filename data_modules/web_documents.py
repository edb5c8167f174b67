"""Episodes of interleaved web documents (MMC4 / OBELICS convention) for in-context tuning.

One document -> one episode: a window of k+1 consecutive (image, text) pairs; the first k are the
demonstrations, the last is the query (empty prompt, its text is the target). Shards are webdataset
tars under ``root/<corpus>/{train,val}-*.tar``, one document per sample: a ``json`` member with
``text_list`` and ``image_info`` (images as ``image_base64`` or as separate tar members named by
``image_name``). Corrupt documents are skipped and counted (see ``skips.py``); images can be filtered by
image-text similarity and by size; the texts an episode takes are cut to a token budget (``text_budget.py``:
``data.max_text_tokens``, counted), so no document, however long, can stall a step. `EpisodeStream` is the
streaming engine (`streaming.ShardStream`) with this parsing as its episode stage; `web_corpus.WebCorpusDataModule`
serves it to Lightning.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from collections.abc import Iterable, Iterator
from typing import Any

from PIL import Image

from .episodes import ImageTransform, decode_image
from .skips import record_skip
from .streaming import ShardStream, ShotPlan, _Watchdog, source_of
from .text_budget import TextBudget

Pair = tuple[Image.Image, str]

# A train stream that drops this many documents in a row without producing an episode would otherwise spin
# forever on resampled shards: fail loudly instead.
MAX_CONSECUTIVE_DROPS = 10_000


# ---------------------------------------------------------------------------------------------------
# Documents


def _image_bytes(info: dict, sample: dict) -> bytes | None:
    encoded = info.get("image_base64")
    if isinstance(encoded, str) and encoded:
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return b""  # present but garbage: counts as "image does not decode"
    name = info.get("image_name")
    if isinstance(name, str):
        # webdataset keys members by what follows the sample key, lower-cased: "doc.img_0.jpg" -> "img_0.jpg"
        return sample.get(name.lower(), sample.get(name))
    return None


def document_pairs(sample: dict, *, min_similarity: float | None = None, min_image_size: int = 0) -> list[Pair] | None:
    """The usable (image, text) pairs of one web sample, in text order; None (counted) if unusable.

    ``min_similarity``: drop images whose ``matched_sim`` (MMC4's CLIP image-text similarity) is below it, as
    OpenFlamingo does (0.24 for MMC4); images without a ``matched_sim`` (OBELICS: paired by adjacency) are
    kept. ``min_image_size``: drop images whose shorter side is smaller (logos, icons, tracking pixels).
    """
    raw = sample.get("json")
    if raw is None:
        record_skip("missing json")
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        record_skip("json does not parse")
        return None
    texts = doc.get("text_list") if isinstance(doc, dict) else None
    infos = doc.get("image_info") if isinstance(doc, dict) else None
    if not isinstance(texts, list) or not isinstance(infos, list):
        record_skip("malformed document")
        return None
    found: list[tuple[int, int, Image.Image, str]] = []
    for order, info in enumerate(infos):
        index = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(texts) or not isinstance(texts[index], str):
            record_skip("image matched to no text")
            continue
        sim = info.get("matched_sim")
        if min_similarity is not None and isinstance(sim, int | float) and sim < min_similarity:
            record_skip("image-text similarity below data.min_similarity")
            continue
        data = _image_bytes(info, sample)
        if data is None:
            record_skip("missing image")
            continue
        try:
            image = decode_image(data)
        except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad bytes
            record_skip("image does not decode")
            continue
        if min(image.size) < min_image_size:
            record_skip("image smaller than data.min_image_size")
            continue
        found.append((index, order, image, texts[index]))
    if len(found) < 2:
        record_skip("too few image-text pairs")
        return None
    found.sort(key=lambda item: item[:2])  # text position, then image_info order for ties
    return [(image, text) for _, _, image, text in found]


def make_episode(window: list[Pair], image_transform: ImageTransform, source: str = "") -> dict:
    """All pairs but the last are demonstrations; the last is the query (its text is the target)."""
    *demos, (query_image, query_text) = window
    return {
        "source": source,
        "demo_images": [image_transform(image) for image, _ in demos],
        "demo_texts": [text for _, text in demos],
        "query_image": image_transform(query_image),
        "query_prompt": "",
        "query_target": query_text,
    }


def _cut_episodes(
    samples: Iterable[dict],
    *,
    image_transform: ImageTransform,
    plan: ShotPlan,
    rng: random.Random | None,
    seed: int,
    watchdog: _Watchdog,
    min_similarity: float | None = None,
    min_image_size: int = 0,
    text_budget: TextBudget | None = None,
) -> Iterator[dict]:
    """Decode documents and cut one episode from each: k from ``plan``, at a random window (``rng``, training)
    or at a window drawn from (seed, document key) (validation: identical on every pass and worker split). The
    window's texts are cut to ``text_budget`` (None: kept whole)."""
    drops = 0
    made = 0
    for sample in samples:
        watchdog.shards_since_sample = 0
        pairs = document_pairs(sample, min_similarity=min_similarity, min_image_size=min_image_size)
        k, fewest = plan(made)
        if pairs is not None and len(pairs) < fewest + 1:
            record_skip("too few image-text pairs")
            pairs = None
        if pairs is None:
            drops += 1
            if drops >= MAX_CONSECUTIVE_DROPS:
                raise RuntimeError(
                    f"{drops} documents in a row were skipped (corrupt, or fewer than {fewest + 1} usable "
                    "image-text pairs); check the shards and the shot counts"
                )
            continue
        drops = 0
        k = min(k, len(pairs) - 1)
        pick = rng if rng is not None else random.Random(f"{seed}/{sample.get('__key__')}")
        start = pick.randint(0, len(pairs) - k - 1)
        window = pairs[start : start + k + 1]
        if text_budget is not None:  # only the texts the episode takes: a cut elsewhere in the document costs nothing
            window = [(image, text_budget(text)) for image, text in window]
        yield make_episode(window, image_transform, source=source_of(sample))
        made += 1


# ---------------------------------------------------------------------------------------------------
# Stream


class EpisodeStream(ShardStream):
    """`ShardStream` (disjoint shards per rank and worker, equal batch counts, exact resume) cutting one episode
    from each web document; ``min_similarity`` and ``min_image_size`` filter the images (`document_pairs`),
    ``text_budget`` cuts the texts (`text_budget.TextBudget`; None: kept whole)."""

    def __init__(self, urls: list[str], *, min_similarity: float | None = None, min_image_size: int = 0,
                 text_budget: TextBudget | None = None, **kwargs: Any) -> None:
        super().__init__(urls, **kwargs)
        self.min_similarity = min_similarity
        self.min_image_size = min_image_size
        self.text_budget = text_budget

    def _episode_stage(self, samples: Iterable[dict], plan: ShotPlan, rng: random.Random | None,
                       watchdog: _Watchdog) -> Iterator[dict]:
        return _cut_episodes(samples, image_transform=self.image_transform, plan=plan, rng=rng, seed=self.seed,
                             watchdog=watchdog, min_similarity=self.min_similarity,
                             min_image_size=self.min_image_size, text_budget=self.text_budget)


__all__ = ["MAX_CONSECUTIVE_DROPS", "EpisodeStream", "Pair", "document_pairs", "make_episode"]
