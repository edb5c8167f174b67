"""Shared fixtures: a tiny toy backbone built once per session (no download), W&B disabled."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TOY = dict(image_size=16, patch_size=8, vision_hidden_size=32, vision_layers=2, text_hidden_size=32,
                text_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256, seed=0)
# The paper's AIM (final layer, PyTorch's init), not toy_aim's layer-1 reading of its own pretrained backbone.
PAPER_AIM = ("method.aim.layer=-1", "method.aim.final_norm=true", "method.aim.projector_init=default")


def tiny_aim_cfg(backbone_dir, *overrides: str):
    """toy_aim on the tiny random backbone at `backbone_dir`, with the paper's AIM settings."""
    from mmict.config import load_config

    return load_config("toy_aim", [f"backbone.name_or_path={backbone_dir}", "backbone.toy=null", *PAPER_AIM,
                                   *overrides])


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    from mmict.backbones.toy import ensure_toy_backbone

    path = tmp_path_factory.mktemp("toy_backbone") / "model"
    ensure_toy_backbone(path, SimpleNamespace(**TINY_TOY))
    return path


@pytest.fixture()
def tiny_backbone(tiny_backbone_dir):
    from mmict.backbones import load_backbone

    return load_backbone("llava", str(tiny_backbone_dir))
