"""The demonstration bank: same fused tokens as reading, each demo read once, lazy, keyed, checked on load."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import tiny_aim_cfg
from PIL import Image as PILImage
from tiny_models.numerics import assert_fp32_close

from data_modules.downstream import Example
from mmict.backbones import ImageTransform
from mmict.bank import DemoBank, backbone_fingerprint
from mmict.bank_files import unwritable
from mmict.batch import EpisodeBatch
from mmict.config import ConfigError
from mmict.eval.loop import evaluate
from mmict.eval.runner import attach_bank
from mmict.methods.aim.module import AIMModule
from mmict.segments import Image, Text


@pytest.fixture()
def module(tiny_backbone_dir):
    return AIMModule(tiny_aim_cfg(tiny_backbone_dir)).eval()


COLORS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (200, 200, 20)]
TEXTS = ["a red circle on the left .", "Question: what color is the shape? Short answer: green", "a blue square .",
         "Question: what shape is it? Short answer: circle"]


def demos(backbone, n: int = 3):
    images = [backbone.image_transform(PILImage.new("RGB", (16, 16), c)) for c in COLORS[:n]]
    return [f"demo-{i}" for i in range(n)], images, TEXTS[:n]


def count_reads(module, monkeypatch) -> list[int]:
    """Demos read by the frozen backbone from now on (one entry per reader call: how many demos)."""
    calls: list[int] = []
    read = module.reader.read

    def counting(images, texts):
        calls.append(len(texts))
        return read(images, texts)

    monkeypatch.setattr(module.reader, "read", counting)
    return calls


def shard_files(bank: DemoBank):
    return sorted(bank.path.glob("shard-*.safetensors"))


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        # the bank reads demos in batches of other make-up (other padding, other matmul shapes) than the
        # reference reading: equal up to fp32 reordering noise (tiny_models/numerics.py)
        assert_fp32_close(x, y)


def test_bank_gives_the_fused_tokens_of_reading_and_reads_each_demo_once(module, tmp_path, monkeypatch):
    ids, images, texts = demos(module.backbone)
    with torch.no_grad():
        expected = module.fuse(images, texts)
    bank = module.attach_bank(tmp_path / "bank", progress=False)
    reads = count_reads(module, monkeypatch)
    with torch.no_grad():
        assert_same(module.fuse(images, texts, demo_ids=ids), expected)
        assert_same(module.fuse(images[::-1], texts[::-1], demo_ids=ids[::-1]), expected[::-1])  # lookups by id
        # through batch_prompts, as evaluation calls it: the batch's demo_ids reach the bank
        batch = EpisodeBatch(demo_ids=ids[:2], demo_images=images[:2], demo_texts=texts[:2], demo_counts=[2],
                             query_images=[images[2]], query_prompts=["a"], query_targets=["b"])
        prompts = module.batch_prompts(batch, demo_mode="fused", with_target=False)
    assert sum(reads) == 3 and bank.stats["computed"] == 3 and bank.stats["hits"] >= 5
    assert_fp32_close(prompts[0][0].embeds, expected[0])
    assert len(bank) == 3 and len(shard_files(bank)) == 1


def test_bank_is_lazy_and_persists_across_instances(module, tmp_path, monkeypatch):
    ids, images, texts = demos(module.backbone)
    first = module.attach_bank(tmp_path, progress=False)
    assert first.build(ids, images, texts) == 3
    assert first.build(ids, images, texts) == 0  # already there
    expected = [first.lookup([i], [im], [t])[0] for i, im, t in zip(ids, images, texts)]
    fresh = module.attach_bank(tmp_path, progress=False)
    assert fresh._entries is None  # nothing read before the first lookup
    reads = count_reads(module, monkeypatch)
    assert_same(fresh.lookup(ids, images, texts), expected)
    assert reads == [] and fresh.stats["loaded"] == 3 and fresh.stats["computed"] == 0


def test_a_changed_demo_is_stale_and_recomputed(module, tmp_path, caplog):
    ids, images, texts = demos(module.backbone)
    module.attach_bank(tmp_path, progress=False).build(ids, images, texts)
    changed = [texts[0] + " Question: what shape is it?"] + texts[1:]
    fresh = module.attach_bank(tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        got = fresh.lookup(ids, images, changed)
    assert "stale" in caplog.text and "demo-0" in caplog.text
    assert fresh.stats["computed"] == 1 and fresh.stats["loaded"] == 2
    with torch.no_grad():
        assert_same(got, module.reader.read(images, changed))
    # a changed image is stale too
    other = module.backbone.image_transform(PILImage.new("RGB", (16, 16), (0, 0, 0)))
    assert fresh.lookup([ids[1]], [other], [changed[1]]) and fresh.stats["computed"] == 2
    # the recomputed entries replaced the old ones on disk
    again = module.attach_bank(tmp_path, progress=False)
    again.lookup(ids, [images[0], other, images[2]], changed)
    assert again.stats["computed"] == 0 and again.stats["loaded"] == 3


def test_a_corrupt_shard_is_detected_named_and_rebuilt(module, tmp_path, caplog):
    ids, images, texts = demos(module.backbone)
    bank = module.attach_bank(tmp_path, progress=False)
    bank.build(ids, images, texts)
    expected = bank.lookup(ids, images, texts)
    (shard,) = shard_files(bank)
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # flip bits in the last tensor's bytes (header intact)
    shard.write_bytes(bytes(data))
    fresh = module.attach_bank(tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        assert_same(fresh.lookup(ids, images, texts), expected)
    assert shard.name in caplog.text and "checksum" in caplog.text
    assert fresh.stats["corrupt"] == 1 and fresh.stats["computed"] == 1
    clean = module.attach_bank(tmp_path, progress=False)
    assert_same(clean.lookup(ids, images, texts), expected)
    assert clean.stats["corrupt"] == 0 and clean.stats["computed"] == 0


def test_a_truncated_shard_and_a_broken_index_are_rebuilt(module, tmp_path, caplog):
    ids, images, texts = demos(module.backbone)
    bank = module.attach_bank(tmp_path, progress=False)
    bank.build(ids, images, texts)
    expected = bank.lookup(ids, images, texts)
    (shard,) = shard_files(bank)
    shard.write_bytes(shard.read_bytes()[:40])
    fresh = module.attach_bank(tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        assert_same(fresh.lookup(ids, images, texts), expected)
    assert shard.name in caplog.text and "unreadable" in caplog.text and fresh.stats["computed"] == 3
    assert not shard.exists()  # superseded by the rebuilt shard
    caplog.clear()
    (bank.path / "index.json").write_text("{not json")
    fresh = module.attach_bank(tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        assert_same(fresh.lookup(ids, images, texts), expected)
    assert "index.json" in caplog.text and fresh.stats["computed"] == 3


def test_an_index_written_for_another_key_is_not_used(module, tmp_path, caplog):
    ids, images, texts = demos(module.backbone)
    bank = module.attach_bank(tmp_path, progress=False)
    bank.build(ids, images, texts)
    index_path = bank.path / "index.json"
    index = json.loads(index_path.read_text())
    index["key"]["layer"] = 0  # e.g. copied over from another configuration
    index_path.write_text(json.dumps(index))
    fresh = module.attach_bank(tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        fresh.lookup(ids, images, texts)
    assert "another key" in caplog.text and "layer" in caplog.text and fresh.stats["computed"] == 3


def test_key_parts_keep_banks_apart(tiny_backbone_dir, tmp_path):
    final = AIMModule(tiny_aim_cfg(tiny_backbone_dir))
    first_layer = AIMModule(tiny_aim_cfg(tiny_backbone_dir, "method.aim.layer=1"), backbone=final.backbone)
    hidden, other_layer = final.attach_bank(tmp_path), first_layer.attach_bank(tmp_path)
    assert hidden.path != other_layer.path
    fused = final.attach_bank(tmp_path, store="fused")
    assert fused.path != hidden.path
    before_fused, before_hidden = fused.path, hidden.path
    with torch.no_grad():  # a projector update (an optimizer step, a loaded checkpoint) is another key
        final.projector.net.weight.add_(1.0)
    assert fused.path != before_fused and hidden.path == before_hidden  # hidden states do not involve it
    fingerprint = backbone_fingerprint(final.backbone)
    with torch.no_grad():
        final.backbone.model.get_input_embeddings().weight[0, 0] += 1.0
    assert backbone_fingerprint(final.backbone) != fingerprint  # another backbone's weights: another key


def test_stored_fused_tokens_are_bypassed_while_the_projector_trains(module, tmp_path):
    ids, images, texts = demos(module.backbone)
    bank = module.attach_bank(tmp_path, store="fused", progress=False)
    with torch.no_grad():
        stored = module.fuse(images, texts, demo_ids=ids)
    assert bank.stats["computed"] == 3 and all(t.grad_fn is None for t in stored)
    trained = module.fuse(images, texts, demo_ids=ids)  # grad enabled: the projector must get gradients
    assert all(t.grad_fn is not None for t in trained) and bank.stats["hits"] == 0
    assert_same([t.detach() for t in trained], stored)
    hidden_bank = module.attach_bank(tmp_path, store="hidden", progress=False)
    trained = module.fuse(images, texts, demo_ids=ids)  # stored hidden states are fine: projection after
    assert all(t.grad_fn is not None for t in trained) and hidden_bank.stats["computed"] == 3


def _examples(backbone, n: int, split: str) -> list[Example]:
    colors = [(220, 20, 20), (20, 200, 20), (20, 20, 220)]
    names = ["red", "green", "blue"]
    return [Example(id=f"{split}-{i}", image=backbone.image_transform(PILImage.new("RGB", (16, 16), colors[i % 3])),
                    question="what color is the shape?", answers=[names[i % 3]], task="toy_vqa")
            for i in range(n)]


def test_evaluation_with_the_bank_answers_the_same_and_reads_each_demo_once(module, tmp_path, monkeypatch):
    pool, queries = _examples(module.backbone, 6, "train"), _examples(module.backbone, 5, "test")
    kwargs = dict(shots=[0, 2, 3], seeds=[0, 1], demo_modes=["fused", "images"], task="toy_vqa", batch_size=2,
                  progress=False)
    plain = evaluate(module, queries, pool, **kwargs)
    bank = module.attach_bank(tmp_path, progress=False)
    reads = count_reads(module, monkeypatch)
    banked = evaluate(module, queries, pool, **kwargs)
    assert [r.predictions for r in banked] == [r.predictions for r in plain]
    assert [r.context_tokens for r in banked] == [r.context_tokens for r in plain]
    used = {d for d in bank._mem}
    assert bank.stats["computed"] == len(used) == sum(reads) <= len(pool)  # every demo read once, up front
    assert len(reads) == 1  # in one build (batch_size 16 >= the pool)
    again = module.attach_bank(tmp_path, progress=False)
    evaluate(module, queries, pool, **kwargs)
    assert again.stats["computed"] == 0 and again.stats["loaded"] == len(used)


class CountingTransform(ImageTransform):
    calls = 0

    def __call__(self, image):
        CountingTransform.calls += 1
        return super().__call__(image)


def _encoded_examples(backbone, n: int) -> list[Example]:
    """Pool examples as loaded from shards: encoded bytes, decoded (and counted) on every access of .image."""
    transform = CountingTransform(backbone.image_processor)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        PILImage.new("RGB", (16, 16), COLORS[i % 4]).save(buf, format="PNG")
        out.append(Example(id=f"train-{i}", image=None, question="what color is the shape?",
                           answers=[["red", "green", "blue", "yellow"][i % 4]], task="toy_vqa",
                           image_bytes=buf.getvalue(), transform=transform))
    return out


def test_banked_demos_are_known_by_their_encoded_bytes_and_never_decoded_again(module, tmp_path):
    pool, queries = _encoded_examples(module.backbone, 6), _examples(module.backbone, 4, "test")
    kwargs = dict(shots=[2, 3], seeds=[0, 1], demo_modes=["fused"], task="toy_vqa", batch_size=2, progress=False)
    CountingTransform.calls = 0
    plain = evaluate(module, queries, pool, **kwargs)
    assert CountingTransform.calls > 6  # without a bank every shown demo is decoded and read again
    bank = module.attach_bank(tmp_path, progress=False)
    CountingTransform.calls = 0
    banked = evaluate(module, queries, pool, **kwargs)
    assert [r.predictions for r in banked] == [r.predictions for r in plain]
    assert CountingTransform.calls == bank.stats["computed"] <= 6  # each demo decoded once, to be read once
    module.attach_bank(tmp_path, progress=False)
    CountingTransform.calls = 0
    evaluate(module, queries, pool, **kwargs)
    assert CountingTransform.calls == 0  # a fresh bank on disk: the encoded bytes identify every demo
    # new bytes under the same id: stale, recomputed (and decoded for that)
    buf = io.BytesIO()
    PILImage.new("RGB", (16, 16), (0, 0, 0)).save(buf, format="PNG")
    for ex in pool:
        ex.image_bytes = buf.getvalue()
    again = module.attach_bank(tmp_path, progress=False)
    evaluate(module, queries, pool, **kwargs)
    assert again.stats["stale"] > 0 and again.stats["computed"] == again.stats["stale"] == CountingTransform.calls


def test_generation_is_batched_left_padded_and_uses_the_kv_cache(module):
    bb = module.backbone
    ids, images, texts = demos(bb)
    seen: list[tuple[int, int]] = []

    def record(_, args, kwargs):
        seen.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    handle = bb.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prompts = [[Image(images[0]), *[Text(t + " ") for t in ts], Text("what color ?")]
                   for ts in ([], texts[:1], texts)]
        assembled = bb.assemble(prompts, padding_side="left")
        out = bb.generate_from(assembled, max_new_tokens=4, min_new_tokens=4)
    finally:
        handle.remove()
    assert len(out) == 3
    assert seen[0] == (3, assembled.inputs_embeds.shape[1])  # one prefill for the whole padded batch
    assert seen[1:] == [(3, 1)] * 3  # then one new position per step: the KV cache holds the rest


def test_bank_config(tiny_backbone_dir, tmp_path):
    with pytest.raises(ConfigError, match="eval.bank.store"):
        tiny_aim_cfg(tiny_backbone_dir, "eval.bank.store=fusd")
    cfg = tiny_aim_cfg(tiny_backbone_dir, f"data.root={tmp_path}")
    module = AIMModule(cfg)
    bank = attach_bank(module, cfg)
    assert bank is module.bank and str(bank.path).startswith(str(tmp_path / "bank" / f"{cfg.eval.task}-train"))
    cfg.eval.bank.enabled = False
    module.bank = None
    assert attach_bank(module, cfg) is None and module.bank is None
    cfg.eval.bank.enabled, cfg.eval.demo_modes = True, ["images"]
    assert attach_bank(module, cfg) is None  # no fused demos shown: nothing to bank


@contextlib.contextmanager
def read_only(folder):
    """`folder` made unwritable for real: chmod for a user, `chattr +i` for root (whom chmod does not stop)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = [lambda: folder.chmod(0o755)]
    elif shutil.which("chattr") and not subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        undo = [lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)]
    else:
        pytest.skip("cannot make a folder read-only here (root without chattr +i)")
    try:
        if unwritable(folder) is None:
            pytest.skip(f"{folder} is still writable")
        yield folder
    finally:
        undo[0]()


