"""Demo selection: random/episodic draws unchanged, and RICES with a tiny open_clip model (no download)."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from data_modules.downstream import Example
from mmict.eval import selection
from mmict.eval.selection import ClipEncoder, DemoSelector, RICESSelector, make_selector

LOGGER = "mmict.eval.selection"
# A CLIP small enough to build in well under a second: 32 px images, a 2-layer ViT of width 32.
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 2.0,
                            "patch_size": 8},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


def write_tiny_clip(folder: Path, seed: int) -> str:
    """An open_clip 'local-dir:' model (config + weights), so loading goes through open_clip's own path."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny CLIP's ops take microseconds, so on a busy machine intra-op thread syncs dominate (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_name(tmp_path_factory) -> str:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def load(name: str) -> ClipEncoder:
    return ClipEncoder.from_open_clip(name, device="cpu", batch_size=8)


def shape_png(rng: random.Random) -> bytes:
    """A coloured circle or square on a coloured background, as PNG bytes (lossless: copies hash alike)."""
    im = Image.new("RGB", (48, 48), tuple(rng.randrange(256) for _ in range(3)))
    x, y = rng.randrange(24), rng.randrange(24)
    draw = ImageDraw.Draw(im)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + 20, y + 20],
                                                             fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def example(ex_id: str, png: bytes, group: str | None = None, answer: str = "a") -> Example:
    ex = Example(id=ex_id, image=torch.zeros(3, 4, 4), question="q?", answers=[answer], task="toy", group=group)
    ex.image_bytes = png  # what downstream.py is to keep; set by hand until it does
    return ex


def make_pool(n: int, seed: int, prefix: str = "p") -> list[Example]:
    rng = random.Random(seed)
    return [example(f"{prefix}{i}", shape_png(rng)) for i in range(n)]


def brute_force(encoder: ClipEncoder, pool: list[Example], query: Example) -> list[str]:
    """All pool ids by cosine similarity computed from scratch, most similar first, ties to the earlier one."""
    feats = encoder.encode([selection.example_image(ex) for ex in pool])
    sims = (feats @ encoder.encode([selection.example_image(query)])[0]).tolist()
    return [pool[i].id for i in sorted(range(len(pool)), key=lambda i: (-sims[i], i))]


def test_rices_top_k_matches_brute_force_most_similar_last(clip_name):
    pool, queries = make_pool(40, seed=1), make_pool(5, seed=2, prefix="q")
    encoder = load(clip_name)
    selector = make_selector("rices", pool, clip=encoder, progress=False)
    assert isinstance(selector, RICESSelector) and selector.features.shape == (40, 16)
    assert torch.allclose(selector.features.norm(dim=-1), torch.ones(40))
    selector.prepare(queries)
    rng = random.Random(0)
    for q in queries:
        sims, ranking = selector.similarities(q), brute_force(encoder, pool, q)
        for k in (8, 1, 4):  # a larger k first: the smaller ones come from the cached ranking
            demos = selector.select(rng, q, k)
            assert [d.id for d in demos] == ranking[:k][::-1]
            order = [sims[pool.index(d)].item() for d in demos]
            assert order == sorted(order)  # most similar last
    # Deterministic: another selector (queries not prepared, so encoded one at a time) picks the same demos.
    again = make_selector("rices", pool, clip=load(clip_name), progress=False)
    assert all([d.id for d in again.select(random.Random(9), q, 4)] == [d.id for d in selector.select(rng, q, 4)]
               for q in queries)


def test_identical_image_is_nearest(clip_name):
    pool, (query,) = make_pool(30, seed=3), make_pool(1, seed=4, prefix="q")
    pool.insert(7, example("copy-of-query", query.image_bytes))
    selector = make_selector("rices", pool, clip=load(clip_name), progress=False)
    demos = selector.select(random.Random(0), query, 3)
    assert demos[-1].id == "copy-of-query"
    assert selector.similarities(query)[7].item() == pytest.approx(1.0, abs=1e-5)


