"""eval.extra_tasks: entries checked with the config, each task's config the run's with its own eval overrides."""

from __future__ import annotations

import pytest

from mmict.config import ConfigError, load_config
from mmict.config.extra_tasks import task_configs


def test_each_extra_task_gets_the_runs_config_with_its_own_eval_overrides():
    cfg = load_config("toy_aim", ["eval.extra_tasks=['toy_concept eval.max_new_tokens=2 eval.shots=[0,2]', toy_vqa]"])
    concept, vqa = task_configs(cfg)
    assert (concept.eval.task, concept.eval.max_new_tokens, list(concept.eval.shots)) == ("toy_concept", 2, [0, 2])
    assert (vqa.eval.task, vqa.eval.max_new_tokens, list(vqa.eval.shots)) == ("toy_vqa", 3, list(cfg.eval.shots))
    assert concept.eval.extra_tasks == [] and concept.eval.companions == []  # no chains
    assert concept.method == cfg.method and concept.backbone == cfg.backbone and concept.data == cfg.data
    assert cfg.eval.task == "toy_binding"  # the run's own config is untouched


@pytest.mark.parametrize("entry, message", [
    ("toy_concpt", "unknown task 'toy_concpt'"),
    ("toy_binding", "listed twice"),  # eval.task itself
    ("toy_concept optim.lr=1", "'optim.lr=1' is not an evaluation override"),
    ("toy_concept eval.task=toy_vqa", "is not an evaluation override"),
    ("toy_concept eval.max_new_tokens", "is not an evaluation override"),
])
def test_bad_entries_fail_when_the_config_loads(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy_aim", [f"eval.extra_tasks=[{entry!r}]"])


def test_a_bad_override_value_fails_before_any_work():
    cfg = load_config("toy_aim", ["eval.extra_tasks=['toy_concept eval.max_new_tokens=lots']"])
    with pytest.raises(ConfigError, match="toy_concept eval.max_new_tokens=lots"):
        task_configs(cfg)