def test_a_read_only_bank_reads_what_it_holds_computes_the_rest_in_memory_and_warns_once(module, tmp_path,
                                                                                          monkeypatch, caplog):
    ids, images, texts = demos(module.backbone, 4)
    first = module.attach_bank(tmp_path, progress=False)
    first.build(ids[:2], images[:2], texts[:2])
    folder = first.path
    (folder / "shard-orphan.safetensors").write_bytes(b"left behind")  # reported, not removed: read-only
    before = sorted(p.name for p in folder.iterdir())
    with torch.no_grad():
        expected = module.reader.read(images, texts)
    with read_only(folder):
        fresh = module.attach_bank(tmp_path, progress=False)
        reads = count_reads(module, monkeypatch)
        with caplog.at_level(logging.WARNING, logger="mmict.bank"):
            assert fresh.build(ids, images, texts) == 2  # no crash: the two it lacks are computed
            assert_same(fresh.lookup(ids, images, texts), expected)
            fresh.lookup(ids[2:], images[2:], texts[2:])  # held in memory: not computed again
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, nothing removed
    assert sum(reads) == 2 and fresh.stats["loaded"] == 2 and fresh.stats["computed"] == 2
    assert fresh.stats["cache"] == "read-only: not cached"
    warned = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warned) == 1 and str(folder) in warned[0] and "eval.bank.dir" in warned[0]
    assert "shard-orphan.safetensors" in caplog.text and "Not removed: the folder is read-only" in caplog.text