def test_pool_features_cached_once_and_reused(clip_name, tmp_path):
    pool, (query,) = make_pool(20, seed=5), make_pool(1, seed=6, prefix="q")
    first_encoder = load(clip_name)
    first = make_selector("rices", pool, clip=first_encoder, cache_dir=tmp_path, pool_name="toy_vqa-train",
                          progress=False)
    assert not first.from_cache and first_encoder.images_encoded == 20
    (cache_file,) = tmp_path.iterdir()
    assert cache_file.name.startswith("rices-toy_vqa-train-")
    stamp = cache_file.stat().st_mtime_ns

    loaded: list[str] = []

    def counting_image(ex: Example) -> Image.Image:
        loaded.append(ex.id)
        return selection.example_image(ex)

    second_encoder = load(clip_name)  # a fresh load of the same weights has the same identity
    second = make_selector("rices", pool, clip=second_encoder, cache_dir=tmp_path, pool_name="toy_vqa-train",
                           image_fn=counting_image, progress=False)
    assert second.from_cache and second_encoder.images_encoded == 0 and loaded == []
    assert torch.equal(second.features, first.features)
    assert cache_file.stat().st_mtime_ns == stamp and list(tmp_path.iterdir()) == [cache_file]
    assert [d.id for d in second.select(random.Random(0), query, 5)] == \
        [d.id for d in first.select(random.Random(0), query, 5)]
    assert loaded == [query.id]  # only the query was read


