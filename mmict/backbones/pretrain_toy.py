"""Pretraining the toy backbone, so the frozen MLLM under AIM/MMICT can do in-context learning.

The tiny LLaVA's language model and multimodal projector train from scratch on documents generated on
the fly (`data_modules.toy_pretrain`): captions, concept-binding episodes over the *pretrain* word pool,
and word lists. The CLIP vision tower stays at its random initialisation, frozen, as LLaVA keeps its
CLIP frozen: trained jointly from scratch, its features collapsed within a few hundred steps and the
model never learnt to read images (measured: colour-word accuracy stayed at chance for 1000 steps,
against 97% after 200 steps with the tower frozen).

After training, `probe_binding` measures what the backbone is for: vanilla multimodal ICL on binding
episodes over the held-out *eval* word pool, which pretraining never saw.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from mmict.backbones.base import Backbone
from mmict.optim import adamw_warmup_cosine
from mmict.prompts import build_prompt

log = logging.getLogger(__name__)


class ToyPretrainModule(L.LightningModule):
    def __init__(self, backbone: Backbone, lr: float, max_steps: int, warmup_steps: int = 50) -> None:
        super().__init__()
        self.backbone = backbone
        vision = backbone.model.model.vision_tower
        for name, p in backbone.model.named_parameters():
            # The one place the backbone trains; the vision tower stays frozen (see the module docstring).
            p.requires_grad_(not name.startswith("model.vision_tower."))
        self.lr, self.max_steps, self.warmup_steps = lr, max_steps, warmup_steps
        self.trainable = [p for p in backbone.model.parameters() if p.requires_grad]
        assert not any(p.requires_grad for p in vision.parameters())

    def transfer_batch_to_device(self, batch: list, device: torch.device, dataloader_idx: int) -> list:
        return batch  # prompts of (frozen) segments; `assemble` moves their tensors to the model's device

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        loss = self.backbone(self.backbone.assemble(batch), with_loss=True).loss
        self.log("pretrain/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine([{"params": self.trainable, "weight_decay": 0.01}], lr=self.lr,
                                   warmup_steps=self.warmup_steps, total_steps=self.max_steps)


@torch.no_grad()
def probe_binding(backbone: Backbone, *, shots: Sequence[int] = (0, 1, 2, 4), modes: Sequence[str] = ("images", "text"),
                  episodes: int = 200, n_way: int = 2, image_size: int = 32, seed: int = 0,
                  batch_size: int = 50) -> dict[str, dict[int, float]]:
    """Binding accuracy on held-out (eval pool) words: {demo mode: {shots: accuracy}}; mode "none" at 0."""
    from data_modules.toy_binding import BINDING_PROMPT, balanced_classes, binding_text, sample_episode, word_pools
    from data_modules.toy_pretrain import ImageBank
    from mmict.eval.postprocess import first_word

    bank = ImageBank(backbone.image_transform, image_size, seed=seed + 1)
    pool = word_pools()["eval"]
    results: dict[str, dict[int, float]] = {}
    for k in shots:
        for mode in ["none"] if k == 0 else modes:
            rng = random.Random(f"probe/{seed}/{k}")  # the same episodes for every mode
            correct = 0
            for start in range(0, episodes, batch_size):
                prompts, answers = [], []
                for _ in range(min(batch_size, episodes - start)):
                    ep = sample_episode(rng, pool, n_way)
                    demos = [ep.image(c, rng) for c in balanced_classes(rng, n_way, k)]
                    query = ep.image(rng.randrange(n_way), rng)
                    pixels = [bank.draw(rng, d.shape, d.color, d.position) for d in demos]
                    prompts.append(build_prompt(mode, bank.draw(rng, query.shape, query.color, query.position),
                                                BINDING_PROMPT, demo_images=pixels,
                                                demo_texts=[binding_text(d.word) for d in demos]))
                    answers.append(query.word)
                outputs = backbone.generate(prompts, max_new_tokens=3)
                correct += sum(first_word(o) == a for o, a in zip(outputs, answers))
            results.setdefault(mode, {})[k] = correct / episodes
    return results


def pretrain_toy_backbone(backbone: Backbone, cfg: Any, progress: bool = True, mix: dict | None = None) -> dict:
    """Train `backbone` in place; returns a report (loss curve ends, the binding probe) for its marker."""
    from data_modules.toy_pretrain import ToyPretrainStream

    stream = ToyPretrainStream(backbone.image_transform, batch_size=cfg.pretrain_batch_size,
                               text_steps=cfg.pretrain_text_steps, image_size=cfg.image_size, seed=cfg.seed,
                               mix=mix)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, collate_fn=lambda batch: batch)
    module = ToyPretrainModule(backbone, cfg.pretrain_lr, cfg.pretrain_steps)
    losses: list[float] = []

    class _Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=cfg.pretrain_steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=progress,
                        gradient_clip_val=1.0,
                        limit_val_batches=0, callbacks=[_Record()], enable_model_summary=False)
    log.info("pretraining the toy backbone for %d steps (%d of word lists first); cached after",
             cfg.pretrain_steps, cfg.pretrain_text_steps)
    trainer.fit(module, train_dataloaders=loader)
    backbone.freeze()
    n_way = 2
    probe = probe_binding(backbone, n_way=n_way, image_size=cfg.image_size, seed=cfg.seed)
    chance = 1 / n_way
    log.info("toy backbone binding probe on held-out words (chance %.0f%% from 1 shot): %s", 100 * chance,
             {m: {k: f"{100 * v:.0f}%" for k, v in r.items()} for m, r in probe.items()})
    if max(probe["images"].get(k, 0.0) for k in probe["images"]) <= chance + 0.1:
        log.warning("the toy backbone does not do in-context binding above chance: raise "
                    "backbone.toy.pretrain_steps (the table will show every method near chance)")
    tail = losses[-50:]
    return {"pretrain_loss": {"first": losses[0], "last": sum(tail) / len(tail), "steps": len(losses)},
            "binding_probe": {m: {str(k): v for k, v in r.items()} for m, r in probe.items()}}
