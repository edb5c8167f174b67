"""The toy backbone: built once and cached, rebuilt on a changed recipe, pretraining learns."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from data_modules.toy_world import write_toy_world
from mmict.backbones import load_backbone
from mmict.backbones.toy import MARKER, ensure_toy_backbone
from tests.conftest import TINY_TOY


def test_cached_and_rebuilt_on_recipe_change(tmp_path, caplog):
    path = tmp_path / "bb"
    ensure_toy_backbone(path, SimpleNamespace(**TINY_TOY))
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    ensure_toy_backbone(path, SimpleNamespace(**TINY_TOY))
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    ensure_toy_backbone(path, SimpleNamespace(**{**TINY_TOY, "seed": 1}))
    assert "rebuilding" in caplog.text
    assert json.loads((path / MARKER).read_text())["fields"]["seed"] == 1


def test_refuses_to_overwrite_a_folder_that_is_not_a_toy_backbone(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weights.bin").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ensure_toy_backbone(tmp_path / "mine", SimpleNamespace(**TINY_TOY))


@pytest.mark.slow
def test_pretraining_lowers_loss_and_changes_weights(tmp_path):
    data = tmp_path / "toy"
    write_toy_world(data, num_docs=120, val_docs=8, vqa_train=8, vqa_test=8, image_size=16)
    cfg = SimpleNamespace(**TINY_TOY, pretrain_steps=80, pretrain_batch_size=8, pretrain_lr=3e-3,
                          pretrain_data=str(data))
    path = ensure_toy_backbone(tmp_path / "bb", cfg)
    recipe = json.loads((path / MARKER).read_text())
    assert recipe["pretrain_loss"]["last"] < 0.75 * recipe["pretrain_loss"]["first"]
    random_init = load_backbone("llava", str(ensure_toy_backbone(tmp_path / "rand", SimpleNamespace(**TINY_TOY))))
    trained = load_backbone("llava", str(path))
    assert not torch.equal(trained.model.lm_head.weight, random_init.model.lm_head.weight)
    assert not any(p.requires_grad for p in trained.parameters())  # loaded frozen again