def test_an_evaluation_with_a_read_only_bank_answers_the_same(module, tmp_path):
    pool, queries = _examples(module.backbone, 6, "train"), _examples(module.backbone, 4, "test")
    kwargs = dict(shots=[2], seeds=[0], demo_modes=["fused"], task="toy_vqa", batch_size=2, progress=False)
    plain = evaluate(module, queries, pool, **kwargs)
    root = tmp_path / "bank"
    with read_only(root):  # not even the bank's folder can be made
        bank = module.attach_bank(root, progress=False)
        banked = evaluate(module, queries, pool, **kwargs)
        assert list(root.iterdir()) == []
    assert [r.predictions for r in banked] == [r.predictions for r in plain]
    assert bank.stats["computed"] > 0 and bank.stats["cache"] == "read-only: not cached"


def test_a_write_that_fails_turns_caching_off_and_leaves_nothing_behind(module, tmp_path, monkeypatch, caplog):
    import safetensors.torch
    from safetensors import SafetensorError

    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        Path(path).write_bytes(b"half")  # as an interrupted write leaves it
        raise SafetensorError("Error while serializing: I/O error: Operation not permitted (os error 1)")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    ids, images, texts = demos(module.backbone, 4)
    bank = module.attach_bank(tmp_path, progress=False)
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        assert bank.build(ids[:2], images[:2], texts[:2]) == 2
        assert bank.build(ids, images, texts) == 2  # the next demos are computed, not written
    with torch.no_grad():
        assert_same(bank.lookup(ids, images, texts), module.reader.read(images, texts))
    assert len(calls) == 1 and bank.stats["cache"] == "read-only: not cached"
    assert "Operation not permitted" in caplog.text and str(bank.path) in caplog.text
    assert sorted(p.name for p in bank.path.iterdir()) == [".lock"]  # no half shard, no index


