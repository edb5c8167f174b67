"""Shared fixtures: a tiny toy backbone built once per session (no download), W&B disabled."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one pytest-xdist worker per core: one thread each, or
    import torch  # noqa: E402  (the workers' intra-op threads would fight over the same cores)

    torch.set_num_threads(1)

from helpers import TINY_TOY  # noqa: E402  (tests/ is on sys.path: pytest puts conftest's folder there)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    from mmict.toy.backbone import ensure_toy_backbone

    path = tmp_path_factory.mktemp("toy_backbone") / "model"
    ensure_toy_backbone(path, SimpleNamespace(**TINY_TOY))
    return path


@pytest.fixture()
def tiny_backbone(tiny_backbone_dir):
    from mmict.backbones import load_backbone

    return load_backbone("llava", str(tiny_backbone_dir))
