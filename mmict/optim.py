"""The one optimizer recipe every module uses: AdamW, linear warmup, cosine decay per step; and how a resumed run puts
its own optimisation settings over a checkpoint's."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


# ---- a resume with other optimisation settings -------------------------------------------------------------------
# Lightning restores a checkpoint's optimizer and scheduler states over the ones `configure_optimizers` built from
# this run's config: the param groups' lr, weight_decay and betas and the scheduler's base learning rates come back as
# the checkpoint's, so `resume=<ckpt> optim.lr=<lower>` would silently train on at the old rate. (The schedule's shape,
# optim.warmup_steps and trainer.max_steps, is this run's already: a LambdaLR restores its step, not its function.)
# The module snapshots what its config built before the restore and puts it back after (mmict/methods/base.py).
RESUMABLE = ("lr", "weight_decay", "warmup_steps", "betas")  # optim.* keys a resume may change


def optimizer_settings(optimizers: Sequence[torch.optim.Optimizer]) -> list[list[dict[str, Any]]]:
    """Each optimizer's param groups' configured values (`initial_lr`: the schedule's base), as the config built
    them."""
    return [[{"initial_lr": g.get("initial_lr", g["lr"]), "weight_decay": g.get("weight_decay"),
              "betas": g.get("betas")} for g in opt.param_groups] for opt in optimizers]


def apply_optimizer_settings(optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any],
                             settings: list[list[dict[str, Any]]]) -> None:
    """Put `settings` (from `optimizer_settings`) over restored optimizers: the current learning rate is rescaled to
    the new base at the schedule's restored position, and each scheduler's base learning rates follow."""
    for opt, groups in zip(optimizers, settings, strict=True):
        for group, fresh in zip(opt.param_groups, groups, strict=True):
            old_base = group.get("initial_lr", group["lr"])
            group["lr"] = group["lr"] * fresh["initial_lr"] / old_base if old_base else fresh["initial_lr"]
            if "initial_lr" in group:
                group["initial_lr"] = fresh["initial_lr"]
            for key in ("weight_decay", "betas"):
                if fresh[key] is not None and key in group:
                    group[key] = fresh[key]
    for scheduler in schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in scheduler.optimizer.param_groups]


def changed_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'optim.lr 0.001 (checkpoint) -> 0.0001 (now)' for each optimisation setting of config `now` that differs from
    the checkpoint's config `saved` (plain mappings of the experiment config)."""
    pairs = [(f"optim.{k}", (saved.get("optim") or {}).get(k), (now.get("optim") or {}).get(k)) for k in RESUMABLE]
    pairs.append(("trainer.max_steps", (saved.get("trainer") or {}).get("max_steps"),
                  (now.get("trainer") or {}).get("max_steps")))
    return [f"{key} {_plain(old)} (checkpoint) -> {_plain(new)} (now)" for key, old, new in pairs
            if old is not None and _plain(old) != _plain(new)]


def _plain(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value