def test_files_no_index_refers_to_are_removed_when_the_bank_opens(module, tmp_path, monkeypatch, caplog):
    ids, images, texts = demos(module.backbone)
    bank = module.attach_bank(tmp_path, progress=False)
    bank.build(ids, images, texts)
    (shard,) = shard_files(bank)
    (bank.path / "index.json").unlink()  # as a user resetting the bank would
    leftovers = [bank.path / ".tmpab12cd", bank.path / f".{shard.name}.tmp123", bank.path / ".index.json.tmp123"]
    for path in leftovers:
        path.write_bytes(b"interrupted")
    (bank.path / "notes.txt").write_text("not the bank's: kept")
    fresh = module.attach_bank(tmp_path, progress=False)
    reads = count_reads(module, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        fresh.lookup(ids, images, texts)
    assert "removed 4 files no index entry refers to" in caplog.text and shard.name in caplog.text
    assert not shard.exists() and not any(p.exists() for p in leftovers)
    assert (bank.path / "notes.txt").exists()
    assert sum(reads) == 3 and len(shard_files(fresh)) == 1 and len(fresh) == 3  # rebuilt, indexed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmict.bank"):
        module.attach_bank(tmp_path, progress=False).lookup(ids, images, texts)
    assert "no index entry" not in caplog.text  # a sound bank: nothing to say
