"""Evaluation's vision-feature cache (mmict/backbones/vision_cache.py): counted hits and misses, a bounded LRU,
the same predictions with it on and off, keys that follow the weights, dtype and pixels, and a disk copy that is
checked before it is trusted."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from PIL import Image as PILImage
from tiny_models import save_tiny

from data_modules.downstream import Example
from mmict.backbones import load_backbone
from mmict.backbones.vision_cache import VisionCache, attach_vision_cache, pixels_hash, vision_cache, vision_key
from mmict.segments import Image, Text

LOGGER = "mmict.backbones.vision_cache"


def colored(bb, i: int, size: tuple[int, int] = (16, 16)):
    r = random.Random(i)
    return bb.image_transform(PILImage.new("RGB", size, tuple(r.randrange(256) for _ in range(3))))


def prompts_of(images) -> list[list]:
    return [[Image(img), Text("this picture shows")] for img in images]  # one text: rows line up across batches


def count_encodes(bb, monkeypatch) -> list[int]:
    """Images per `embed_images` call from now on."""
    calls: list[int] = []
    encode = bb.embed_images

    def counting(images):
        calls.append(len(images))
        return encode(images)

    monkeypatch.setattr(bb, "embed_images", counting)
    return calls


@torch.no_grad()
def test_hits_misses_and_the_same_inputs_as_without(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    images = [colored(bb, i) for i in range(3)]
    plain = bb.assemble(prompts_of(images), padding_side="left").inputs_embeds
    calls = count_encodes(bb, monkeypatch)
    with vision_cache(bb) as cache:
        assert bb.vision_cache is cache
        first = bb.assemble(prompts_of(images), padding_side="left").inputs_embeds
        again = bb.assemble(prompts_of(images), padding_side="left").inputs_embeds
        # a new image and one seen before twice: only the new one is encoded
        mixed = bb.assemble(prompts_of([images[1], colored(bb, 7), images[1]]), padding_side="left")
        stats = cache.report()
    assert bb.vision_cache is None  # detached at the end of the block
    assert calls == [1, 1, 1, 1]  # each distinct image encoded once, alone
    assert stats["misses"] == 4 and stats["hits"] == 5 and stats["entries"] == 4
    assert stats["hit_rate"] == pytest.approx(5 / 9, abs=1e-4)
    # An entry is the image encoded alone, bit for bit, whatever batch it came in; the uncached batch of three
    # rounds differently in this tower (batched matmuls), by far less than a prediction could notice.
    assert torch.equal(again, first)
    for b, img in enumerate(images):
        assert torch.equal(first[b], bb.assemble(prompts_of([img]), padding_side="left").inputs_embeds[0])
    assert torch.equal(mixed.inputs_embeds[1], bb.assemble(prompts_of([colored(bb, 7)])).inputs_embeds[0])
    torch.testing.assert_close(first, plain, atol=1e-6, rtol=0)
    assert stats["mb"] == pytest.approx(4 * first.shape[-1] * bb.image_tokens_per_image * 4 / 2**20, abs=1e-3)


@torch.no_grad()
def test_least_recently_used_is_evicted_within_max_mb(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    entry_mb = bb.image_tokens_per_image * bb.hidden_size * 4 / 2**20  # float32 rows of one image
    images = [colored(bb, i) for i in range(3)]
    calls = count_encodes(bb, monkeypatch)
    with vision_cache(bb, max_mb=2.5 * entry_mb) as cache:  # two entries fit
        for img in (images[0], images[1], images[0], images[2]):  # the hit on 0 makes 1 the oldest
            bb.assemble(prompts_of([img]))
        assert cache.stats["evicted"] == 1 and cache.report()["entries"] == 2
        bb.assemble(prompts_of([images[0]]))  # still held
        assert calls == [1, 1, 1]
        bb.assemble(prompts_of([images[1]]))  # evicted: encoded again
        assert calls == [1, 1, 1, 1] and cache.stats["peak_mb"] <= 2.5 * entry_mb
    with vision_cache(bb, max_mb=0) as none_held:  # nothing held in memory (disk only, when a folder is given)
        bb.assemble(prompts_of([images[0]]))
        bb.assemble(prompts_of([images[0]]))
        assert none_held.stats["misses"] == 2 and none_held.report()["entries"] == 0


def test_never_used_under_gradients(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    calls = count_encodes(bb, monkeypatch)
    with vision_cache(bb) as cache:
        with torch.no_grad():
            bb.assemble(prompts_of([colored(bb, 0)]))
        bb.assemble(prompts_of([colored(bb, 0)]))  # grad enabled (training): encoded, not looked up
        assert cache.stats == {**cache.stats, "bypassed": 1, "misses": 1, "hits": 0} and calls == [1, 1]


def test_key_follows_the_vision_weights_dtype_and_pixels(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    key = vision_key(bb)
    with torch.no_grad():
        bb.language_model.layers[0].mlp.down_proj.weight.add_(1.0)  # the LM (where LoRA trains) is not involved
    assert vision_key(bb) == key
    with torch.no_grad():
        next(bb.model.model.vision_tower.parameters()).mul_(1.5)
    assert vision_key(bb)["weights"] != key["weights"]
    bb.image_processor.image_mean = [0.1, 0.2, 0.3]
    before = vision_key(bb)
    assert before["processor"] != key["processor"]
    bb.model.to(torch.bfloat16)
    changed = vision_key(bb)
    assert changed["dtype"] == "bfloat16" and changed["weights"] != before["weights"]
    image = colored(bb, 0)
    assert pixels_hash(image) == pixels_hash(image.clone())
    assert pixels_hash(image) != pixels_hash(image.to(torch.bfloat16))
    nudged = image.clone()
    nudged[0, 0, 0] += 1e-3
    assert pixels_hash(nudged) != pixels_hash(image)
    sizes = {"pixel_values": image, "image_sizes": torch.tensor([16, 16])}
    assert pixels_hash(sizes) != pixels_hash({**sizes, "image_sizes": torch.tensor([16, 32])})  # another view


@torch.no_grad()
def test_a_weight_written_in_place_drops_what_memory_holds(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    image = colored(bb, 0)
    calls = count_encodes(bb, monkeypatch)
    with vision_cache(bb) as cache:
        bb.assemble(prompts_of([image]))
        bb.model.model.multi_modal_projector.linear_2.bias.add_(0.5)
        after = bb.assemble(prompts_of([image])).inputs_embeds
        assert calls == [1, 1] and cache.stats["stale"] == 1
    assert torch.equal(after, bb.assemble(prompts_of([image])).inputs_embeds)


def _eval_examples(bb, n: int, split: str) -> list[Example]:
    names = ["red", "green", "blue"]
    return [Example(id=f"{split}-{i}", image=colored(bb, hash((split, i)) % 1000), question="what color is it?",
                    answers=[names[i % 3]], task="toy_vqa") for i in range(n)]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vanilla_icl_predictions_are_the_same_with_the_cache_on_and_off(family, tiny_backbone_dir, tmp_path):
    from helpers import tiny_aim_cfg

    from mmict.eval.loop import evaluate
    from mmict.methods.base import FrozenBackboneModule

    path = tiny_backbone_dir if family == "llava" else save_tiny(family, tmp_path / family)
    bb = load_backbone(family, str(path))  # llava: the toy backbone; qwen2_vl: the tiny one
    module = FrozenBackboneModule(tiny_aim_cfg(tiny_backbone_dir), backbone=bb).eval()
    pool, queries = _eval_examples(bb, 4, "train"), _eval_examples(bb, 3, "test")
    kwargs = dict(shots=[0, 2], seeds=[0, 1], demo_modes=["images"], task="toy_vqa", batch_size=3,
                  max_new_tokens=2, progress=False)
    off = evaluate(module, queries, pool, **kwargs)
    with vision_cache(bb) as cache:
        on = evaluate(module, queries, pool, **kwargs)
    assert [r.predictions for r in on] == [r.predictions for r in off]
    assert [r.context_tokens for r in on] == [r.context_tokens for r in off]
    # every distinct image encoded once; every later showing (other seeds, shot counts) a hit
    assert cache.stats["misses"] <= len(pool) + len(queries) < cache.stats["hits"]


@torch.no_grad()
def test_disk_copy_is_reused_checked_and_recomputed_when_corrupt(tiny_backbone, tmp_path, monkeypatch, caplog):
    bb = tiny_backbone
    images = [colored(bb, i) for i in range(3)]
    with vision_cache(bb, folder=tmp_path) as first:
        written = bb.assemble(prompts_of(images)).inputs_embeds
    folder = tmp_path / first.report()["dir"].rsplit("/", 1)[-1]
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 3 and json.loads((folder / "key.json").read_text()) == vision_key(bb)
    calls = count_encodes(bb, monkeypatch)
    with vision_cache(bb, folder=tmp_path) as second:  # a fresh cache: memory empty, disk warm
        assert torch.equal(bb.assemble(prompts_of(images)).inputs_embeds, written)
        assert second.stats["loaded"] == 3 and second.stats["misses"] == 0 and calls == []
    files[1].write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger=LOGGER), vision_cache(bb, folder=tmp_path) as third:
        assert torch.equal(bb.assemble(prompts_of(images)).inputs_embeds, written)
    assert third.stats["corrupt"] == 1 and third.stats["loaded"] == 2 and calls == [1]
    assert "recomputing it" in caplog.text and files[1].name in caplog.text
    assert files[1].stat().st_size > 100  # rewritten
    # A key file that does not match its folder (hand-edited, or a hash collision): its entries are never used.
    (folder / "key.json").write_text(json.dumps({**vision_key(bb), "weights": "other"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER), vision_cache(bb, folder=tmp_path) as fourth:
        bb.assemble(prompts_of(images))
    assert fourth.stats["loaded"] == 0 and fourth.stats["misses"] == 3 and "changed: weights" in caplog.text
    # A folder that cannot be made: one warning, the cache stays in memory.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER), vision_cache(bb, folder=blocker) as fifth:
        bb.assemble(prompts_of(images[:1]))
        bb.assemble(prompts_of(images[:1]))
    assert fifth.read_only and fifth.stats["hits"] == 1 and "cannot be written" in caplog.text


def test_attach_follows_the_settings_and_refuses_a_negative_limit(tiny_backbone):
    bb = tiny_backbone
    assert attach_vision_cache(bb, {"enabled": False, "max_mb": 10, "dir": None}) is None and bb.vision_cache is None
    cache = attach_vision_cache(bb, {"enabled": True, "max_mb": 10, "dir": None})
    assert bb.vision_cache is cache and cache.max_bytes == 10 * 2**20
    replaced = attach_vision_cache(bb, {"enabled": True, "max_mb": 5})  # an evaluation that never closed its own
    assert bb.vision_cache is replaced and replaced is not cache
    assert replaced.close()["max_mb"] == 5 and bb.vision_cache is None
    with pytest.raises(ValueError, match="max_mb=-1.0: must be >= 0"):
        VisionCache(bb, max_mb=-1.0)


def test_config_key_is_range_checked(tiny_backbone_dir):
    from helpers import tiny_aim_cfg

    from mmict.config import ConfigError

    cfg = tiny_aim_cfg(tiny_backbone_dir)
    assert cfg.eval.vision_cache.enabled and cfg.eval.vision_cache.max_mb == 1024 and cfg.eval.vision_cache.dir is None
    with pytest.raises(ConfigError, match=r"eval.vision_cache.max_mb.*must be >= 0"):
        tiny_aim_cfg(tiny_backbone_dir, "eval.vision_cache.max_mb=-1")


def test_run_eval_records_the_cache_and_detaches_it(tiny_backbone, tiny_backbone_dir, tmp_path):
    """`run_eval` turns the cache on for the evaluation (eval.vision_cache) and writes its counts to results.json."""
    from helpers import tiny_aim_cfg

    from mmict.eval.runner import run_eval
    from mmict.methods.base import FrozenBackboneModule
    from mmict.toy.world import write_toy_world

    write_toy_world(tmp_path / "toy", num_docs=0, val_docs=0, vqa_train=6, vqa_test=3, binding_episodes=0,
                    concept_episodes=0, concept_tuning_episodes=0, concept_tuning_val_episodes=0, image_size=16)
    cfg = tiny_aim_cfg(tiny_backbone_dir, f"run_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'toy'}",
                       "eval.task=toy_vqa", "eval.shots=[0,2]", "eval.seeds=[0,1]", "eval.num_queries=3",
                       "eval.demo_modes=[images]", "eval.max_new_tokens=2", "eval.vision_cache.max_mb=64",
                       "logger.wandb=false")
    run_eval(FrozenBackboneModule(cfg, backbone=tiny_backbone), cfg, tmp_path / "eval")
    recorded = json.loads((tmp_path / "eval" / "results.json").read_text())["vision_cache"]
    assert recorded["max_mb"] == 64 and recorded["dir"] is None and recorded["bypassed"] == 0
    assert 0 < recorded["misses"] <= 6 + 3 < recorded["hits"] and recorded["peak_mb"] > 0
    assert tiny_backbone.vision_cache is None
