"""Further tasks the same trained weights are evaluated on (`eval.extra_tasks`), beside `eval.task`.

An entry is a task name with optional `eval.*` overrides of its own, e.g. "toy_concept eval.max_new_tokens=2
eval.shots=[0,2,4,8]": every other evaluation setting is the run's, so the tasks differ only where the entry says.
The run's own task reports under `<run>/eval/` as it always has; each further task under `<run>/eval/<task>/`, with
its own results.json, table and plots, and on W&B under the prefix `eval_<task>`. Companions evaluate the same
further tasks (it is a key they take from the run they join), so a joint table has one section per task.

Each entry is parsed and validated with the config (`mmict.config.checks.check_extra_tasks`): a typo fails before
any training.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from mmict.config.checks import parse_extra_task
from mmict.config.errors import ConfigError
from mmict.config.loading import config_from_dict


def task_configs(cfg: DictConfig) -> list[DictConfig]:
    """The run's config for each further task: the run's, with `eval.task` and the entry's overrides, validated."""
    data = OmegaConf.to_container(cfg, resolve=True)
    configs = []
    for spec in cfg.eval.extra_tasks:
        name, own = parse_extra_task(spec)
        try:
            configs.append(config_from_dict(data, [f"eval.task={name}", "eval.extra_tasks=[]", "eval.companions=[]",
                                                   *own], source="the run's config"))
        except ConfigError as err:
            raise ConfigError(f"eval.extra_tasks: '{spec}': {err}") from None
    return configs
