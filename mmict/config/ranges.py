"""The ranges, names and combinations of the merged config that `checks._check_semantics` does not check itself:
every number in the range its code can run with, every name one that exists, so that an impossible setting is
refused when the config loads, before the toy world or backbone is written, a run folder made or a step trained.

A setting's own module would refuse most of these too, but only when it runs: AdamW a negative learning rate once
the run folder exists, Lightning `devices=0` once the model is built, the toy pretraining a grounding layer after
its vision stage has trained, the evaluation an unknown post-processor after training.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.accelerators import AcceleratorRegistry
from omegaconf import DictConfig, OmegaConf

from mmict.backbones import FAMILIES
from mmict.config.errors import ConfigError, _choice_error, _did_you_mean, _where
from mmict.config.introspection import _SCHEMA_TYPES
from mmict.config.schema import EXPERIMENTS_DIR
from mmict.eval.postprocess import POSTPROCESSORS

# (key, what it counts) per bound; a null value is left alone (null has its own meaning, said in schema.py).
AT_LEAST_ONE: tuple[tuple[str, str], ...] = (
    ("trainer.max_steps", "optimizer steps"),
    ("trainer.devices", "devices per node"),
    ("trainer.val_check_interval", "steps between validations"),
    ("trainer.log_every_n_steps", "steps between logged points"),
    ("trainer.checkpoint_every_n_steps", "steps between checkpoints"),
    ("data.batch_size", "episodes per batch"),
    ("data.epoch_size", "episodes per streamed epoch"),
    ("data.max_text_tokens", "tokens a web text is cut to"),
    ("eval.batch_size", "queries per generation batch"),
    ("eval.rices.batch_size", "images per CLIP batch"),
    ("slurm.max_concurrent", "array tasks at once"),
    ("method.mmict.max_frames", "frames"),
    *((f"method.mmict.hub.{k}", "an M-Hub size") for k in (
        "hidden_size", "num_layers", "num_heads", "intermediate_size", "cross_attention_frequency",
        "num_query_tokens", "max_text_tokens")),
    *((f"backbone.toy.{k}", "a toy backbone size") for k in (
        "image_size", "patch_size", "vision_hidden_size", "vision_layers", "text_hidden_size", "text_layers",
        "num_heads", "intermediate_size", "max_position_embeddings", "pretrain_batch_size", "qformer_hidden_size",
        "qformer_layers", "num_query_tokens")),
    *((f"data.toy.{k}", "a toy world count") for k in (
        "num_docs", "vqa_train", "vqa_test", "binding_episodes", "binding_pool_per_class",
        "binding_queries_per_episode", "n_way", "concept_episodes", "concept_pool_per_class",
        "concept_queries_per_episode", "concept_tuning_per_class", "image_size")),
)
AT_LEAST_ZERO: tuple[tuple[str, str], ...] = (
    ("seed", "the run's random seed"),
    ("data.num_workers", "data loader worker processes (0: load in the main process)"),
    ("data.shuffle_buffer", "episodes in the shuffle buffer (0: no shuffling)"),
    ("data.val_episodes", "validation episodes"),
    ("data.min_image_size", "pixels"),
    ("eval.vision_cache.max_mb", "MB of image features held in memory (0: none, disk only)"),
    ("optim.warmup_steps", "steps"),
    ("optim.weight_decay", "a decay factor"),
    ("trainer.limit_val_batches", "validation batches (0: no validation)"),
    ("trainer.gradient_clip_val", "a gradient norm (null: no clipping)"),
    ("trainer.fsdp.sharded_above_params", "parameters"),
    *((f"backbone.toy.{k}", "a pretraining setting") for k in (
        "pretrain_steps", "pretrain_text_steps", "pretrain_vision_steps", "pretrain_qformer_steps",
        "pretrain_grounding_weight", "seed")),
    *((f"data.toy.{k}", "a toy world count") for k in (
        "val_docs", "concept_tuning_episodes", "concept_tuning_val_episodes", "seed")),
)
ABOVE_ZERO: tuple[tuple[str, str], ...] = (
    ("optim.lr", "a learning rate"),
    ("backbone.toy.pretrain_lr", "a learning rate"),
    ("backbone.lora.alpha", "LoRA's scale (alpha / r; 0 would switch the adapters off)"),
)
FRACTIONS: tuple[str, ...] = ("data.toy.binding_fraction", "data.toy.concept_fraction")
SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range; Lightning replaces a seed outside it with 0 (a warning)
# The toy pretraining's document kinds (mmict/toy/pretrain_data.py ToyPretrainStream: a kind it does not know
# silently became a word list).
PRETRAIN_KINDS: tuple[str, ...] = ("captions", "binding", "word_lists", "recall", "concept")
TOY_FAMILIES: tuple[str, ...] = ("llava", "blip2")  # mmict/toy/backbone.py family_of
# open_clip's precisions (mmict/eval/selection.py)
RICES_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16")
# SLURM's --time forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2})$")
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$")  # --mem: a size with an optional K/M/G/T unit


def check_ranges(cfg: DictConfig, origin: Mapping[str, str]) -> None:
    """Refuse the first impossible number, unknown name or impossible combination, naming the key, its value,
    where the value came from and a value that works."""

    def at(key: str) -> str:
        return f"config key '{key}' = {OmegaConf.select(cfg, key)!r} (from {_where(key, origin)})"

    def present(key: str) -> Any:
        """The value, or None where the key's section is null (backbone.toy=null, data.toy=null)."""
        return OmegaConf.select(cfg, key, default=None)

    for key, what in AT_LEAST_ONE:
        if (value := present(key)) is not None and value < 1:
            raise ConfigError(f"{at(key)} must be >= 1 ({what})")
    for key, what in AT_LEAST_ZERO:
        if (value := present(key)) is not None and not value >= 0:  # `not >=` also refuses nan
            raise ConfigError(f"{at(key)} must be >= 0 ({what})")
    for key, what in ABOVE_ZERO:
        if (value := present(key)) is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{at(key)} must be a finite number > 0 ({what}), e.g. {key}=1e-4")
    for key in FRACTIONS:
        if (value := present(key)) is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{at(key)} must be in [0, 1] (a fraction of the web documents)")
    guard = cfg.trainer.divergence_guard
    if guard is not None:
        for key in ("factor", "weight_factor"):
            if guard[key] is not None and not guard[key] > 1:
                raise ConfigError(f"{at(f'trainer.divergence_guard.{key}')} must be > 1 (a multiple of the run's "
                                  "starting value), or trainer.divergence_guard=null to turn the guard off")
        for key in ("patience", "warmup"):
            if guard[key] < 1:
                raise ConfigError(f"{at(f'trainer.divergence_guard.{key}')} must be >= 1 (steps)")
    if cfg.seed > SEED_MAX:
        raise ConfigError(f"{at('seed')} must be <= {SEED_MAX} (numpy's seed range)")
    if cfg.data.min_similarity is not None and not -1.0 <= cfg.data.min_similarity <= 1.0:
        raise ConfigError(f"{at('data.min_similarity')} must be in [-1, 1] (MMC4's image-text similarity is a "
                          "cosine; OpenFlamingo uses 0.24), or null to keep every image")
    _check_names(cfg, origin, at)
    _check_eval_lists(cfg, at)
    _check_toy_backbone(cfg, at)
    _check_combinations(cfg, at)
    _check_slurm(cfg, at)