def test_changed_pool_or_version_invalidates_cache(clip_name, tmp_path, caplog, monkeypatch):
    pool = make_pool(12, seed=7)
    kwargs = dict(cache_dir=tmp_path, pool_name="toy_vqa-train", progress=False)
    make_selector("rices", pool, clip=load(clip_name), **kwargs)

    def rebuild(new_pool: list[Example]) -> tuple[RICESSelector, ClipEncoder]:
        encoder = load(clip_name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            return make_selector("rices", new_pool, clip=encoder, **kwargs), encoder

    changed = list(pool)
    changed[3] = example(changed[3].id, shape_png(random.Random(99)))  # same id, new image
    selector, encoder = rebuild(changed)
    assert not selector.from_cache and encoder.images_encoded == 12
    assert "stale (changed: pool)" in caplog.text  # never replaced silently

    selector, encoder = rebuild(changed + make_pool(1, seed=8, prefix="extra"))
    assert not selector.from_cache and encoder.images_encoded == 13 and "changed: pool, size" in caplog.text

    monkeypatch.setattr(selection, "FEATURE_VERSION", selection.FEATURE_VERSION + 1)
    selector, encoder = rebuild(changed)
    assert not selector.from_cache and "changed: pool, size, version" in caplog.text
    selector, encoder = rebuild(changed)
    assert selector.from_cache and encoder.images_encoded == 0

    # Another model gets its own file: the first model's cache is left alone.
    other = load(write_tiny_clip(tmp_path.parent / f"{tmp_path.name}-other-clip", seed=1))
    assert other.identity != encoder.identity
    make_selector("rices", changed, clip=other, **kwargs)
    assert len(list(tmp_path.iterdir())) == 2

    # A corrupt file is recomputed with a warning, not trusted and not a crash.
    for f in tmp_path.iterdir():
        f.write_bytes(b"not a cache")
    selector, encoder = rebuild(changed)
    assert not selector.from_cache and "unreadable" in caplog.text


def test_unknown_mode_suggests_nearest():
    with pytest.raises(ValueError, match=r"unknown demo selection 'rice'.*did you mean 'rices'"):
        make_selector("rice", make_pool(2, seed=0))


def test_random_and_episodic_draws_unchanged():
    # Ids drawn by the selector before RICES was added (same pool, same "{seed}-{k}" rng strings).
    pool = [Example(id=f"p{i}", image=torch.zeros(1), question="q", answers=[f"a{i % 3}"], task="t",
                    group=f"e{i % 2}") for i in range(12)]
    query = Example(id="q", image=torch.zeros(1), question="q", answers=["a0"], task="t", group="e1")
    before = {False: [["p3"], ["p3", "p11", "p9", "p5"], ["p3"], ["p4", "p1", "p9", "p0"]],
              True: [["p9"], ["p3", "p9", "p7", "p5"], ["p3"], ["p7", "p3", "p11", "p1"]]}
    for episodic, expected in before.items():
        for selector in (DemoSelector(pool, episodic=episodic), make_selector("random", pool, episodic=episodic)):
            selector.prepare([query])  # a no-op that must not touch any rng
            got = [[d.id for d in selector.select(random.Random(f"{seed}-{k}"), query, k)]
                   for seed in (0, 1) for k in (1, 4)]
            assert got == expected
    assert make_selector("episodic", pool).episodic
    with pytest.raises(ValueError, match="needs pool examples with an 'episode'"):
        make_selector("episodic", make_pool(3, seed=0))


def test_rices_refused_on_episodic_task_and_needs_raw_images(clip_name):
    with pytest.raises(ValueError, match="not supported on an episodic task"):
        make_selector("rices", make_pool(3, seed=0), episodic=True, clip=load(clip_name))
    bare = [Example(id="x", image=torch.zeros(1), question="", answers=["a"], task="t")]
    with pytest.raises(ValueError, match="Example.image_bytes"):
        make_selector("rices", bare, clip=load(clip_name), progress=False)


def test_missing_weights_error_says_how_to_get_them(tmp_path):
    with pytest.raises(RuntimeError, match=r"RICES needs pretrained CLIP weights.*create_model_and_transforms"):
        ClipEncoder.from_open_clip("ViT-B-32", pretrained=str(tmp_path / "missing.pt"), device="cpu")


def test_rices_through_the_eval_runner_caches_pool_features(clip_name, tmp_path, tiny_backbone, tiny_backbone_dir,
                                                            monkeypatch):
    """A whole `run_eval` with eval.selection=rices (the tiny CLIP as a local-dir: model): results.json records
    the selection, the pool's features are written to the cache on the first run and only read on the second."""
    from mmict.config import load_config
    from mmict.eval.runner import run_eval
    from mmict.methods.base import FrozenBackboneModule
    from mmict.toy.world import write_toy_world

    write_toy_world(tmp_path / "toy", num_docs=0, val_docs=0, vqa_train=8, vqa_test=3, binding_episodes=0,
                    image_size=16)
    cache_dir = tmp_path / "rices_cache"
    cfg = load_config("toy_aim", [
        f"run_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'toy'}",
        f"backbone.name_or_path={tiny_backbone_dir}", "backbone.toy=null", "eval.task=toy_vqa",
        "eval.shots=[0,2]", "eval.seeds=[0,1]", "eval.num_queries=3", "eval.demo_modes=[images]",
        "eval.max_new_tokens=2", "eval.selection=rices", f"eval.rices.model={clip_name}", "eval.rices.pretrained=null",
        "eval.rices.device=cpu", "eval.rices.batch_size=8", f"eval.rices.cache_dir={cache_dir}", "logger.wandb=false",
    ])
    encoded: list[int] = []  # images per encode_examples call, over both runs
    selected: list[tuple[str, list[str]]] = []
    encode, select = ClipEncoder.encode_examples, RICESSelector.select

    def counting_encode(self, examples, *args, **kwargs):
        encoded.append(len(examples))
        return encode(self, examples, *args, **kwargs)

    def recording_select(self, rng, query, k):
        demos = select(self, rng, query, k)
        if k:
            selected.append((query.id, [d.id for d in demos]))
        return demos

    monkeypatch.setattr(ClipEncoder, "encode_examples", counting_encode)
    monkeypatch.setattr(RICESSelector, "select", recording_select)
    module = FrozenBackboneModule(cfg, backbone=tiny_backbone)

    run_eval(module, cfg, tmp_path / "eval")
    assert encoded == [8, 3]  # the pool, then the queries
    (cache_file,) = cache_dir.iterdir()
    assert cache_file.name.startswith("rices-toy_vqa-train-")
    stamp = cache_file.stat().st_mtime_ns
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["selection"] == "rices" and results["rices"]["model"] == clip_name
    assert results["rices"]["cache_dir"] == str(cache_dir)
    # RICES picked every k-shot trial's demos: 3 queries x 2 seeds at k=2, the same
    # demos for both seeds (RICES is deterministic), so both seeds score alike.
    assert len(selected) == 6 and selected[:3] == selected[3:] and all(len(ids) == 2 for _, ids in selected)
    two_shot = [t for t in results["trials"] if t["shots"] == 2]
    assert two_shot[0]["predictions"] == two_shot[1]["predictions"]

    encoded.clear()
    run_eval(module, cfg, tmp_path / "eval")
    assert encoded == [3]  # only the queries: the pool's features come from the cache, untouched
    assert list(cache_dir.iterdir()) == [cache_file] and cache_file.stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "eval" / "results-1.json").read_text())  # the first report is kept
    def numbers(rows):  # the rows without the time per query (a timing: it varies run to run)
        return [{k: v for k, v in row.items() if k != "ms_per_query"} for row in rows]

    assert numbers(again["summary"]) == numbers(results["summary"])
