"""BLIP-2's stage 1 at toy size: the Q-Former, with its text branch, learns to read the frozen vision tower.

As in BLIP-2 (Li et al. 2023, section 3.2; LAVIS `blip2_qformer.py`), the learned queries cross-attend to the
frozen image features and share self-attention with a text transformer, trained with three losses on image-caption
pairs, each with its own self-attention mask:

- **ITC** (image-text contrastive): queries alone vs the text's [CLS] alone; an image's similarity to a text is its
  best query's; negatives are the batch's other captions (captions equal to the positive are not negatives);
- **ITM** (image-text matching): queries and text attend to each other; a linear head on the mean query output says
  match / no match, against a caption of another image of the batch;
- **ITG** (image-grounded text generation): the queries attend to the queries only, the text to the queries and
  causally to itself; the text predicts its next token (the LM head is dropped after, as LAVIS's `cls`).

BLIP-2 starts its text branch from BERT; the toy one starts from scratch, so stage 1 is also its "BERT". The
trained Q-Former is an InstructBLIP Q-Former (text branch included); `mmict.toy.blip2` copies its shared part into
the BLIP-2 model and saves the text branch as a BERT checkpoint beside it.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from mmict.toy.language import COLORS, POSITIONS, QUESTIONS, SHAPES, answer_for, caption, vqa_demo_text
from mmict.toy.pretrain_data import ImageBank

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 32


class QFormerStage1(L.LightningModule):
    def __init__(self, vision: nn.Module, hub_tokenizer: Any, cfg: Any) -> None:
        super().__init__()
        from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

        self.vision = vision.requires_grad_(False)
        config = InstructBlipQFormerConfig(
            hidden_size=cfg.qformer_hidden_size, num_hidden_layers=cfg.qformer_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.qformer_hidden_size * 2, cross_attention_frequency=1,
            encoder_hidden_size=vision.config.hidden_size, vocab_size=len(hub_tokenizer),
            pad_token_id=hub_tokenizer.pad_token_id, max_position_embeddings=MAX_TEXT_TOKENS)
        torch.manual_seed(cfg.seed + 7)
        self.qformer = InstructBlipQFormerModel(config)
        width = config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, width) * config.initializer_range)
        embed = min(width, 64)
        self.vision_proj, self.text_proj = nn.Linear(width, embed), nn.Linear(width, embed)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.itm_head = nn.Linear(width, 2)
        self.lm_head = nn.Linear(width, config.vocab_size)
        self.tokenizer, self.lr, self.max_steps = hub_tokenizer, cfg.pretrain_lr, cfg.pretrain_qformer_steps

    # ---- the three passes -------------------------------------------------------------------------------------
    def _image_memory(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # BLIP-2's Q-Former reads the tower's last hidden state (post-LayerNorm)
            return self.vision(pixel_values=pixels).last_hidden_state

    def _joint(self, memory: torch.Tensor, ids: torch.Tensor, text_mask: torch.Tensor, causal: bool) -> torch.Tensor:
        """Queries + text with BLIP-2's ITM mask (all attend to all) or ITG mask (queries see queries; text sees
        queries and earlier text); returns the last hidden state (B, Q + T, width)."""
        b, n_q, n_t = ids.shape[0], self.query_tokens.shape[1], ids.shape[1]
        allowed = torch.ones(b, n_q + n_t, n_q + n_t, dtype=torch.bool, device=ids.device)
        keys = torch.cat([torch.ones(b, n_q, dtype=torch.bool, device=ids.device), text_mask.bool()], dim=1)
        allowed &= keys[:, None, :]
        if causal:
            allowed[:, :n_q, n_q:] = False
            allowed[:, n_q:, n_q:] &= torch.tril(torch.ones(n_t, n_t, dtype=torch.bool, device=ids.device))
        mask = torch.zeros(allowed.shape, dtype=memory.dtype, device=ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(memory.dtype).min)[:, None]  # (B, 1, L, L), additive
        out = self.qformer(input_ids=ids, attention_mask=mask, query_embeds=self.query_tokens.expand(b, -1, -1),
                           encoder_hidden_states=memory)
        return out.last_hidden_state

    def losses(self, pixels: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
        ids, text_mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        memory = self._image_memory(pixels)
        b = ids.shape[0]
        same = torch.tensor([[a == c for c in texts] for a in texts], device=self.device)
        # ITC
        queries = self.qformer(input_ids=None, query_embeds=self.query_tokens.expand(b, -1, -1),
                               encoder_hidden_states=memory).last_hidden_state
        image_feats = F.normalize(self.vision_proj(queries), dim=-1)  # (B, Q, E)
        text_cls = self.qformer(input_ids=ids, attention_mask=text_mask).last_hidden_state[:, 0]
        text_feats = F.normalize(self.text_proj(text_cls), dim=-1)  # (B, E)
        sim = torch.einsum("iqe,je->ijq", image_feats, text_feats).amax(-1) / self.temp.clamp(0.01, 0.5)
        positives = same.float() / same.float().sum(1, keepdim=True)
        itc = (-(positives * sim.log_softmax(1)).sum(1).mean() - (positives * sim.t().log_softmax(1)).sum(1).mean()) / 2
        # ITM: each image with its caption and with another image's (different) caption
        with torch.no_grad():
            weights = sim.detach().softmax(1).masked_fill(same, 0) + (~same).float() * 1e-4
        negative = torch.multinomial(weights, 1).squeeze(1)
        pair_ids = torch.cat([ids, ids[negative]])
        pair_mask = torch.cat([text_mask, text_mask[negative]])
        hidden = self._joint(torch.cat([memory, memory]), pair_ids, pair_mask, causal=False)
        logits = self.itm_head(hidden[:, : self.query_tokens.shape[1]].mean(1))
        labels = torch.cat([torch.ones(b), torch.zeros(b)]).long().to(self.device)
        labels[b:][same[torch.arange(b), negative]] = 1  # no other caption in the batch: a positive after all
        itm = F.cross_entropy(logits, labels)
        # ITG
        hidden = self._joint(memory, ids, text_mask, causal=True)[:, self.query_tokens.shape[1]:]
        targets = ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
        itg = F.cross_entropy(self.lm_head(hidden[:, :-1]).flatten(0, 1), targets.flatten())
        itm_acc = (logits.argmax(-1) == labels).float().mean()
        return {"itc": itc, "itm": itm, "itg": itg, "itm_acc": itm_acc,
                "itc_acc": (sim.argmax(1) == torch.arange(b, device=self.device)).float().mean()}

    def training_step(self, batch: tuple[torch.Tensor, list[str]], batch_idx: int) -> torch.Tensor:
        parts = self.losses(*batch)
        for name, value in parts.items():
            self.log(f"pretrain_qformer/{name}", value, prog_bar=name in ("itc", "itm", "itg"),
                     batch_size=len(batch[1]))
        return parts["itc"] + parts["itm"] + parts["itg"]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        pixels, texts = batch
        return pixels.to(device), texts

    def configure_optimizers(self) -> Any:
        from mmict.optim import adamw_warmup_cosine

        params = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("vision.")]
        return adamw_warmup_cosine([{"params": params, "weight_decay": 0.05}], lr=self.lr, warmup_steps=50,
                                   total_steps=self.max_steps)


class CaptionPairs(torch.utils.data.IterableDataset):
    """Endless batches of (pixels, texts): random images with their caption (two in three) or a VQA line."""

    def __init__(self, image_transform: Any, batch_size: int, image_size: int, seed: int) -> None:
        super().__init__()
        self.image_transform, self.batch_size = image_transform, batch_size
        self.image_size, self.seed = image_size, seed

    def __iter__(self):
        bank = ImageBank(self.image_transform, self.image_size, seed=self.seed + 3)
        rng = random.Random(f"toy-qformer/{self.seed}")
        while True:
            pixels, texts = [], []
            for _ in range(self.batch_size):
                attrs = {"shape": rng.choice(SHAPES), "color": rng.choice(COLORS), "position": rng.choice(POSITIONS)}
                form = rng.choice(("caption", "caption", "caption", *QUESTIONS))
                texts.append(caption(**attrs) if form == "caption" else
                             vqa_demo_text(QUESTIONS[form], answer_for(form, **attrs)))
                pixels.append(bank.draw(rng, attrs["shape"], attrs["color"], attrs["position"]))
            yield torch.stack(pixels), texts


def pretrain_qformer(vision: nn.Module, image_transform: Any, hub_tokenizer: Any, cfg: Any,
                     progress: bool = True) -> tuple[QFormerStage1, dict[str, float]]:
    """Stage 1 on generated caption pairs; returns the trained module (frozen) and its last-batch accuracies."""
    module = QFormerStage1(vision, hub_tokenizer, cfg)
    loader = torch.utils.data.DataLoader(CaptionPairs(image_transform, 32, cfg.image_size, cfg.seed),
                                         batch_size=None)
    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=cfg.pretrain_qformer_steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False, gradient_clip_val=1.0)
    log.info("BLIP-2 stage 1: the toy Q-Former and its text branch, %d steps (ITC + ITM + ITG)",
             cfg.pretrain_qformer_steps)
    trainer.fit(module, train_dataloaders=loader)
    module.eval().requires_grad_(False)
    with torch.no_grad():  # a fresh batch: 64 images, captions only
        pairs = CaptionPairs(image_transform, 64, cfg.image_size, cfg.seed + 1)
        pixels, texts = next(iter(pairs))
        report = {k: float(v) for k, v in module.losses(pixels, texts).items()}
    log.info("toy Q-Former after stage 1 (a held-out batch of 64): ITC top-1 %.0f%%, ITM accuracy %.0f%%, "
             "ITG loss %.2f",
             100 * report["itc_acc"], 100 * report["itm_acc"], report["itg"])
    return module, report


__all__ = ["CaptionPairs", "QFormerStage1", "pretrain_qformer"]