def _check_names(cfg: DictConfig, origin: Mapping[str, str], at: Any) -> None:
    if cfg.backbone.family not in FAMILIES:
        raise _choice_error("backbone.family", cfg.backbone.family, sorted(FAMILIES), origin)
    if cfg.eval.postprocess is not None and cfg.eval.postprocess not in POSTPROCESSORS:
        raise _choice_error("eval.postprocess", cfg.eval.postprocess, list(POSTPROCESSORS), origin)
    if cfg.eval.rices.precision not in RICES_PRECISIONS:
        raise _choice_error("eval.rices.precision", cfg.eval.rices.precision, RICES_PRECISIONS, origin)
    accelerators = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
    if cfg.trainer.accelerator not in accelerators:
        raise _choice_error("trainer.accelerator", cfg.trainer.accelerator, accelerators, origin)
    if cfg.logger.wandb and not cfg.logger.project:
        raise ConfigError(f"{at('logger.project')} is empty: name the W&B project, or logger.wandb=false")
    if not cfg.data.corpus:
        raise ConfigError(f"{at('data.corpus')} is empty: name the web corpus's folder under data.root (web)")
    specs = [str(spec) for spec in cfg.eval.companions]
    for spec in specs:
        _check_companion(spec, at)
    if len(set(specs)) < len(specs):  # the same experiment with other overrides is another companion
        raise ConfigError(f"{at('eval.companions')} lists a companion twice: it would train and be reported twice")


def _check_companion(spec: str, at: Any) -> None:
    """A companion names an experiment that exists, and its own overrides are key=value pairs of known keys (the
    full companion config loads before training, in mmict/companions.py; this is before any work)."""
    name, *own = spec.split() or [""]
    path = Path(name)
    exists = (path.suffix in (".yaml", ".yml") and (path.is_file() or (EXPERIMENTS_DIR / path).is_file())) or any(
        (EXPERIMENTS_DIR / f"{name}{suffix}").is_file() for suffix in (".yaml", ".yml"))
    if not exists:
        files = (f.relative_to(EXPERIMENTS_DIR) for f in EXPERIMENTS_DIR.rglob("*.y*ml"))
        known = sorted(f.with_suffix("").as_posix() for f in files if "base" not in f.parts[:-1])
        near = _did_you_mean(difflib.get_close_matches(name, known, n=1, cutoff=0.5))
        raise ConfigError(f"{at('eval.companions')}: '{spec}' names no experiment (no {name}.yaml in "
                          f"{EXPERIMENTS_DIR}).{near} A companion is '<experiment> [key=value ...]', e.g. "
                          "'toy_mmict_binding trainer.max_steps=500'")
    for item in own:
        key = item.split("=", 1)[0]
        if "=" not in item or (key not in _SCHEMA_TYPES and re.sub(r"\[\d+\]$", "", key) not in _SCHEMA_TYPES):
            raise ConfigError(f"{at('eval.companions')}: '{spec}': '{item}' is not a key=value override of a "
                              "config key")


