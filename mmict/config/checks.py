"""Checks of a config against the schema: each source's keys and section/value shapes before it is merged (leaf
types are checked by omegaconf's merge, whose errors are reworded here), dotted command-line keys, and the
semantic checks on the merged config (value ranges, choices, combinations of keys).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_modules.augment import AUGMENTATIONS
from data_modules.shots import ShotPolicy
from mmict.config.errors import (
    _COMMAND_LINE,
    ConfigError,
    _choice_error,
    _type_error,
    _unknown_key_error,
    _where,
)
from mmict.config.introspection import _SCHEMA_TYPES, _fields, _unwrap_optional
from mmict.config.ranges import check_ranges
from mmict.config.schema import (
    AIM_READ_FORMATS,
    AIM_READ_SPANS,
    BANK_STORES,
    DEMO_DESIGNS,
    DEMO_MODES,
    DTYPES,
    FSDP_SHARDING,
    FSDP_STATE_DICT_TYPES,
    LIGHTNING_PRECISIONS,
    PROJECTOR_INITS,
    PROJECTORS,
    SELECTIONS,
    SHOTS_PER,
    STRATEGIES,
    ExperimentConfig,
)
from mmict.eval.protocol import DEMO_IMAGE_VIEWS, OVER_CONTEXT, PROTOCOL_NAMES, VQA_SCORINGS, ZERO_SHOT_MODES
from mmict.eval.tasks import PROMPT_FORMATS, TASKS, get_task  # the one task table
from mmict.methods import METHOD_NAMES as METHODS  # the registry is the one list of method names
from mmict.methods.mmict.text_init import TEXT_INITS

# Keys an entry may not override: they would make it another run, not another task of this one.
_EXTRA_TASK_FIXED = ("eval.task", "eval.extra_tasks", "eval.companions", "eval.enabled")


def parse_extra_task(spec: str) -> tuple[str, list[str]]:
    """'<task> [eval.key=value ...]' -> (task, overrides); only `eval.*` keys other than `_EXTRA_TASK_FIXED`."""
    name, *own = str(spec).split()
    for item in own:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.startswith("eval.") or key in _EXTRA_TASK_FIXED:
            raise ConfigError(
                f"eval.extra_tasks: '{spec}': '{item}' is not an evaluation override. An entry is a task name "
                f"followed by eval.key=value overrides of its own (not {', '.join(_EXTRA_TASK_FIXED)}), e.g. "
                "'toy_concept eval.max_new_tokens=2 eval.shots=[0,2,4,8]'"
            )
    return name, own


def check_extra_tasks(specs: Sequence[str], tasks: Sequence[str], main_task: str) -> None:
    """Every entry names a known task other than `eval.task`, once."""
    names = [parse_extra_task(spec)[0] for spec in specs]
    for name in names:
        if name not in tasks:
            raise ConfigError(f"eval.extra_tasks: unknown task '{name}'; known tasks: {', '.join(sorted(tasks))}")
    repeated = sorted({n for n in names if names.count(n) > 1} | ({main_task} & set(names)))
    if repeated:
        raise ConfigError(f"eval.extra_tasks: {repeated} listed twice (eval.task={main_task} is always evaluated)")


def _check_tree(node: Mapping[Any, Any], dc: type, prefix: str, source: str, origin: dict[str, str]) -> None:
    """Reject unknown keys and section/value mix-ups; record which source set each key.

    Leaf types (int vs str ...) are left to omegaconf's merge, which converts what it safely can.
    """
    fields = _fields(dc)
    for raw_key, value in node.items():
        key = str(raw_key)
        full_key = f"{prefix}{key}"
        if key not in fields:
            if "." in key and source != _COMMAND_LINE:
                # `trainer.max_steps: 5` in YAML is a literal key with a dot, not a nested one.
                raise ConfigError(
                    f"unknown config key '{full_key}' (from {source}): YAML files need nested mappings, "
                    f"write it as '{key.split('.')[0]}:' with '{key.split('.', 1)[1]}:' indented below it"
                )
            raise _unknown_key_error(full_key, source)
        tp = fields[key]
        inner, nullable = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            if value is None:
                if not nullable:
                    raise _type_error(full_key, value, source)
                origin[full_key] = source
            elif isinstance(value, Mapping):
                origin[full_key] = source
                _check_tree(value, inner, full_key + ".", source, origin)
            else:
                raise _type_error(full_key, value, source)
        else:
            if isinstance(value, Mapping) and typing.get_origin(inner) is not dict:
                # Otherwise the nested keys would be reported as "unknown", hiding the real mistake.
                raise _type_error(full_key, dict(value), source)
            origin[full_key] = source


def _merge(cfg: DictConfig, data: Mapping[str, Any], source: str, origin: dict[str, str]) -> DictConfig:
    _check_tree(data, ExperimentConfig, "", source, origin)
    try:
        return OmegaConf.merge(cfg, data)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        full_key = getattr(e, "full_key", None)
        value = getattr(e, "value", None)
        if full_key:
            if full_key not in _SCHEMA_TYPES and re.sub(r"\[\d+\]$", "", full_key) not in _SCHEMA_TYPES:
                raise _unknown_key_error(full_key, source) from None
            raise _type_error(full_key, value, source) from None
        # Defensive: _check_tree should have caught anything without a key; keep omegaconf's words.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"invalid config (from {source}): {first_line}") from None


def _check_dotted_key(dotted: str) -> None:
    """Name the whole dotted key when part of it is unknown: for ``trainr.max_steps=5`` the user should
    read 'trainr.max_steps', not just 'trainr'."""
    tp: Any = ExperimentConfig
    for i, part in enumerate(dotted.split(".")):
        inner, _ = _unwrap_optional(tp)
        if not dataclasses.is_dataclass(inner) or part not in _fields(inner):
            if dataclasses.is_dataclass(inner) or i == 0:
                raise _unknown_key_error(dotted, _COMMAND_LINE)
            return  # a path through a leaf: _check_tree reports it as a type error on that leaf
        tp = _fields(inner)[part]


def _check_semantics(cfg: DictConfig, origin: Mapping[str, str]) -> None:
    def at(key: str) -> str:
        return f"'{key}' = {OmegaConf.select(cfg, key)!r} (from {_where(key, origin)})"

    for key in ("data.min_shots", "data.max_shots"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"config key {at(key)} must be >= 0 (it is a number of demonstrations)")
    if cfg.data.min_shots > cfg.data.max_shots:
        raise ConfigError(
            f"config key {at('data.min_shots')} must be <= {at('data.max_shots')}: training samples k from "
            f"[min_shots, max_shots]. Fix: e.g. data.max_shots={cfg.data.min_shots} "
            f"or data.min_shots={cfg.data.max_shots}"
        )
    if cfg.data.shots is not None and cfg.data.shots < 0:
        raise ConfigError(f"config key {at('data.shots')} must be >= 0 (it is a number of demonstrations)")
    if cfg.data.shots_per not in SHOTS_PER:
        raise _choice_error("data.shots_per", cfg.data.shots_per, SHOTS_PER, origin)
    try:
        ShotPolicy.from_config(cfg.data)
    except ValueError as err:
        raise ConfigError(f"config key {at('data.shot_schedule')}: {err}") from None
    if cfg.method.name not in METHODS:
        raise _choice_error("method.name", cfg.method.name, METHODS, origin)
    if cfg.method.aim.projector not in PROJECTORS:
        raise _choice_error("method.aim.projector", cfg.method.aim.projector, PROJECTORS, origin)
    if cfg.method.aim.projector_init not in PROJECTOR_INITS:
        raise _choice_error("method.aim.projector_init", cfg.method.aim.projector_init, PROJECTOR_INITS, origin)
    if cfg.method.aim.projector_init == "identity" and cfg.method.aim.projector != "linear":
        raise ConfigError(f"config key {at('method.aim.projector_init')}=identity needs method.aim.projector=linear "
                          f"(got {cfg.method.aim.projector})")
    if cfg.method.aim.mlp_hidden is not None and cfg.method.aim.mlp_hidden <= 0:
        raise ConfigError(
            f"config key {at('method.aim.mlp_hidden')} must be > 0, or null for the model width"
        )
    if cfg.method.aim.read_format not in AIM_READ_FORMATS:
        raise _choice_error("method.aim.read_format", cfg.method.aim.read_format, AIM_READ_FORMATS, origin)
    if cfg.method.aim.read_span not in AIM_READ_SPANS:
        raise _choice_error("method.aim.read_span", cfg.method.aim.read_span, AIM_READ_SPANS, origin)
    if any(not cue for cue in cfg.method.aim.answer_cues):
        raise ConfigError(f"config key {at('method.aim.answer_cues')} holds an empty cue: every cue must be text")
    if cfg.backbone.dtype not in DTYPES:
        raise _choice_error("backbone.dtype", cfg.backbone.dtype, DTYPES, origin)
    if cfg.trainer.precision not in LIGHTNING_PRECISIONS:
        raise _choice_error("trainer.precision", cfg.trainer.precision, LIGHTNING_PRECISIONS, origin)
    if cfg.trainer.strategy not in STRATEGIES:
        raise _choice_error("trainer.strategy", cfg.trainer.strategy, STRATEGIES, origin)
    if cfg.trainer.fsdp.sharding_strategy not in FSDP_SHARDING:
        raise _choice_error("trainer.fsdp.sharding_strategy", cfg.trainer.fsdp.sharding_strategy, FSDP_SHARDING,
                            origin)
    if cfg.trainer.fsdp.state_dict_type not in FSDP_STATE_DICT_TYPES:
        raise _choice_error("trainer.fsdp.state_dict_type", cfg.trainer.fsdp.state_dict_type, FSDP_STATE_DICT_TYPES,
                            origin)
    for key in ("trainer.num_nodes", "slurm.nodes", "slurm.gpus_per_node", "slurm.cpus_per_task",
                "slurm.signal_seconds"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"config key {at(key)} must be >= 1")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(
            f"config key {at('optim.betas')} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]"
        )
    shots = list(cfg.eval.shots)
    if not shots or any(s < 0 for s in shots):
        raise ConfigError(
            f"config key {at('eval.shots')} must be a non-empty list of shot counts >= 0, "
            f"e.g. eval.shots=[0,2,4]"
        )
    if cfg.eval.selection not in SELECTIONS:
        raise _choice_error("eval.selection", cfg.eval.selection, SELECTIONS, origin)
    if cfg.eval.bank.store not in BANK_STORES:
        raise _choice_error("eval.bank.store", cfg.eval.bank.store, BANK_STORES, origin)
    for key, allowed in (("eval.protocol", PROTOCOL_NAMES), ("eval.zero_shot", ZERO_SHOT_MODES),
                         ("eval.demo_image_view", DEMO_IMAGE_VIEWS), ("eval.over_context", OVER_CONTEXT),
                         ("eval.vqa_scoring", VQA_SCORINGS)):
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in allowed:
            raise _choice_error(key, value, allowed, origin)
    if (cfg.eval.min_new_tokens or 0) < 0:
        raise ConfigError(f"config key {at('eval.min_new_tokens')} must be >= 0 (or null: the protocol's)")
    for key in ("eval.num_queries", "eval.demo_pool_size", "eval.num_beams", "eval.max_new_tokens"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key {at(key)} must be >= 1 (or null: the protocol's)")
    if cfg.eval.bank.batch_size < 1:
        raise ConfigError(f"config key {at('eval.bank.batch_size')} must be >= 1")
    if cfg.data.task is not None and cfg.data.task not in TASKS:
        raise _choice_error("data.task", cfg.data.task, sorted(TASKS), origin)
    if cfg.data.prompt_format not in PROMPT_FORMATS:
        raise _choice_error("data.prompt_format", cfg.data.prompt_format, list(PROMPT_FORMATS), origin)
    if cfg.data.augment not in AUGMENTATIONS:
        raise _choice_error("data.augment", cfg.data.augment, AUGMENTATIONS, origin)
    if cfg.data.augment != "none" and cfg.data.task is None:
        raise ConfigError(f"config key {at('data.augment')} augments a task's training images (data.task); the web "
                          "corpus is not augmented. Fix: data.augment=none, or set data.task")
    if cfg.eval.task not in TASKS:  # checked now, not after training; before its prompt format
        raise _choice_error("eval.task", cfg.eval.task, sorted(TASKS), origin)
    for name in {cfg.eval.task, cfg.data.task} - {None}:
        try:  # a format that does not define the task fails now, not after training
            get_task(name, cfg.data.prompt_format)
        except ValueError as e:
            raise ConfigError(f"config key {at('data.prompt_format')}: {e}") from None
    check_extra_tasks(list(cfg.eval.extra_tasks), list(TASKS), cfg.eval.task)
    if cfg.method.demo_design not in DEMO_DESIGNS:
        raise _choice_error("method.demo_design", cfg.method.demo_design, DEMO_DESIGNS, origin)
    if cfg.method.name != "mmict" and cfg.method.demo_design != "fused":
        raise ConfigError(
            f"config key {at('method.demo_design')} chooses MMICT's demonstration design; method.name="
            f"{cfg.method.name} has its own. Fix: method.name=mmict, or drop method.demo_design"
        )
    m = cfg.method.mmict
    if m.text_init is not None and m.text_init not in TEXT_INITS:
        raise _choice_error("method.mmict.text_init", m.text_init, TEXT_INITS, origin)
    if cfg.method.name == "mmict" and m.text_init == "bert" and m.hub_tokenizer is None:
        raise ConfigError(f"config key {at('method.mmict.text_init')}=bert loads the M-Hub's text branch from the "
                          "BERT checkpoint method.mmict.hub_tokenizer names, and that is null (the LLM's tokenizer). "
                          "Fix: method.mmict.hub_tokenizer=bert-base-uncased (or a local BERT folder), or "
                          "method.mmict.text_init=query_branch")
    modes = DEMO_DESIGNS if cfg.method.name == "mmict" else DEMO_MODES
    for mode in cfg.eval.demo_modes or ():
        if mode not in modes:
            raise _choice_error("eval.demo_modes", mode, modes, origin)
    if cfg.method.name == "finetune" and "fused" in (cfg.eval.demo_modes or ()):
        raise ConfigError(
            f"config key {at('eval.demo_modes')} asks for fused demos, which method.name={cfg.method.name} "
            "does not make. Fix: eval.demo_modes=[none] (or [none,images,text])"
        )
    lora = cfg.backbone.lora
    if lora.r < 0 or not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"config key {at('backbone.lora')} needs r >= 0 (0 = no LoRA) and dropout in [0, 1)")
    if cfg.method.name == "finetune" and lora.r == 0:
        raise ConfigError(
            "method.name=finetune trains LoRA adapters on the language model: set backbone.lora.r (e.g. "
            "backbone.lora.r=8)"
        )
    check_ranges(cfg, origin)  # every other number, name and combination (mmict/config/ranges.py)
