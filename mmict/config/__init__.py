"""Experiment configuration: typed schema, YAML inheritance, CLI overrides, validation.

An experiment is a YAML file under ``experiments/`` (``toy_aim`` -> ``experiments/toy_aim.yaml``).
It may inherit from other files with a top-level ``base:`` key; the final config is

    schema defaults <- bases (in order, recursively) <- the experiment file <- CLI ``key=value`` overrides

and is returned as a structured :class:`~omegaconf.DictConfig`, so ``cfg.trainer.max_steps`` is an ``int``
and assigning a wrong type or an unknown key later fails loudly too.

Every problem a user can cause (typo in a key, wrong type, bad value, missing file) raises
:class:`ConfigError` with one message that says what is wrong, where it came from and how to fix it, before
anything expensive (model loading, data writing) runs.

The package is layered, each module importing only those above it:

- ``schema``: the dataclasses and the tuples of allowed values (imports nothing from the project);
- ``introspection``: dotted keys and their types, read off the schema;
- ``errors``: :class:`ConfigError` and the wording of its messages;
- ``checks``: key/type checks of each source and the semantic checks of the merged config;
- ``loading``: files, ``base:`` inheritance, overrides, :func:`load_config` and friends.
"""

from mmict.config.errors import ConfigError
from mmict.config.loading import key_takes_list, list_experiments, load_config, save_config, to_yaml
from mmict.config.schema import (
    DTYPES,
    EXPERIMENTS_DIR,
    LIGHTNING_PRECISIONS,
    PROJECTORS,
    AIMConfig,
    BackboneConfig,
    BankConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    FSDPSettings,
    LoggerConfig,
    MethodConfig,
    OptimConfig,
    SlurmConfig,
    ToyBackboneConfig,
    ToyWorldConfig,
    TrainerConfig,
)
from mmict.methods import METHOD_NAMES as METHODS  # re-exported: the methods registry's names

# isort: split
# Public names the single-file module had but never listed in __all__ (config_from_dict and PROJECTOR_INITS are
# imported by name elsewhere). The redundant `X as X` marks each as a deliberate re-export without adding it to
# __all__, so `from mmict.config import *` binds exactly the names it bound before.
from mmict.config.loading import config_from_dict as config_from_dict
from mmict.config.schema import BANK_STORES as BANK_STORES
from mmict.config.schema import DEMO_DESIGNS as DEMO_DESIGNS
from mmict.config.schema import DEMO_MODES as DEMO_MODES
from mmict.config.schema import FSDP_SHARDING as FSDP_SHARDING
from mmict.config.schema import FSDP_STATE_DICT_TYPES as FSDP_STATE_DICT_TYPES
from mmict.config.schema import PROJECTOR_INITS as PROJECTOR_INITS
from mmict.config.schema import SELECTIONS as SELECTIONS
from mmict.config.schema import SHOTS_PER as SHOTS_PER
from mmict.config.schema import STRATEGIES as STRATEGIES
from mmict.config.schema import HubSizes as HubSizes
from mmict.config.schema import LoraSettings as LoraSettings
from mmict.config.schema import MMICTConfig as MMICTConfig
from mmict.config.schema import RicesConfig as RicesConfig

# The single-file module's __all__, unchanged.
__all__ = [
    "EXPERIMENTS_DIR",
    "LIGHTNING_PRECISIONS",
    "METHODS",
    "PROJECTORS",
    "DTYPES",
    "AIMConfig",
    "BankConfig",
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LoggerConfig",
    "MethodConfig",
    "OptimConfig",
    "ToyBackboneConfig",
    "ToyWorldConfig",
    "TrainerConfig",
    "FSDPSettings",
    "SlurmConfig",
    "key_takes_list",
    "list_experiments",
    "load_config",
    "save_config",
    "to_yaml",
]