def _check_eval_lists(cfg: DictConfig, at: Any) -> None:
    seeds = list(cfg.eval.seeds)
    if not seeds or any(not 0 <= s <= SEED_MAX for s in seeds):
        raise ConfigError(f"{at('eval.seeds')} must be a non-empty list of seeds in [0, {SEED_MAX}] (one trial per "
                          "seed), e.g. eval.seeds=[0,1,2]")
    for key, values in (("eval.seeds", seeds), ("eval.shots", list(cfg.eval.shots))):
        if len(set(values)) < len(values):
            repeated = sorted({v for v in values if values.count(v) > 1})
            raise ConfigError(f"{at(key)} repeats {repeated}: each would be run and counted twice")
    new, least = cfg.eval.max_new_tokens, cfg.eval.min_new_tokens
    if new is not None and least is not None and least > new:
        raise ConfigError(f"{at('eval.min_new_tokens')} must be <= {at('eval.max_new_tokens')}")


def _check_toy_backbone(cfg: DictConfig, at: Any) -> None:
    toy = cfg.backbone.toy
    if toy is None:
        return
    if toy.family not in TOY_FAMILIES:
        raise ConfigError(f"{at('backbone.toy.family')}: the toy backbones are {' and '.join(TOY_FAMILIES)}")
    if cfg.backbone.family != toy.family:
        raise ConfigError(f"{at('backbone.family')} cannot load the toy backbone {at('backbone.toy.family')} "
                          f"builds. Fix: backbone.family={toy.family}")
    for key in ("vision_hidden_size", "text_hidden_size") + (("qformer_hidden_size",) if toy.family == "blip2"
                                                             else ()):
        if toy[key] % toy.num_heads:
            raise ConfigError(f"{at(f'backbone.toy.{key}')} must be a multiple of {at('backbone.toy.num_heads')} "
                              "(each head gets an equal share of the width)")
    if toy.pretrain_text_steps > toy.pretrain_steps:
        raise ConfigError(f"{at('backbone.toy.pretrain_text_steps')} must be <= {at('backbone.toy.pretrain_steps')}"
                          " (pretrain_steps counts every step, the word-list warm-up included)")
    if toy.pretrain_steps and toy.pretrain_grounding_weight and \
            not 1 <= toy.pretrain_grounding_layer <= toy.text_layers:
        raise ConfigError(f"{at('backbone.toy.pretrain_grounding_layer')} must be in 1..text_layers "
                          f"({toy.text_layers}), or backbone.toy.pretrain_grounding_weight=0")
    states = toy.text_layers + 1  # the embeddings and each layer's output (mmict/methods/aim/reader.py)
    if cfg.method.name == "aim" and not -states <= cfg.method.aim.layer < states:
        raise ConfigError(f"{at('method.aim.layer')} is out of range for the toy backbone's {toy.text_layers}-layer "
                          f"LM (backbone.toy.text_layers): use -1 for the final layer, or 0..{toy.text_layers}")
    if toy.pretrain_mix is not None:
        mix = {str(k): v for k, v in toy.pretrain_mix.items()}
        unknown = sorted(set(mix) - set(PRETRAIN_KINDS))
        if unknown:
            raise ConfigError(f"{at('backbone.toy.pretrain_mix')}: unknown document kind(s) {unknown}; the kinds "
                              f"are {', '.join(PRETRAIN_KINDS)}")
        if any(not w >= 0 for w in mix.values()) or not sum(mix.values()) > 0:
            raise ConfigError(f"{at('backbone.toy.pretrain_mix')}: weights must be >= 0 with a positive sum")


def _check_combinations(cfg: DictConfig, at: Any) -> None:
    if cfg.trainer.strategy == "fsdp" and cfg.trainer.accelerator == "cpu":
        raise ConfigError(f"{at('trainer.strategy')} shards the model over CUDA GPUs, and "
                          f"{at('trainer.accelerator')} asks for none. Fix: trainer.strategy=auto, or "
                          "trainer.accelerator=cuda")


def _check_slurm(cfg: DictConfig, at: Any) -> None:
    if not _SLURM_TIME.match(str(cfg.slurm.time)):
        raise ConfigError(f"{at('slurm.time')} is not a SLURM time limit: minutes, HH:MM:SS or D-HH:MM:SS "
                          "(e.g. 24:00:00, 2-00:00:00)")
    if cfg.slurm.mem is not None and not _SLURM_MEM.match(str(cfg.slurm.mem)):
        raise ConfigError(f"{at('slurm.mem')} is not a SLURM memory size: a number with an optional K/M/G/T "
                          "unit (e.g. 64G), or null for the partition's default")
