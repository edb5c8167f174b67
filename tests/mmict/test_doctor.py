"""`mmict doctor`: the adapter against the HF model on its own processor for every tiny family, and the whole
verdict on the toy experiment (every item ok), and a broken adapter is caught."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_MODULES, save_tiny
from tiny_models.common import test_image as make_image

from mmict.backbones import load_backbone
from mmict.doctor import adapter_parity

FAMILY = {"blip2_t5": "blip2"}


@pytest.mark.parametrize("variant", sorted(FAMILY_MODULES))
def test_adapter_parity_holds_on_every_tiny_family(tmp_path, variant):
    path = save_tiny(variant, tmp_path / "model", tokenizer="real")
    backbone = load_backbone(FAMILY.get(variant, variant), str(path))
    checks = adapter_parity(backbone, make_image())
    assert checks and all(c.ok for c in checks), [c.line() for c in checks]
    assert all("greedy equal" in c.detail for c in checks)


def test_a_broken_adapter_is_caught(tmp_path, monkeypatch):
    path = save_tiny("llava", tmp_path / "model", tokenizer="real")
    backbone = load_backbone("llava", str(path))
    embed = backbone.embed_images
    monkeypatch.setattr(backbone, "embed_images", lambda images: [e.flip(0) for e in embed(images)])
    checks = adapter_parity(backbone, make_image())
    assert not all(c.ok for c in checks)


def test_doctor_gives_a_verdict_per_item_on_the_toy_experiment(tiny_backbone_dir, tmp_path, capsys):
    from mmict.doctor import main

    code = main(["toy_aim", f"backbone.name_or_path={tiny_backbone_dir}", "backbone.toy=null",
                 f"data.root={tmp_path / 'toy'}", "data.toy.num_docs=20", "data.toy.val_docs=4",
                 "data.toy.vqa_train=8", "data.toy.vqa_test=4", "data.toy.binding_episodes=4",
                 "data.toy.image_size=16", "eval.shots=[0,2]", "eval.companions=[]"])
    out = capsys.readouterr().out
    for item in ("training shards", "eval shards: toy_binding test", "backbone loads", "adapter vs HF model",
                 "context: vanilla ICL (images+text) at 2 shots", "memory per evaluation batch", "end to end"):
        assert item in out, item
    assert code == 0 and "verdict: ready" in out, out
    assert not (tmp_path / "runs").exists()  # nothing written to the run folders
    assert torch.get_num_threads() > 0
