"""What a resume reports as changed against its checkpoint's config."""

from __future__ import annotations

from mmict.optim import changed_settings


def test_changed_settings_names_each_difference_with_both_values():
    saved = {"optim": {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 20, "betas": [0.9, 0.999]},
             "trainer": {"max_steps": 300}}
    now = {"optim": {"lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 5, "betas": (0.9, 0.95)},
           "trainer": {"max_steps": 300}}
    assert changed_settings(saved, now) == [
        "optim.lr 0.001 (checkpoint) -> 0.0001 (now)", "optim.warmup_steps 20 (checkpoint) -> 5 (now)",
        "optim.betas [0.9, 0.999] (checkpoint) -> [0.9, 0.95] (now)"]
    assert changed_settings(saved, saved) == []
    assert changed_settings({}, now) == []  # a checkpoint without a config: nothing to compare
