"""Companion experiments (`eval.companions`): checked before a run trains; their rows join its table."""

from __future__ import annotations

import pytest

from mmict.companions import companion_configs, merge_rows
from mmict.config import ConfigError, load_config


def row(method: str, shots: int) -> dict:
    return {"method": method, "shots": shots, "accuracy_mean": 0.5}


def test_companion_takes_the_runs_backbone_data_and_eval_settings():
    cfg = load_config("toy_aim", ["backbone.name_or_path=/models/mine", "data.root=/data/mine", "seed=3",
                                  "eval.shots=[0,4]", "eval.seeds=[5]", "trainer.max_steps=7"])
    [companion] = companion_configs(cfg)
    assert companion.name == "toy_mmict_binding" and companion.method.name == "mmict"
    assert (companion.backbone.name_or_path, companion.data.root, companion.seed) == ("/models/mine", "/data/mine", 3)
    assert (list(companion.eval.shots), list(companion.eval.seeds)) == ([0, 4], [5])
    assert companion.backbone.toy is None and companion.data.toy is None  # loaded as they are, never rebuilt
    assert companion.trainer.max_steps == 1000 and list(companion.eval.companions) == []  # its own recipe


def test_bad_companions_fail_before_training():
    with pytest.raises(ConfigError, match="Did you mean 'toy_mmict_binding'"):
        companion_configs(load_config("toy_aim", ["eval.companions=[toy_mmict_bindng]"]))
    with pytest.raises(ConfigError, match=r"overrides \['eval.shots=\[1\]'\]"):
        companion_configs(load_config("toy_aim", ["eval.companions=['toy_mmict_binding eval.shots=[1]']"]))


def test_merge_keeps_both_zero_shots_apart_and_sorts_by_shots():
    ours = [row("zero-shot", 0), row("AIM (fused tokens)", 2)]
    theirs = [row("zero-shot", 0), row("MMICT (M-Hub text features)", 2), row("MMICT (M-Hub text features)", 1)]
    merged = merge_rows(ours, "toy_mmict_binding", theirs)
    assert [(r["method"], r["shots"]) for r in merged] == [
        ("zero-shot", 0), ("zero-shot [toy_mmict_binding]", 0), ("MMICT (M-Hub text features)", 1),
        ("AIM (fused tokens)", 2), ("MMICT (M-Hub text features)", 2)]
