"""Checkpoints written before the code was re-filed (issue 19) still load, evaluate and resume.

`tests/fixtures/pre_refactor/<exp>/step000002.ckpt` are real checkpoints of `toy_aim` (the paper's AIM settings)
and `toy_mmict`, written at step 2 of 4 by the code as it stood at commit 2343e56 on the session-wide tiny toy
backbone (`conftest.TINY_TOY`), with the run's `config.yaml` (see tests/fixtures/README.md). Lightning restores a
callback's or data module's state by its class name, and the modules' weights by their parameter names, so
those are what the moves had to keep.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES as FIXTURE_ROOT

from mmict.config import config_from_dict, load_config
from mmict.methods import METHODS
from mmict.train import build_datamodule, build_trainer, train

FIXTURES = FIXTURE_ROOT / "pre_refactor"
EXPERIMENTS = ("toy_aim", "toy_mmict")
# Words the toy language gained after the fixtures were written (issue 23's concept task): the fixtures' tiny backbone
# is today's without them (an MMICT checkpoint holds an M-Hub word table of the LLM tokenizer's size).
LATER_WORDS = {"does", "fit", "yes"}


@pytest.fixture(scope="module")
def tiny_backbone_dir(tmp_path_factory):
    """The tiny toy backbone (`TINY_TOY`) in the toy language the fixtures were written in."""
    from types import SimpleNamespace

    from helpers import TINY_TOY
    from transformers import LlavaProcessor

    from mmict.toy.backbone import build_toy_llava, toy_language

    words, pieces = toy_language()
    model, tokenizer, image_processor = build_toy_llava(SimpleNamespace(**TINY_TOY),
                                                        [w for w in words if w not in LATER_WORDS], pieces)
    state = torch.load(FIXTURES / "toy_mmict" / "step000002.ckpt", map_location="cpu", weights_only=False)
    rows = state["state_dict"]["hub.qformer.embeddings.word_embeddings.weight"].shape[0]
    assert rows == len(tokenizer), (rows, len(tokenizer))  # the fixtures' vocabulary, exactly
    path = tmp_path_factory.mktemp("pre_concept") / "model"
    model.save_pretrained(path)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_TOY["patch_size"],
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)
    return path


def fixture_config(exp: str, tmp_path: Path, backbone: Path, *extra: str):
    return load_config(FIXTURES / exp / "config.yaml", [
        f"backbone.name_or_path={backbone}", f"data.root={tmp_path / 'toy'}", f"run_root={tmp_path / 'runs'}",
        *extra])


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_old_checkpoint_loads_into_todays_module(exp, tiny_backbone_dir):
    state = torch.load(FIXTURES / exp / "step000002.ckpt", map_location="cpu", weights_only=False)
    cfg = config_from_dict(state["hyper_parameters"]["config"], [f"backbone.name_or_path={tiny_backbone_dir}"])
    module = METHODS[cfg.method.name](cfg)
    module.load_state_dict(state["state_dict"])  # strict: every trainable tensor, by its old name
    mine = module.state_dict()
    for key, value in state["state_dict"].items():
        assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_old_checkpoint_state_keys_are_todays_classes(exp, tmp_path, tiny_backbone_dir):
    """Every callback and the data module find their saved state under the key today's classes look up."""
    state = torch.load(FIXTURES / exp / "step000002.ckpt", map_location="cpu", weights_only=False)
    cfg = fixture_config(exp, tmp_path, tiny_backbone_dir)
    trainer, _ = build_trainer(cfg, tmp_path / "run")
    saved = set(state["callbacks"])
    assert {cb.state_key for cb in trainer.callbacks if cb.state_key in saved} == saved
    datamodule = build_datamodule(cfg, METHODS[cfg.method.name](cfg).backbone.image_transform)
    assert type(datamodule).__qualname__ in state


@pytest.mark.slow
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_old_checkpoint_resumes_to_the_end(exp, tmp_path, tiny_backbone_dir):
    run = tmp_path / "runs" / exp / "old"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / exp / "step000002.ckpt", run / "checkpoints" / "step000002.ckpt")
    shutil.copy(FIXTURES / exp / "config.yaml", run / "config.yaml")
    summary = train(fixture_config(exp, tmp_path, tiny_backbone_dir, f"resume={run}"))
    assert Path(summary["run_dir"]) == run
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4  # steps 3 and 4 trained on top of the old checkpoint
