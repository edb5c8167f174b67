"""AIM as a LightningModule: frozen MLLM + trainable fused-token projector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig

from mmict.aim import DemoReader, FusedTokenProjector
from mmict.backbones import Backbone
from mmict.modules.base import FrozenBackboneModule


class AIMModule(FrozenBackboneModule):
    """Trains only the projector, with next-token cross-entropy on the query's target tokens.

    Checkpoints hold the projector and the experiment config, never the frozen backbone (which is
    reloaded from `backbone.name_or_path`).
    """

    train_demo_mode = "fused"
    default_eval_modes = ("fused", "images", "text")  # AIM against vanilla ICL and text-only demos

    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        aim = self.cfg.method.aim
        self.reader = DemoReader(self.backbone, layer=aim.layer, final_norm=aim.final_norm)
        d = self.backbone.hidden_size
        self.projector = FusedTokenProjector(d, d, kind=aim.projector, mlp_hidden=aim.mlp_hidden)

    # ---- the method ---------------------------------------------------------------------------
    def fuse(self, demo_images: torch.Tensor, demo_texts: Sequence[str]) -> list[torch.Tensor]:
        """Fused tokens of each demo: frozen read (no grad) then the trainable projection."""
        hidden = self.reader.read(demo_images, list(demo_texts))
        if not hidden:
            return []
        lengths = [h.shape[0] for h in hidden]
        # The projector trains in its own (fp32) dtype even when the frozen backbone runs in bf16.
        weight_dtype = next(self.projector.parameters()).dtype
        fused = self.projector(torch.cat(hidden).to(weight_dtype))
        return list(torch.split(fused, lengths))
