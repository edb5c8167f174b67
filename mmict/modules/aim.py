"""AIM as a LightningModule: frozen MLLM + trainable fused-token projector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mmict.aim import DemoReader, FusedTokenProjector
from mmict.backbones import Backbone, build_backbone
from mmict.optim import adamw_warmup_cosine
from mmict.prompts import build_prompt
from mmict.segments import Prompt

BACKBONE_PREFIX = "backbone."


class AIMModule(L.LightningModule):
    """Trains only the projector, with next-token cross-entropy on the query's target tokens.

    Checkpoints hold the projector and the experiment config, never the frozen backbone (which is
    reloaded from `backbone.name_or_path`).
    """

    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__()
        cfg = OmegaConf.create(config) if isinstance(config, dict) else config
        # Stored as a plain dict so the checkpoint loads without the schema classes.
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)}, ignore=["backbone"])
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else build_backbone(cfg.backbone)
        aim = cfg.method.aim
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

    def batch_prompts(self, batch: dict[str, Any], demo_mode: str = "fused", with_target: bool = True) -> list[Prompt]:
        """Query prompts for a collated episode batch (see `data_modules.web_corpus.collate_episodes`)."""
        fused = self.fuse(batch["demo_images"], batch["demo_texts"]) if demo_mode == "fused" else []
        prompts, offset = [], 0
        for b, k in enumerate(batch["demo_counts"]):
            sl = slice(offset, offset + k)
            offset += k
            prompts.append(build_prompt(
                demo_mode, batch["query_images"][b], batch["query_prompts"][b],
                demo_images=batch["demo_images"][sl], demo_texts=batch["demo_texts"][sl],
                fused_demos=fused[sl] if fused else (),
                target=batch["query_targets"][b] if with_target else None,
            ))
        return prompts

    def loss(self, batch: dict[str, Any], demo_mode: str = "fused") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over target tokens, context tokens per query)."""
        assembled = self.backbone.assemble(self.batch_prompts(batch, demo_mode), padding_side="right")
        out = self.backbone(assembled, with_loss=True)
        return out.loss, assembled.context_tokens.float()

    # ---- Lightning hooks ----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, ctx = self.loss(batch)
        bs = len(batch["query_targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/context_tokens", ctx.mean(), batch_size=bs)
        self.log("train/shots", float(sum(batch["demo_counts"])) / bs, batch_size=bs)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, ctx = self.loss(batch)
        bs = len(batch["query_targets"])
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/context_tokens", ctx.mean(), batch_size=bs, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.cfg.optim
        return adamw_warmup_cosine(
            (p for p in self.parameters() if p.requires_grad), lr=opt.lr, weight_decay=opt.weight_decay,
            warmup_steps=opt.warmup_steps, total_steps=self.cfg.trainer.max_steps, betas=tuple(opt.betas),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen backbone is reloaded from its own checkpoint: keep only what trains.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(BACKBONE_PREFIX)]:
            del state[key]
        checkpoint["mmict"] = {"backbone": self.backbone.name_or_path, "hidden_size": self.backbone.hidden_size}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        # Checkpoints lack the backbone by design; every other key must be present and match.
        expected = {k for k in self.state_dict() if not k.startswith(BACKBONE_PREFIX)}
        given = {k for k in state_dict if not k.startswith(BACKBONE_PREFIX)}
        if strict and expected != given:
            raise KeyError(
                f"checkpoint does not match this AIM module: missing {sorted(expected - given)}, "
                f"unexpected {sorted(given - expected)}. Was it trained with another method/projector config?"
            )
        for key, value in state_dict.items():
            mine = self.state_dict().get(key)
            if mine is not None and mine.shape != value.shape:
                raise ValueError(
                    f"checkpoint tensor '{key}' has shape {tuple(value.shape)}, the module expects "
                    f"{tuple(mine.shape)}: the projector was trained for a backbone of another hidden size."
                )
        return super().load_state_dict(state_dict, strict=False, assign=assign)
