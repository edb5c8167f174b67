"""`prepare(cfg)`: make what an experiment's toy parts need before anything loads.

`mmict train`, `mmict eval` and `mmict pretrain-toy` call it explicitly; `build_backbone` only loads. The toy
world's shards (`data.toy`) and the toy backbone (`backbone.toy`, pretrained on CPU, minutes) are each written
once and reused while their recipe is unchanged (a changed recipe rewrites them, with a warning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mmict.toy.backbone import ensure_toy_backbone
from mmict.toy.world import write_toy_world


def prepare(cfg: Any, *, force_backbone: bool = False) -> Path | None:
    """Write the toy world when `data.toy` is set and the toy backbone when `backbone.toy` is set; returns the
    toy backbone's folder (None when the experiment's backbone is not a toy one)."""
    if cfg.data.toy is not None:
        write_toy_world(cfg.data.root, **OmegaConf.to_container(cfg.data.toy))
    if cfg.backbone.toy is None:
        return None
    return ensure_toy_backbone(cfg.backbone.name_or_path, cfg.backbone.toy, force=force_backbone)
