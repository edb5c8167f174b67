"""The one optimizer recipe every module uses: AdamW, linear warmup, cosine decay per step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def adamw_warmup_cosine(
    params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
    betas: tuple[float, float] = (0.9, 0.999),
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` return value, the scheduler stepped every training step."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, betas=betas)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
