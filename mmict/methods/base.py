"""What every method's LightningModule shares: a frozen backbone, and checkpoints of what trains only.

A checkpoint holds the method's own trainable modules (projector, M-Hub, ...), the backbone's LoRA
weights when a method adds them, and the experiment config; never the frozen backbone, which is
reloaded from `backbone.name_or_path`. Loading checks that the checkpoint was trained for a backbone of
the same hidden size and names the mismatch. A training run resumed from a checkpoint trains with its own
optimisation settings (`optim.*`, the schedule's length), not the checkpoint's, and says which differ.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mmict.backbones import Backbone, build_backbone
from mmict.backbones.lora import is_lora_key
from mmict.batch import EpisodeBatch
from mmict.optim import (
    adamw_warmup_cosine,
    apply_optimizer_settings,
    changed_settings,
    decay_groups,
    optimizer_settings,
)
from mmict.prompts import build_prompt
from mmict.segments import Pixels, Prompt

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."


def saved_in_checkpoint(key: str) -> bool:
    """Whether a state-dict key belongs in a checkpoint: not a frozen backbone weight."""
    return not key.startswith(BACKBONE_PREFIX) or is_lora_key(key)


class FrozenBackboneModule(L.LightningModule):
    """A frozen MLLM and the method's trainable parts, trained on episode batches with next-token
    cross-entropy on the query's target tokens (mean per token)."""

    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__()
        cfg = OmegaConf.create(config) if isinstance(config, dict) else config
        # Stored as a plain dict so the checkpoint loads without the schema classes.
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)}, ignore=["backbone"])
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else build_backbone(cfg.backbone)

    # ---- the method: how demos enter the query prompt -------------------------------------------
    train_demo_mode = "none"  # what training shows: fused (AIM), none (vanilla fine-tune), ...
    default_eval_modes: tuple[str, ...] = ("none",)  # what evaluation compares when eval.demo_modes is null
    # Whether the trained parts belong to the one task they were trained for (LIVE's, MimIC's vectors): a companion
    # of such a method is evaluated on its own task alone (mmict/companions.py)
    task_specific: bool = False
    mode_labels: dict[str, str] = {}  # report names of demo modes where this method's differ from the defaults
    # Demo modes whose prompts are only images and text (`build_prompt`, no model run to make them): evaluation
    # counts their tokens before running a trial, and does not run one that exceeds the LM's positions. Other
    # modes' prompts (fused tokens, M-Hub features: a fixed number per demo) are measured as they run.
    preflight_modes: tuple[str, ...] = ("none", "images", "text")

    def eval_demo_modes(self) -> list[str]:
        """The demo modes evaluation runs: `eval.demo_modes`, else the method's own."""
        return list(self.cfg.eval.demo_modes or self.default_eval_modes)

    def fuse(self, demo_images: Sequence[Pixels], demo_texts: Sequence[str], demo_ids: Sequence[str] | None = None,
             demo_sources: Sequence | None = None) -> list[torch.Tensor]:
        """Demos as embeddings (the "fused" demo mode); methods that have such a thing define it. `demo_ids` and
        `demo_sources` (when the batch has them) identify the demos, for methods that cache their readings."""
        raise NotImplementedError(f"{type(self).__name__} has no fused demonstrations; use demo modes "
                                  "images, text or none")

    def batch_prompts(self, batch: EpisodeBatch, demo_mode: str | None = None,
                      with_target: bool = True) -> list[Prompt]:
        """Query prompts for an episode batch (`mmict.batch.EpisodeBatch`)."""
        demo_mode = demo_mode or self.train_demo_mode
        fused = self.fuse(batch.demo_images, batch.demo_texts, demo_ids=batch.demo_ids,
                          demo_sources=batch.demo_sources) if demo_mode == "fused" else []
        prompts = []
        for b in range(len(batch)):
            sl = batch.demos_of(b)
            prompts.append(self.backbone.wrap_query(build_prompt(
                demo_mode, batch.query_images[b], batch.query_prompts[b],
                demo_images=batch.demo_images[sl], demo_texts=batch.demo_texts[sl],
                fused_demos=fused[sl] if fused else (),
                target=batch.query_targets[b] if with_target else None, separator=batch.demo_separator,
            )))
        return prompts

    def loss(self, batch: EpisodeBatch, demo_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over target tokens, context tokens per query)."""
        assembled = self.backbone.assemble(self.batch_prompts(batch, demo_mode), padding_side="right")
        out = self.backbone(assembled, with_loss=True)
        return out.loss, assembled.context_tokens.float()

    # ---- Lightning hooks ----------------------------------------------------------------------
    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> torch.Tensor:
        loss, ctx = self.loss(batch)
        bs = len(batch)
        # the mean over the ranks (DDP: each rank's loss is its share of the global batch's); one process: as is
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train/context_tokens", ctx.mean(), batch_size=bs)
        self.log("train/shots", float(sum(batch.demo_counts)) / bs, batch_size=bs)
        return loss

    def validation_step(self, batch: EpisodeBatch, batch_idx: int) -> None:
        loss, ctx = self.loss(batch)
        bs = len(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/context_tokens", ctx.mean(), batch_size=bs, sync_dist=True)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Norm clipping under FSDP goes through the FSDP root module, which reduces the norm over the shards:
        Lightning's FSDP precision plugin refuses `trainer.gradient_clip_val` otherwise (seen on an H200)."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and \
                isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.cfg.optim
        return adamw_warmup_cosine(
            decay_groups(self.named_parameters(), opt.weight_decay), lr=opt.lr,
            warmup_steps=opt.warmup_steps, total_steps=self.cfg.trainer.max_steps, betas=tuple(opt.betas),
        )

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if not saved_in_checkpoint(k)]:
            del state[key]
        checkpoint["mmict"] = {"backbone": self.backbone.name_or_path, "family": self.backbone.family,
                               "hidden_size": self.backbone.hidden_size}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_backbone(checkpoint, self.backbone)
        # The config it trained with: a resumed fit puts this run's optimisation settings over it (on_train_start).
        self._checkpoint_config = (checkpoint.get("hyper_parameters") or {}).get("config")

    def restore(self, checkpoint: dict[str, Any] | str | Path) -> dict[str, Any]:
        """A run's trained weights outside a fit (evaluation of a checkpoint, of a run trained to its end, after FSDP):
        the backbone checked first (a clear error, not a shape mismatch), the weights loaded, then the module's own
        checkpoint hook as Lightning calls it when it restores (AIM: the shots it was trained on; MMICT: a warning
        when its query-text setting differs). Returns the checkpoint."""
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        check_checkpoint_backbone(checkpoint, self.backbone)
        self.load_state_dict(checkpoint["state_dict"])
        self.on_load_checkpoint(checkpoint)
        return checkpoint

    # ---- a resume with other optimisation settings (mmict/optim.py) ---------------------------------------------
    def on_fit_start(self) -> None:
        # Called after configure_optimizers and before Lightning restores a checkpoint's optimizer states over them:
        # what this run's config asks for.
        self._configured_optim = optimizer_settings(self.trainer.optimizers)

    def on_train_start(self) -> None:
        saved, self._checkpoint_config = getattr(self, "_checkpoint_config", None), None
        configured = getattr(self, "_configured_optim", None)
        if saved is None or configured is None:
            return
        changes = changed_settings(saved, OmegaConf.to_container(self.cfg, resolve=True))
        if not changes:
            return
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        apply_optimizer_settings(self.trainer.optimizers, schedulers, configured)
        log.warning("resume: %s applied from step %d on (the optimizer's moments and the schedule's position are "
                    "the checkpoint's)", "; ".join(changes), self.trainer.global_step)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        # Checkpoints lack the frozen backbone by design; every other key must be present and match.
        mine = self.state_dict()
        expected = {k for k in mine if saved_in_checkpoint(k)}
        given = {k for k in state_dict if saved_in_checkpoint(k)}
        if strict and expected != given:
            raise KeyError(
                f"checkpoint does not match this {type(self).__name__}: missing {sorted(expected - given)}, "
                f"unexpected {sorted(given - expected)}. Was it trained with another method, projector or "
                "backbone.lora config?"
            )
        for key, value in state_dict.items():
            if key in mine and mine[key].shape != value.shape:
                raise ValueError(
                    f"checkpoint tensor '{key}' has shape {tuple(value.shape)}, the module expects "
                    f"{tuple(mine[key].shape)}: it was trained for a backbone of another hidden size "
                    f"(this backbone: {self.backbone.name_or_path}, d={self.backbone.hidden_size}). Load the "
                    "backbone it was trained on (backbone.name_or_path=...) or train a new one."
                )
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def check_checkpoint_backbone(checkpoint: dict[str, Any], backbone: Backbone) -> None:
    """Fail clearly when a checkpoint was trained on a backbone of another hidden size."""
    info = checkpoint.get("mmict") or {}
    saved = info.get("hidden_size")
    if saved is not None and saved != backbone.hidden_size:
        raise ValueError(
            f"this checkpoint was trained on backbone '{info.get('backbone')}' (hidden size {saved}); the loaded "
            f"backbone '{backbone.name_or_path}' has hidden size {backbone.hidden_size}, so its projector cannot "
            f"apply. Set backbone.name_or_path={info.get('backbone')} (and backbone.family="
            f"{info.get('family', '...')}), or train a projector for this backbone."
        )
