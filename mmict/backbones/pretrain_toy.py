"""Pretraining the toy backbone, so the frozen MLLM under AIM/MMICT is not a random network.

The whole tiny LLaVA trains (vision tower, projector, LM) on the toy world's interleaved documents:
each document becomes `[img 1][text 1][img 2][text 2]...` with next-token loss on every text
(each followed by EOS, so the model also learns where an answer stops). The same segments path and
the same web-corpus DataModule that AIM trains with are used; only what trains differs.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from mmict.backbones.base import Backbone
from mmict.optim import adamw_warmup_cosine
from mmict.segments import Image, Prompt, Text

log = logging.getLogger(__name__)

MAX_PAIRS = 8  # toy documents hold 2..8 image-text pairs: read them whole


def document_prompts(batch: dict[str, Any]) -> list[Prompt]:
    """A collated episode batch back to whole interleaved documents (demos then query)."""
    prompts, offset = [], 0
    for b, k in enumerate(batch["demo_counts"]):
        prompt: Prompt = []
        for i in range(offset, offset + k):
            prompt += [Image(batch["demo_images"][i]), Text(batch["demo_texts"][i], target=True)]
        offset += k
        text = " ".join(t for t in (batch["query_prompts"][b], batch["query_targets"][b]) if t)
        prompts.append(prompt + [Image(batch["query_images"][b]), Text(text, target=True)])
    return prompts


class ToyPretrainModule(L.LightningModule):
    def __init__(self, backbone: Backbone, lr: float, max_steps: int, warmup_steps: int = 50) -> None:
        super().__init__()
        self.backbone = backbone
        for p in backbone.model.parameters():
            p.requires_grad_(True)  # pretraining is the one place the backbone trains
        self.lr, self.max_steps, self.warmup_steps = lr, max_steps, warmup_steps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assembled = self.backbone.assemble(document_prompts(batch))
        loss = self.backbone(assembled, with_loss=True).loss
        self.log("pretrain/loss", loss, prog_bar=True, batch_size=len(batch["demo_counts"]))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self.backbone.parameters(), lr=self.lr, weight_decay=0.01,
                                   warmup_steps=self.warmup_steps, total_steps=self.max_steps)


def pretrain_toy_backbone(backbone: Backbone, cfg: Any, progress: bool = True) -> list[float]:
    """Train `backbone` in place for `cfg.pretrain_steps` steps; returns the logged loss curve."""
    from data_modules.web_corpus import WebCorpusDataModule

    # The toy world is written by whoever owns its recipe (`mmict train`'s data step, or `mmict data
    # toy`); a missing one fails here with that command, rather than being rewritten from defaults.
    datamodule = WebCorpusDataModule(
        cfg.pretrain_data, image_transform=backbone.image_transform, batch_size=cfg.pretrain_batch_size,
        num_workers=1, min_shots=1, max_shots=MAX_PAIRS - 1, epoch_size=cfg.pretrain_batch_size * 200,
        seed=cfg.seed,
    )
    module = ToyPretrainModule(backbone, cfg.pretrain_lr, cfg.pretrain_steps)
    losses: list[float] = []

    class _Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=cfg.pretrain_steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=progress,
                        limit_val_batches=0, callbacks=[_Record()], enable_model_summary=False)
    log.info("pretraining the toy backbone for %d steps (once; the result is cached)", cfg.pretrain_steps)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    backbone.freeze()
    return losses
