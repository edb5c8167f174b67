"""The one optimizer recipe every module uses: AdamW, linear warmup, cosine decay per step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def decay_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices, none on biases, norms and other vectors
    (as BLIP-2/LAVIS and most transformer recipes; decaying a LayerNorm's gain pulls it towards zero)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_warmup_cosine(
    groups: list[dict], *, lr: float, warmup_steps: int, total_steps: int, betas: tuple[float, float] = (0.9, 0.999),
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` return value for AdamW over parameter `groups` (each with its own
    weight_decay, e.g. from `decay_groups`), the scheduler stepped every training step."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
