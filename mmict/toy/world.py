"""A synthetic world of coloured shapes: web-corpus and VQA shards that need no download.

Every image shows one shape in one colour at one position on a plain light background. Every text is a
caption ("a red circle on the left .") or a VQA string ("Question: what color is the shape ? Short
answer: red"), so a word-level vocabulary (``toy_vocabulary()``) covers all of it and tiny models can
learn it in minutes. Web documents are of three kinds:

- thematic documents (their images share a colour, a shape or a position, and most keep one text form),
  so earlier (image, text) pairs of a document say something about later ones;
- concept-binding episodes (``binding.py``): nonsense words of the *tuning* pool bound to shapes or
  colours, "this is a dapo", which only the demos' images can resolve;
- concept-induction episodes (``concept.py``): images labelled by a hidden rule of the *tuning* rule pool,
  "does it fit ? yes", which only the demos' images with their labels define.

The downstream side has a toy VQA task (``vqa/``), the binding task (``binding/``: episodes over the
*eval* word pool; the train split is each episode's demo pool, the test split its queries), the concept task
(``concept/``: episodes over the *eval* rules, laid out as the binding task) and its tuning split
(``concept_tuning/``: train and val episodes over the *tuning* rules, for training on a task's own split).
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from mmict.toy.binding import episode_document, sample_episode
from mmict.toy.concept import Rule, concept_document, rule_image
from mmict.toy.language import (
    BACKGROUND_RGB,
    BINDING_PROMPT,
    BINDING_TASK,
    COLOR_RGB,
    COLORS,
    CONCEPT_LABELS,
    CONCEPT_PROMPT,
    CONCEPT_TASK,
    CONCEPT_TUNING_TASK,
    DEFAULT_ATTRIBUTES,
    POSITION_CENTERS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    answer_for,
    binding_text,
    caption,
    concept_text,
    rule_name,
    rule_pools,
    vqa_demo_text,
    word_pools,
)

logger = logging.getLogger(__name__)

# Bump when the generated data changes for the same arguments, so that old worlds get rewritten.
# 2: binding episodes in the web corpus, the binding task; 3: per-episode RNGs; 4: concept episodes and tasks
RECIPE_VERSION = 4

_RADIUS = 0.2  # shape radius as a fraction of the image side
_SUPERSAMPLE = 4  # draw large, then box-downsample: anti-aliased edges at 32 px
WEB_DIR = "web"
VQA_DIR = "vqa"
BINDING_DIR = "binding"
CONCEPT_DIR = "concept"
CONCEPT_TUNING_DIR = "concept_tuning"
MANIFEST = "manifest.json"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85  # a square of the same "radius" looks much bigger than the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "cross":
        a, b = r * 0.35, r
        return [
            (cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a),
            (cx + b, cy + a), (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b),
            (cx - a, cy + a), (cx - b, cy + a), (cx - b, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw_shape(
    shape: str, color: str, position: str, size: int = 32, rng: random.Random | None = None
) -> Image.Image:
    """Draw one shape; with ``rng``, the background tint, the size and the offset jitter a little.

    Without ``rng`` the drawing is canonical (centred at ``POSITION_CENTERS[position]``).
    """
    if color not in COLOR_RGB:
        raise ValueError(f"unknown color {color!r}; known: {COLORS}")
    if position not in POSITION_CENTERS:
        raise ValueError(f"unknown position {position!r}; known: {POSITIONS}")
    fx, fy = POSITION_CENTERS[position]
    radius, background = _RADIUS, BACKGROUND_RGB
    if rng is not None:
        # Jitter small enough that the shape stays inside the image and clearly at its position.
        fx += rng.uniform(-0.04, 0.04)
        fy += rng.uniform(-0.04, 0.04)
        radius *= rng.uniform(0.85, 1.1)
        background = tuple(c - rng.randint(0, 12) for c in BACKGROUND_RGB)  # type: ignore[assignment]
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    cx, cy, r = fx * big, fy * big, radius * big
    fill = COLOR_RGB[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _random_attributes(rng: random.Random) -> dict[str, str]:
    return {"shape": rng.choice(SHAPES), "color": rng.choice(COLORS), "position": rng.choice(POSITIONS)}


def _text_about(form: str, attrs: dict[str, str]) -> str:
    if form == "caption":
        return caption(**attrs)
    return vqa_demo_text(QUESTIONS[form], answer_for(form, **attrs))


def make_document(rng: random.Random, doc_id: str, image_size: int = 32) -> dict:
    """One interleaved document in the MMC4 convention (the ``json`` member of a web sample)."""
    num_pairs = rng.randint(2, 8)
    theme = rng.choice(tuple(QUESTIONS))  # the attribute all images of the document share
    shared = _random_attributes(rng)[theme]
    forms = ("caption", *QUESTIONS)
    doc_form = rng.choice((*forms, "mixed"))
    texts, infos = [], []
    for i in range(num_pairs):
        attrs = _random_attributes(rng)
        attrs[theme] = shared
        form = rng.choice(forms) if doc_form == "mixed" else doc_form
        texts.append(_text_about(form, attrs))
        image = draw_shape(attrs["shape"], attrs["color"], attrs["position"], size=image_size, rng=rng)
        infos.append(
            {
                "image_name": f"img_{i}.jpg",
                "matched_text_index": i,
                "matched_sim": round(rng.uniform(0.2, 0.4), 4),
                "image_base64": base64.b64encode(_jpeg_bytes(image)).decode("ascii"),
            }
        )
    rng.shuffle(infos)  # MMC4 does not order image_info by text position; readers must sort
    return {"doc_id": doc_id, "url": f"toy://{doc_id}", "text_list": texts, "image_info": infos}


def make_binding_document(
    rng: random.Random, doc_id: str, image_size: int = 32, n_way: int = 2, pool: str = "tuning"
) -> dict:
    """A concept-binding episode as an interleaved document: k demos and a query, all "this is a <word>"."""

    pairs = episode_document(rng, word_pools()[pool], k=rng.randint(1, 7), n_way=n_way)
    return _episode_document(rng, doc_id, image_size, pairs, [binding_text(p.word) for p in pairs])


def make_concept_document(rng: random.Random, doc_id: str, image_size: int = 32, pool: str = "tuning") -> dict:
    """A concept-induction episode as an interleaved document: k demos and a query, "does it fit ? <label>"."""
    pairs = concept_document(rng, rule_pools()[pool], k=rng.randint(1, 7))
    return _episode_document(rng, doc_id, image_size, pairs, [concept_text(p.label) for p in pairs])


def _episode_document(rng: random.Random, doc_id: str, image_size: int, pairs: list, texts: list[str]) -> dict:
    """Images (anything with shape, color, position) and their texts as an MMC4 document, pair i at text i."""
    infos = []
    for i, p in enumerate(pairs):
        image = draw_shape(p.shape, p.color, p.position, size=image_size, rng=rng)
        infos.append({"image_name": f"img_{i}.jpg", "matched_text_index": i, "matched_sim": 0.3,
                      "image_base64": base64.b64encode(_jpeg_bytes(image)).decode("ascii")})
    rng.shuffle(infos)
    return {"doc_id": doc_id, "url": f"toy://{doc_id}", "text_list": texts, "image_info": infos}


def binding_examples(seed: int, episode_index: int, split: str, *, pool_per_class: int, queries: int,
                     n_way: int, image_size: int = 32) -> list[tuple[dict, bytes]]:
    """One evaluation episode over the eval word pool: its demo pool (``split="train"``) or its queries.

    The episode (classes and words) comes from an RNG of (seed, episode) alone, so both splits agree on
    it while each split draws, and renders, only its own images.
    """

    episode = sample_episode(random.Random(f"toy-world/{seed}/binding/{episode_index}"), word_pools()["eval"], n_way)
    rng = random.Random(f"toy-world/{seed}/binding/{episode_index}/{split}")
    name = f"ep{episode_index:05d}"

    def example(tag: str, i: int, class_index: int) -> tuple[dict, bytes]:
        bound = episode.image(class_index, rng)
        key = f"{name}_{tag}{i:03d}"
        meta = {"id": key, "task": BINDING_TASK, "episode": name, "prompt": BINDING_PROMPT,
                "answers": [bound.word], "attribute": episode.attribute, "class": episode.classes[class_index]}
        image = draw_shape(bound.shape, bound.color, bound.position, size=image_size, rng=rng)
        return meta, _jpeg_bytes(image)

    if split == "train":
        return [example("d", c * pool_per_class + i, c) for c in range(n_way) for i in range(pool_per_class)]
    return [example("q", i, rng.randrange(n_way)) for i in range(queries)]


def _concept_example(rng: random.Random, rule: Rule, *, task: str, key: str, episode: str, label: str,
                     image_size: int) -> tuple[dict, bytes]:
    pair = rule_image(rng, rule, label)
    meta = {"id": key, "task": task, "episode": episode, "prompt": CONCEPT_PROMPT, "answers": [label],
            "rule": rule_name(rule), "attribute": "+".join(a for a, _ in rule), "value": "+".join(v for _, v in rule)}
    return meta, _jpeg_bytes(draw_shape(pair.shape, pair.color, pair.position, size=image_size, rng=rng))


def concept_examples(seed: int, episode_index: int, split: str, *, pool_per_class: int, queries: int,
                     image_size: int = 32) -> list[tuple[dict, bytes]]:
    """One evaluation episode over the eval rules, laid out as `binding_examples`: its demo pool
    (``split="train"``: ``pool_per_class`` images per label) or its queries (labels uniformly random).

    The rule comes from an RNG of (seed, episode) alone, so both splits agree on it while each split draws, and
    renders, only its own images."""
    rule = random.Random(f"toy-world/{seed}/concept/{episode_index}").choice(rule_pools()["eval"])
    rng = random.Random(f"toy-world/{seed}/concept/{episode_index}/{split}")
    name = f"ep{episode_index:05d}"
    if split == "train":
        labels = [("d", label) for label in CONCEPT_LABELS for _ in range(pool_per_class)]
    else:
        labels = [("q", rng.choice(CONCEPT_LABELS)) for _ in range(queries)]
    return [_concept_example(rng, rule, task=CONCEPT_TASK, key=f"{name}_{tag}{i:03d}", episode=name, label=label,
                             image_size=image_size) for i, (tag, label) in enumerate(labels)]


def concept_tuning_examples(seed: int, episode_index: int, split: str, *, per_class: int, image_size: int = 32
                            ) -> list[tuple[dict, bytes]]:
    """One training episode over the tuning rules (``split`` "train" or "val", each its own RNG stream):
    ``per_class`` images per label, written contiguously so a stream can group them by episode."""
    rng = random.Random(f"toy-world/{seed}/concept_tuning/{split}/{episode_index}")
    rule = rng.choice(rule_pools()["tuning"])
    name = f"ep{episode_index:05d}"
    labels = [label for label in CONCEPT_LABELS for _ in range(per_class)]
    rng.shuffle(labels)  # mixed within the episode, so any part of it has both labels
    return [_concept_example(rng, rule, task=CONCEPT_TUNING_TASK, key=f"{name}_d{i:03d}", episode=name,
                             label=label, image_size=image_size) for i, label in enumerate(labels)]


def make_vqa_example(rng: random.Random, example_id: str, image_size: int = 32) -> tuple[dict, bytes]:
    """One downstream VQA example: its ``json`` and its ``jpg`` bytes."""
    attrs = _random_attributes(rng)
    attribute = rng.choice(tuple(QUESTIONS))
    image = draw_shape(attrs["shape"], attrs["color"], attrs["position"], size=image_size, rng=rng)
    meta = {
        "id": example_id,
        "task": "toy_vqa",
        "question": QUESTIONS[attribute],
        "answers": [answer_for(attribute, **attrs)] * 10,  # VQA convention: 10 annotator answers
        "image_name": f"{example_id}.jpg",
    }
    return meta, _jpeg_bytes(image)


def _recipe_hash(recipe: dict) -> str:

    payload = json.dumps({"recipe_version": RECIPE_VERSION, "recipe": recipe, "binding_attributes": DEFAULT_ATTRIBUTES,
                          "word_pools": word_pools(), "concept_rules": rule_pools()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


SPLITS = {WEB_DIR: ("train", "val"), VQA_DIR: ("train", "test"), BINDING_DIR: ("train", "test"),
          CONCEPT_DIR: ("train", "test"), CONCEPT_TUNING_DIR: ("train", "val")}
EPISODIC_DIRS = (BINDING_DIR, CONCEPT_DIR, CONCEPT_TUNING_DIR)  # written episode by episode, one key prefix each


def _split_dirs(root: Path) -> dict[str, tuple[Path, str]]:
    return {f"{folder}/{split}": (root / folder, split) for folder, splits in SPLITS.items() for split in splits}


def _write_split(pattern: str, samples: Iterator[dict], samples_per_shard: int, episodic: bool,
                 progress: tqdm) -> None:
    """An episodic split starts a new shard rather than split an episode over two (unless one is bigger than a
    shard), so a stream that groups a shard's consecutive examples by episode gets whole episodes."""
    runs = itertools.groupby(samples, key=lambda s: s["__key__"].split("_")[0] if episodic else s["__key__"])
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0) as writer:
        for _, run in runs:
            episode = list(run)
            if 0 < writer.count and writer.count + len(episode) > samples_per_shard:
                writer.next_stream()
            for sample in episode:
                writer.write(sample)
                progress.update(1)


