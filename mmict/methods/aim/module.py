"""AIM as a LightningModule: frozen MLLM + trainable fused-token projector."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mmict.backbones import Backbone
from mmict.bank import DemoBank
from mmict.batch import EpisodeBatch
from mmict.config.schema import AIM_ANSWER_CUES
from mmict.methods.aim import shots
from mmict.methods.aim.bank import aim_bank
from mmict.methods.aim.reader import DemoReader, FusedTokenProjector
from mmict.methods.base import FrozenBackboneModule
from mmict.segments import Embeds, Prompt, Text


class AIMModule(FrozenBackboneModule):
    """Trains only the projector, with next-token cross-entropy on the query's target tokens.

    Checkpoints hold the projector and the experiment config, never the frozen backbone (which is
    reloaded from `backbone.name_or_path`), and the histogram of demos per training episode (`trained_shots`).
    """

    train_demo_mode = "fused"
    default_eval_modes = ("fused", "images", "text")  # AIM against vanilla ICL and text-only demos

    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        aim = self.cfg.method.aim
        # .get: a config saved before these settings existed reads the way it was trained
        self.reader = DemoReader(self.backbone, layer=aim.layer, final_norm=aim.final_norm,
                                 read_format=aim.get("read_format", "raw"), read_span=aim.get("read_span", "text"),
                                 answer_cues=list(aim.get("answer_cues", AIM_ANSWER_CUES)))
        self.fused_separator: str | None = aim.get("fused_separator") or None
        d = self.backbone.hidden_size
        self.projector = FusedTokenProjector(d, d, kind=aim.projector, mlp_hidden=aim.mlp_hidden,
                                             init=aim.projector_init)
        self.shot_counts = shots.ShotCounts()

    # ---- the method ---------------------------------------------------------------------------
    bank: DemoBank | None = None  # set by `attach_bank` (evaluation): demos read once, looked up by id

    def attach_bank(self, root: str | Path, *, store: str = "hidden", pool: str = "pool", batch_size: int = 16,
                    progress: bool = True) -> DemoBank:
        """Read demos through a demonstration bank (`mmict.bank`) from now on, for batches that carry
        `demo_ids`: each demo's reading (hidden states, or fused tokens with `store="fused"`) is computed once."""
        self.bank = aim_bank(self, root, store=store, pool=pool, batch_size=batch_size, progress=progress)
        return self.bank

    def _bank_applies(self, ids: Sequence[str] | None) -> bool:
        if self.bank is None or ids is None:
            return False
        # Stored fused tokens carry no gradient: while the projector trains, they are computed afresh.
        return self.bank.store == "hidden" or not (
            torch.is_grad_enabled() and any(p.requires_grad for p in self.projector.parameters()))

    def fuse(self, demo_images: torch.Tensor, demo_texts: Sequence[str], demo_ids: Sequence[str] | None = None,
             demo_sources: Sequence | None = None) -> list[torch.Tensor]:
        """Fused tokens of each demo: frozen read (no grad) then the trainable projection. With a bank
        attached and the demos' ids known, the read (or the whole result) comes from the bank, and the demo
        images are not even read when their sources (`mmict.bank.image_source`) identify them."""
        if not self._bank_applies(demo_ids):
            return self.project(self.reader.read(list(demo_images), list(demo_texts)))
        stored = self.bank.lookup(demo_ids, demo_images, list(demo_texts), demo_sources)
        if self.bank.store == "hidden":
            return self.project(stored)
        return self._to_device(stored, self.backbone.device, self.backbone.dtype)

    def project(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Demos' hidden states -> their fused tokens (one projector call for the whole batch)."""
        if not hidden:
            return []
        # The projector trains in its own (fp32) dtype even when the frozen backbone runs in bf16.
        weight = next(self.projector.parameters())
        fused = self.projector(torch.cat(hidden).to(weight.device, weight.dtype))
        return list(torch.split(fused, [h.shape[0] for h in hidden]))

    @staticmethod
    def _to_device(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """One transfer for a batch of stored tensors (not one per demo)."""
        if not tensors:
            return []
        return list(torch.split(torch.cat(tensors).to(device, dtype), [t.shape[0] for t in tensors]))

    def batch_prompts(self, batch: EpisodeBatch, demo_mode: str | None = None,
                      with_target: bool = True) -> list[Prompt]:
        """The query prompts, with `method.aim.fused_separator` after each demo's fused tokens when set (training
        and evaluation build their prompts here alike)."""
        prompts = super().batch_prompts(batch, demo_mode, with_target)
        if self.fused_separator is None or (demo_mode or self.train_demo_mode) != "fused":
            return prompts
        sep = Text(self.fused_separator)
        return [[part for seg in prompt for part in ((seg, sep) if isinstance(seg, Embeds) else (seg,))]
                for prompt in prompts]

    # ---- the shots training realised --------------------------------------------------------------
    def trained_shots(self) -> dict[int, int] | None:
        """Training episodes per number of demos they showed (`shots.ShotCounts`); None when unknown (not trained
        here, or loaded from a checkpoint that did not keep it)."""
        return self.shot_counts.as_dict()

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> torch.Tensor:
        self.shot_counts.add(shots.gather_demo_counts(self, batch.demo_counts, int(self.cfg.data.batch_size)))
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            # Loggers only: the json goes to the run folder, which only the training script knows (a Trainer's
            # default_root_dir falls back to the working directory, where nothing may be written unasked).
            shots.report(self.trained_shots(), None, self.loggers)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.shot_counts.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.shot_counts.load(checkpoint)
