"""peft LoRA on the frozen backbone's language model (the vanilla fine-tuning baseline).

Adapters are injected into the language model only (never the vision tower, whose attention layers
share names like `q_proj`), at the family's `lora_target_modules` unless the config names others.
Only the LoRA weights train and only they are saved (see `mmict.methods.base`).
"""

from __future__ import annotations

import logging
from typing import Any

from mmict.backbones.base import Backbone

log = logging.getLogger(__name__)

LORA_MARK = "lora_"  # peft's parameter names: lora_A, lora_B (lora_embedding_*, ...)


def add_lora(backbone: Backbone, r: int, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: list[str] | None = None) -> int:
    """Inject LoRA adapters into `backbone`'s language model; returns the number of trainable weights."""
    from peft import LoraConfig, inject_adapter_in_model

    if r <= 0:
        raise ValueError(f"backbone.lora.r={r}: the LoRA rank must be positive (r=0 means no LoRA)")
    targets = list(target_modules or backbone.lora_target_modules)
    lm = backbone.language_model
    present = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(
            f"backbone.lora.target_modules {missing} are not layers of the {backbone.family} language model "
            f"({type(lm).__name__}); its linear layers include {sorted(_linear_names(lm))}"
        )
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), lm)
    n = sum(p.numel() for name, p in lm.named_parameters() if LORA_MARK in name)
    log.info("LoRA r=%d on %s of the %s language model: %.3f M trainable weights", r, targets, backbone.family,
             n / 1e6)
    return n


def _linear_names(module: Any) -> set[str]:
    from torch import nn

    return {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def is_lora_key(key: str) -> bool:
    return LORA_MARK in key