def _shards(root: Path, split: str) -> list[Path]:
    folder, prefix = _split_dirs(root)[split]
    return sorted(folder.glob(f"{prefix}-*.tar"))


def toy_world_exists(root: str | Path) -> bool:
    """True when ``root`` holds a complete toy world (manifest plus shards of every non-empty split)."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        counts = json.loads(manifest_path.read_text())["counts"]
    except (ValueError, KeyError, TypeError):
        return False
    return all(_shards(root, split) for split, count in counts.items() if count > 0)


def _binding_samples(split: str, recipe: dict) -> Iterator[dict]:
    for e in range(recipe["binding_episodes"]):
        for meta, jpg in binding_examples(recipe["seed"], e, split.split("/")[1],
                                          pool_per_class=recipe["binding_pool_per_class"],
                                          queries=recipe["binding_queries_per_episode"], n_way=recipe["n_way"],
                                          image_size=recipe["image_size"]):
            yield {"__key__": meta["id"], "jpg": jpg, "json": json.dumps(meta).encode()}


def _concept_samples(split: str, recipe: dict) -> Iterator[dict]:
    folder, name = split.split("/")
    if folder == CONCEPT_DIR:
        episodes = (concept_examples(recipe["seed"], e, name, pool_per_class=recipe["concept_pool_per_class"],
                                     queries=recipe["concept_queries_per_episode"], image_size=recipe["image_size"])
                    for e in range(recipe["concept_episodes"]))
    else:
        count = recipe["concept_tuning_episodes" if name == "train" else "concept_tuning_val_episodes"]
        episodes = (concept_tuning_examples(recipe["seed"], e, name, per_class=recipe["concept_tuning_per_class"],
                                            image_size=recipe["image_size"]) for e in range(count))
    for examples in episodes:
        for meta, jpg in examples:
            yield {"__key__": meta["id"], "jpg": jpg, "json": json.dumps(meta).encode()}


def _samples(split: str, recipe: dict) -> Iterator[dict]:
    """The samples of one split, from an RNG seeded by (seed, split) so splits are independent."""
    if split.startswith("binding/"):
        yield from _binding_samples(split, recipe)
        return
    if split.startswith(("concept/", "concept_tuning/")):
        yield from _concept_samples(split, recipe)
        return
    rng = random.Random(f"toy-world/{recipe['seed']}/{split}")
    size = recipe["image_size"]
    kind, name = split.split("/")
    count = recipe[{"web/train": "num_docs", "web/val": "val_docs"}.get(split, f"vqa_{name}")]
    for i in range(count):
        key = f"{name}_{i:06d}"
        if kind == "web":
            draw = rng.random()  # binding first, then concept: fractions summing past 1 leave concept the rest
            if draw < recipe["binding_fraction"]:
                doc = make_binding_document(rng, key, size, recipe["n_way"])
            elif draw < recipe["binding_fraction"] + recipe["concept_fraction"]:
                doc = make_concept_document(rng, key, size)
            else:
                doc = make_document(rng, key, size)
            yield {"__key__": key, "json": json.dumps(doc).encode()}
        else:
            meta, jpg = make_vqa_example(rng, key, size)
            yield {"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()}


def write_toy_world(
    root: str | Path,
    *,
    num_docs: int = 3000,
    val_docs: int = 200,
    vqa_train: int = 500,
    vqa_test: int = 300,
    binding_fraction: float = 0.5,
    binding_episodes: int = 100,
    binding_pool_per_class: int = 8,
    binding_queries_per_episode: int = 3,
    n_way: int = 2,
    concept_fraction: float = 0.25,
    concept_episodes: int = 100,
    concept_pool_per_class: int = 8,
    concept_queries_per_episode: int = 3,
    concept_tuning_episodes: int = 600,
    concept_tuning_val_episodes: int = 50,
    concept_tuning_per_class: int = 5,
    image_size: int = 32,
    samples_per_shard: int = 500,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Write the toy world's shards under ``root`` (or reuse them when the recipe is unchanged).

    Layout: ``web/{train,val}-%06d.tar`` (interleaved documents, ``binding_fraction`` of them binding
    episodes, ``concept_fraction`` concept episodes), ``vqa/{train,test}-%06d.tar``,
    ``binding/{train,test}-%06d.tar`` (demo pools and queries; a binding episode has
    ``binding_pool_per_class`` demos per class and ``binding_queries_per_episode`` queries),
    ``concept/{train,test}-%06d.tar`` (the same for ``concept_episodes`` concept episodes, per label),
    ``concept_tuning/{train,val}-%06d.tar`` (``concept_tuning_episodes`` and ``concept_tuning_val_episodes``
    episodes of ``concept_tuning_per_class`` images per label, each episode's contiguous) and ``manifest.json``
    (recipe, its hash, counts). Returns the manifest.
    """
    root = Path(root)
    recipe = {
        "num_docs": num_docs,
        "val_docs": val_docs,
        "vqa_train": vqa_train,
        "vqa_test": vqa_test,
        "binding_fraction": binding_fraction,
        "binding_episodes": binding_episodes,
        "binding_pool_per_class": binding_pool_per_class,
        "binding_queries_per_episode": binding_queries_per_episode,
        "n_way": n_way,
        "concept_fraction": concept_fraction,
        "concept_episodes": concept_episodes,
        "concept_pool_per_class": concept_pool_per_class,
        "concept_queries_per_episode": concept_queries_per_episode,
        "concept_tuning_episodes": concept_tuning_episodes,
        "concept_tuning_val_episodes": concept_tuning_val_episodes,
        "concept_tuning_per_class": concept_tuning_per_class,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "seed": seed,
    }
    recipe_hash = _recipe_hash(recipe)
    manifest_path = root / MANIFEST
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("hash") == recipe_hash and toy_world_exists(root):
            logger.info("reusing toy world at %s", root)
            return old
        logger.warning("toy world recipe at %s changed (or shards are missing): rewriting it", root)

    # The manifest goes first and comes back last, so an interrupted write is never taken for complete.
    manifest_path.unlink(missing_ok=True)
    splits = _split_dirs(root)
    for split, (folder, _) in splits.items():
        folder.mkdir(parents=True, exist_ok=True)
        for old_shard in _shards(root, split):
            old_shard.unlink()

    counts = {
        "web/train": num_docs,
        "web/val": val_docs,
        "vqa/train": vqa_train,
        "vqa/test": vqa_test,
        "binding/train": binding_episodes * n_way * binding_pool_per_class,
        "binding/test": binding_episodes * binding_queries_per_episode,
        "concept/train": concept_episodes * len(CONCEPT_LABELS) * concept_pool_per_class,
        "concept/test": concept_episodes * concept_queries_per_episode,
        "concept_tuning/train": concept_tuning_episodes * len(CONCEPT_LABELS) * concept_tuning_per_class,
        "concept_tuning/val": concept_tuning_val_episodes * len(CONCEPT_LABELS) * concept_tuning_per_class,
    }
    with tqdm(total=sum(counts.values()), desc=f"toy world -> {root}", unit="sample") as progress:
        for split, (folder, prefix) in splits.items():
            if counts[split] == 0:
                continue
            _write_split(str(folder / f"{prefix}-%06d.tar"), _samples(split, recipe), samples_per_shard,
                         split.split("/")[0] in EPISODIC_DIRS, progress)

    manifest = {
        "recipe": recipe,
        "recipe_version": RECIPE_VERSION,
        "hash": recipe_hash,
        "counts": counts,
        "shards": {split: [str(p.relative_to(root)) for p in _shards(root, split)] for split in splits},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
