"""Precision policy: what the user set x what the hardware has -> what runs; never a silent change."""

from __future__ import annotations

import logging

import pytest

from mmict.config import load_config
from mmict.training.precision import Hardware, apply_precision_policy, detect_hardware, resolve_precision

CPU = Hardware("cpu")
A100 = Hardware("cuda", bf16=True, fp16=True, name="A100")
V100 = Hardware("cuda", bf16=False, fp16=True, name="V100")


@pytest.mark.parametrize(
    ("precision", "dtype", "hw", "expected", "changed"),
    [
        ("auto", "auto", A100, ("bf16-mixed", "bfloat16"), False),
        ("auto", "auto", V100, ("32-true", "float32"), False),
        ("auto", "auto", CPU, ("32-true", "float32"), False),
        ("bf16-mixed", "bfloat16", A100, ("bf16-mixed", "bfloat16"), False),
        ("bf16-mixed", "bfloat16", V100, ("32-true", "float32"), True),
        ("bf16-mixed", "bfloat16", CPU, ("32-true", "float32"), True),
        ("bf16-true", "bfloat16", CPU, ("32-true", "float32"), True),
        ("16-mixed", "float16", V100, ("16-mixed", "float16"), False),
        ("16-mixed", "float16", CPU, ("32-true", "float32"), True),
        ("32-true", "float32", A100, ("32-true", "float32"), False),
        ("32-true", "float32", CPU, ("32-true", "float32"), False),
        ("bf16-mixed", "auto", CPU, ("32-true", "float32"), True),  # dtype follows the fallback
        ("32-true", "bfloat16", A100, ("32-true", "bfloat16"), False),  # allowed: frozen bf16, trainable fp32
    ],
)
def test_policy_table(precision, dtype, hw, expected, changed):
    d = resolve_precision(precision, dtype, hw)
    assert (d.precision, d.backbone_dtype) == expected
    assert d.changed is changed
    assert (d.requested_precision, d.requested_dtype) == (precision, dtype)
    if changed:  # the message names the setting, the hardware and the way out
        text = " ".join(d.messages)
        assert "was set" in text and hw.describe() in text and "32-true" in text


def test_cpu_falls_back_loudly_and_the_config_says_what_runs(caplog):
    cfg = load_config("toy_aim", ["trainer.precision=bf16-mixed", "backbone.dtype=bfloat16", "trainer.accelerator=cpu"])
    with caplog.at_level(logging.INFO, logger="mmict.training.precision"):
        d = apply_precision_policy(cfg)
    assert d.changed and (cfg.trainer.precision, cfg.backbone.dtype) == ("32-true", "float32")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per overridden setting
    assert "trainer.precision=bf16-mixed was set" in warnings[0].getMessage()
    assert "CPU" in warnings[0].getMessage()
    assert d.as_dict()["requested_precision"] == "bf16-mixed"


def test_toy_experiment_unchanged_on_cpu(caplog):
    cfg = load_config("toy_aim", ["trainer.accelerator=cpu"])
    with caplog.at_level(logging.INFO, logger="mmict.training.precision"):
        d = apply_precision_policy(cfg)
    assert not d.changed and (cfg.trainer.precision, cfg.backbone.dtype) == ("32-true", "float32")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_is_accepted_by_the_config_and_resolved_by_the_trainer(tmp_path):
    from mmict.train import build_trainer

    cfg = load_config("toy_aim", ["trainer.precision=auto", "backbone.dtype=auto", "trainer.accelerator=cpu",
                                  "logger.wandb=false", "trainer.progress_bar=false"])
    trainer, _ = build_trainer(cfg, tmp_path)  # a direct caller (no policy applied) still gets a valid precision
    assert trainer.precision == "32-true"
    d = apply_precision_policy(cfg)
    assert (d.precision, d.backbone_dtype) == ("32-true", "float32") and not d.changed


def test_detect_hardware_on_this_machine():
    assert detect_hardware("cpu") == Hardware("cpu")
    hw = detect_hardware("auto")
    assert hw.kind in ("cpu", "cuda", "mps")
