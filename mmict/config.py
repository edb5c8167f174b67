"""Experiment configuration: typed schema, YAML inheritance, CLI overrides, validation.

An experiment is a YAML file under ``experiments/`` (``toy_aim`` -> ``experiments/toy_aim.yaml``).
It may inherit from other files with a top-level ``base:`` key; the final config is

    schema defaults <- bases (in order, recursively) <- the experiment file <- CLI ``key=value`` overrides

and is returned as a structured :class:`~omegaconf.DictConfig`, so ``cfg.trainer.max_steps`` is an ``int``
and assigning a wrong type or an unknown key later fails loudly too.

Every problem a user can cause (typo in a key, wrong type, bad value, missing file) raises
:class:`ConfigError` with one message that says what is wrong, where it came from and how to fix it, before
anything expensive (model loading, data writing) runs.
"""

# The schema keeps ``Optional[...]`` instead of ``X | None`` because omegaconf 2.3 (allowed by
# pyproject.toml) cannot read PEP 604 unions in structured configs; 2.4 can, but we must not depend on it.
# ruff: noqa: UP007, UP045

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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

# Found relative to this file (not the cwd) so `python -m mmict.train toy_aim` works from any directory.
EXPERIMENTS_DIR: Path = Path(__file__).resolve().parent.parent / "experiments"

# Methods the training entry point knows how to build. Extend this when a new LightningModule lands.
METHODS: tuple[str, ...] = ("aim", "finetune", "mmict")
DEMO_DESIGNS: tuple[str, ...] = ("fused", "concat", "text", "none")  # mmict.modules.mmict.DEMO_DESIGNS
PROJECTORS: tuple[str, ...] = ("linear", "mlp")
PROJECTOR_INITS: tuple[str, ...] = ("default", "identity")
# "auto": follows the effective precision (callbacks/precision.py): bfloat16 under bf16-*, else float32.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "auto")
STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp")
FSDP_SHARDING: tuple[str, ...] = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")  # callbacks/fsdp.py
FSDP_STATE_DICT_TYPES: tuple[str, ...] = ("auto", "sharded", "full")
SHOTS_PER: tuple[str, ...] = ("episode", "step")
DEMO_MODES: tuple[str, ...] = ("fused", "images", "text", "none")  # mmict.prompts.DEMO_MODES
SELECTIONS: tuple[str, ...] = ("random", "rices")  # mmict.eval.selection.make_selector
BANK_STORES: tuple[str, ...] = ("hidden", "fused")  # mmict.bank.STORES
# Lightning 2.x precision strings; checked here so a typo fails at load time, not after the model is built.
LIGHTNING_PRECISIONS: tuple[str, ...] = (
    "32-true",
    "32",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64-true",
    "auto",  # bf16-mixed where the GPU supports it, else 32-true (callbacks/precision.py)
)

_COMMAND_LINE = "command line"
_SCHEMA_DEFAULT = "schema default"


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------


@dataclass
class ToyBackboneConfig:
    """Sizes of the tiny random-init LLaVA built when the backbone folder does not exist yet."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    text_hidden_size: int = 96
    text_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    seed: int = 0
    # Pretraining from scratch on generated documents (captions, binding episodes over the pretrain
    # word pool, word lists; see data_modules/toy_pretrain.py), run once and cached, so the frozen model
    # AIM sits on reads images and does in-context binding; 0 keeps it random.
    pretrain_steps: int = 0  # all steps, the word-list warm-up included
    pretrain_text_steps: int = 0  # warm-up on word lists only (where copying, an induction head, is learnt)
    pretrain_vision_steps: int = 0  # the vision tower's own stage first (reads colour, shape, position)
    # Stage 2's grounding loss: the LM's hidden states (at `pretrain_grounding_layer`) at the text
    # after an image predict that image's attributes, as labelled by the vision stage's heads. 0 = off.
    pretrain_grounding_weight: float = 0.0
    pretrain_grounding_layer: int = 2
    pretrain_batch_size: int = 16
    pretrain_lr: float = 1e-3


@dataclass
class LoraSettings:
    """peft LoRA on the language model (the fine-tuning baseline); r=0 leaves the backbone fully frozen."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # null: the family's attention projections


@dataclass
class BackboneConfig:
    family: str = "llava"  # adapter family: llava, llava_next, qwen2_vl, qwen2_5_vl, idefics2, idefics3, blip2
    name_or_path: str = "data/toy/backbone"  # hub id or local folder
    # float32 | bfloat16 | float16 | auto (follows trainer.precision); what the hardware cannot run falls back
    # to float32 with a warning (callbacks/precision.py)
    dtype: str = "float32"
    chat_template: bool = True  # wrap the query in the model's chat template when it has one
    lora: LoraSettings = field(default_factory=LoraSettings)
    # When set and name_or_path does not exist, a tiny random-init model is built there.
    toy: Optional[ToyBackboneConfig] = field(default_factory=ToyBackboneConfig)


@dataclass
class AIMConfig:
    layer: int = -1  # which hidden-state layer to read at demo text positions (-1 = final)
    final_norm: bool = True  # apply the LM's final norm to a non-final layer's states
    projector: str = "linear"  # linear | mlp
    mlp_hidden: Optional[int] = None  # hidden width of the mlp projector (default: d)
    # default: PyTorch's Linear init; identity (linear only): fused tokens start as the hidden states
    # themselves, a fit start when `layer` is an early one whose states still look like input embeddings.
    projector_init: str = "default"


@dataclass
class HubSizes:
    """A fresh M-Hub's Q-Former sizes (ignored when it starts from a BLIP-2 checkpoint, which has its own)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # a cross-attention block every N layers (BLIP-2: 2)
    num_query_tokens: int = 32
    max_text_tokens: int = 64  # M-Hub text positions (longer demo/prompt texts are truncated)


@dataclass
class MMICTConfig:
    hub: HubSizes = field(default_factory=HubSizes)
    init_from_backbone: bool = True  # BLIP-2 backbones: start from the checkpoint's Q-Former, queries, projection
    hub_tokenizer: Optional[str] = None  # the M-Hub's text tokenizer (e.g. bert-base-uncased); null: the LLM's
    eoc_trainable: bool = False  # the <eoc> separator's embedding trains (a saved copy) or stays the frozen row
    temporal_embedding: bool = False  # video: a learned per-frame embedding on the frames' vision tokens
    max_frames: int = 32  # frames the temporal embedding covers


@dataclass
class MethodConfig:
    name: str = "aim"  # aim | finetune | mmict
    # How demonstrations enter the prompt (MMICT): fused (M-Hub text features), concat (vanilla ICT: visual
    # features + demo text), text (demo text only), none (vanilla fine-tune). AIM's own is fused.
    demo_design: str = "fused"
    aim: AIMConfig = field(default_factory=AIMConfig)
    mmict: MMICTConfig = field(default_factory=MMICTConfig)


@dataclass
class ToyWorldConfig:
    """Size of the self-made toy world (interleaved docs, a VQA task, a binding task) under data.root."""

    num_docs: int = 3000
    val_docs: int = 200
    vqa_train: int = 500
    vqa_test: int = 300
    binding_fraction: float = 0.5  # of the web documents that are binding episodes (tuning word pool)
    binding_episodes: int = 100  # downstream binding episodes (eval word pool)
    binding_pool_per_class: int = 8  # demo pool images per class and episode
    binding_queries_per_episode: int = 3
    n_way: int = 2  # classes per binding episode
    image_size: int = 32
    seed: int = 0


@dataclass
class DataConfig:
    root: str = "data/toy"
    # When set, the toy world is written to root (once).
    toy: Optional[ToyWorldConfig] = field(default_factory=ToyWorldConfig)
    # Demos per training episode (the DemoSampler callback, data_modules/shots.py): `shots` fixes k; else
    # `shot_schedule` [[from_step, min, max], ...]; else k ~ uniform[min_shots, max_shots]. Validation: max.
    min_shots: int = 1
    max_shots: int = 4
    shots: Optional[int] = None
    shot_schedule: Optional[list[list[int]]] = None
    shots_per: str = "episode"  # episode: each episode draws its k | step: all episodes of a batch share it
    batch_size: int = 8
    num_workers: int = 1
    epoch_size: int = 2000
    shuffle_buffer: int = 500
    val_episodes: int = 64
    # Training episodes: null = cut from the interleaved web corpus (AIM); a downstream task name (e.g. vqav2)
    # = query and demos drawn from that task's train split (MMICT), validated on `val_split`.
    task: Optional[str] = None
    val_split: str = "val"
    corpus: str = "web"  # the web corpus's folder under root (`mmict data convert mmc4 --out <root>/<corpus>/...`)
    # Web documents: drop images whose MMC4 image-text similarity is below this (OpenFlamingo: 0.24), and
    # images whose shorter side is below min_image_size pixels; both counted in the skip report.
    min_similarity: Optional[float] = None
    min_image_size: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class FSDPSettings:
    """`trainer.strategy: fsdp` (callbacks/fsdp.py): units per transformer block, trainable weights in their own."""

    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD | NO_SHARD
    activation_checkpointing: bool = True  # on the LM's decoder layers
    # Checkpoints hold the trainable weights + optimizer + loop state only. sharded: one shard per rank, no
    # gather (consolidate: python -m lightning.pytorch.utilities.consolidate_checkpoint CKPT_DIR); full: one
    # file on rank 0; auto: sharded when the model has >= sharded_above_params parameters.
    state_dict_type: str = "auto"
    sharded_above_params: int = 1_000_000_000
    cpu_offload: bool = False


@dataclass
class TrainerConfig:
    max_steps: int = 300
    precision: str = "32-true"  # a Lightning precision, or auto (bf16-mixed where the GPU has bf16, else 32-true)
    accelerator: str = "auto"
    devices: int = 1
    val_check_interval: int = 100
    limit_val_batches: int = 8
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    checkpoint_every_n_steps: int = 100
    progress_bar: bool = True
    strategy: str = "auto"  # auto (one device; ddp on several) | ddp | fsdp (see trainer.fsdp)
    num_nodes: int = 1  # SLURM: `mmict sweep` sets it from slurm.nodes
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)


@dataclass
class LoggerConfig:
    wandb: bool = True
    offline: bool = True
    project: str = "mmict"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None  # W&B group; `mmict sweep` sets it to the sweep id


@dataclass
class RicesConfig:
    """CLIP image features for RICES demo selection (open_clip), cached on disk per model and pool."""

    model: str = "ViT-B-32"  # open_clip name, hf-hub:org/repo, or local-dir:/path
    pretrained: Optional[str] = "openai"  # tag or checkpoint file (ignored with hf-hub:/local-dir:)
    precision: str = "fp32"
    batch_size: int = 64
    device: Optional[str] = None  # null: cuda if available
    download_dir: Optional[str] = None  # open_clip's weights cache (null: the Hugging Face cache)
    cache_dir: Optional[str] = "data/rices_cache"  # pool features, shared across runs; null: no cache


@dataclass
class BankConfig:
    """The demonstration bank (mmict/bank.py): each pool demo read by the frozen model once, kept on disk."""

    enabled: bool = True  # AIM's fused demos come from the bank (computed once per backbone, layer, demo)
    dir: Optional[str] = None  # null: <data.root>/bank
    store: str = "hidden"  # hidden (reader output: shared by every projector) | fused (keyed by the projector)
    batch_size: int = 16  # demos read per backbone call while building


@dataclass
class EvalConfig:
    enabled: bool = True
    shots: list[int] = field(default_factory=lambda: [0, 2, 4])
    num_queries: int = 200
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 32
    max_new_tokens: Optional[int] = None  # null: the task's own (short answers 5, captions longer)
    num_beams: Optional[int] = None  # null: the task's own (greedy for VQA)
    postprocess: Optional[str] = None  # null: the task's own; or vqa | caption | first_word | none
    # Demo selection: random (seeded, OpenFlamingo's protocol; in-episode for binding tasks) or rices
    # (most CLIP-similar pool images, most similar last; the same demos for every seed).
    selection: str = "random"
    rices: RicesConfig = field(default_factory=RicesConfig)
    task: str = "toy_vqa"
    # how demos are shown at evaluation: fused (the method's own), images (vanilla ICL), text, concat (MMICT's
    # vanilla ICT), none; null: the method's own (AIM: fused, images, text; MMICT: its demo_design).
    demo_modes: Optional[list[str]] = None
    bank: BankConfig = field(default_factory=BankConfig)
    # Experiments trained and evaluated after this run, on its backbone, data root and evaluation settings;
    # their rows join this run's table (mmict/companions.py). toy_aim adds MMICT this way.
    companions: list[str] = field(default_factory=list)


@dataclass
class SlurmConfig:
    """Resources of the job arrays `mmict sweep` writes (mmict/slurm.py); one array task per grid point."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 1  # = tasks per node (one process per GPU) = trainer.devices
    cpus_per_task: int = 8
    mem: Optional[str] = None  # e.g. 64G; null: the partition's default
    time: str = "24:00:00"
    constraint: Optional[str] = None  # e.g. a100|h100
    max_concurrent: Optional[int] = None  # at most this many array tasks at once (--array=0-N%max)
    signal_seconds: int = 90  # SIGUSR1 this long before the time limit: Lightning checkpoints and requeues
    python: str = ".venv/bin/python"  # the interpreter srun starts (after `setup`)
    setup: list[str] = field(default_factory=list)  # shell lines before srun: module load ..., conda activate ...
    extra_sbatch: list[str] = field(default_factory=list)  # more options, e.g. ["--exclusive", "--mail-type=FAIL"]
    log_dir: Optional[str] = None  # null: <sweep folder>/logs


@dataclass
class ExperimentConfig:
    name: str = ""  # run name; defaults to the experiment file stem
    seed: int = 0
    run_root: str = "runs"  # runs go to <run_root>/<name>/<timestamp>/
    # A fixed run folder (reused, e.g. by a requeued SLURM task to find its checkpoint); null: a new
    # timestamped one (under SLURM: <run_root>/<name>/slurm-<job id>, the same on every rank).
    run_dir: Optional[str] = None
    # auto: an interrupted run of this same config (unfinished, with a checkpoint) is continued where its last
    # checkpoint left it, data stream and RNGs included; never: always a new run; or a checkpoint / run folder.
    resume: str = "auto"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# --------------------------------------------------------------------------------------------------------
# Schema introspection (for key checks, suggestions and readable type names)
# --------------------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, nullable) for ``Optional[X]``; (tp, False) otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@functools.cache
def _fields(dc: type) -> dict[str, Any]:
    """Field name -> resolved annotation (``from __future__ import annotations`` makes them strings)."""
    hints = typing.get_type_hints(dc)
    return {f.name: hints[f.name] for f in dataclasses.fields(dc)}


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(_unwrap_optional(tp)[0])


def _schema_types(dc: type = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Every valid full dotted key (sections and leaves) -> its annotation."""
    out: dict[str, Any] = {}
    for name, tp in _fields(dc).items():
        key = f"{prefix}{name}"
        out[key] = tp
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            out.update(_schema_types(inner, key + "."))
    return out


_SCHEMA_TYPES: dict[str, Any] = _schema_types()


def _type_name(tp: Any) -> str:
    inner, nullable = _unwrap_optional(tp)
    if dataclasses.is_dataclass(inner):
        name = f"a mapping with keys {', '.join(_fields(inner))}"
    elif typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner) or (Any,)
        name = f"list of {_type_name(elem)}"
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner)
    return f"{name} or null" if nullable else name


def _expected_type(full_key: str) -> str | None:
    """Readable expected type of a dotted key, also for list items like ``eval.shots[1]``."""
    base = re.sub(r"\[\d+\]$", "", full_key)
    tp = _SCHEMA_TYPES.get(base)
    if tp is None:
        return None
    if base != full_key:
        inner, _ = _unwrap_optional(tp)
        args = typing.get_args(inner)
        return _type_name(args[0]) if args else None
    return _type_name(tp)


def _suggest(full_key: str) -> list[str]:
    """Nearest valid full dotted keys for an unknown one.

    Siblings in the same section come first (a typo in the leaf is the common case), then the same leaf
    name in other sections (``trainer.batch_size`` -> ``data.batch_size``), then whole-key matches, which
    are what catch typos in the section name itself (``trainr.max_steps``).
    """
    parent, _, leaf = full_key.rpartition(".")
    found: list[str] = []
    parent_tp = _SCHEMA_TYPES.get(parent) if parent else ExperimentConfig
    if parent_tp is not None and _is_section(parent_tp):
        siblings = list(_fields(_unwrap_optional(parent_tp)[0]))
        prefix = f"{parent}." if parent else ""
        found += [prefix + s for s in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.6)]
    found += [k for k in _SCHEMA_TYPES if k.rpartition(".")[2] == leaf and k != full_key]
    # Whole-key matches: ancestors are excluded ('trainer' is "close" to 'trainer.zzz' but never meant).
    # Within a valid section the shared prefix inflates every sibling's score, so there only near-certain
    # matches count; a loose cutoff is kept for when the section name itself is the typo.
    parent_ok = parent_tp is not None and _is_section(parent_tp)
    candidates = [k for k in _SCHEMA_TYPES if not full_key.startswith(k + ".")]
    found += difflib.get_close_matches(full_key, candidates, n=3, cutoff=0.8 if parent_ok or found else 0.6)
    return list(dict.fromkeys(found))[:3]


def _did_you_mean(options: Sequence[str]) -> str:
    if not options:
        return ""
    quoted = [f"'{o}'" for o in options]
    if len(quoted) == 1:
        return f" Did you mean {quoted[0]}?"
    return f" Did you mean {', '.join(quoted[:-1])} or {quoted[-1]}?"


# --------------------------------------------------------------------------------------------------------
# Checking one source (a YAML file or the command line) against the schema
# --------------------------------------------------------------------------------------------------------


def _unknown_key_error(full_key: str, source: str) -> ConfigError:
    msg = f"unknown config key '{full_key}' (from {source})."
    suggestions = _suggest(full_key)
    if suggestions:
        msg += _did_you_mean(suggestions)
    else:
        parent = full_key.rpartition(".")[0]
        parent_tp = _SCHEMA_TYPES.get(parent) if parent else ExperimentConfig
        if parent_tp is not None and _is_section(parent_tp):
            valid = ", ".join(_fields(_unwrap_optional(parent_tp)[0]))
            msg += f" Valid keys {'under ' + repr(parent) if parent else 'at the top level'}: {valid}."
    return ConfigError(msg)


def _type_error(full_key: str, value: Any, source: str, expected: str | None = None) -> ConfigError:
    expected = expected or _expected_type(full_key) or "a value of the schema's type"
    return ConfigError(f"config key '{full_key}' = {value!r} (from {source}): expected {expected}")


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
            if isinstance(value, Mapping):
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


# --------------------------------------------------------------------------------------------------------
# Files, inheritance and overrides
# --------------------------------------------------------------------------------------------------------


def _display(path: Path) -> str:
    """Short path for messages: relative to the cwd when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def list_experiments(experiments_dir: Path | str | None = None) -> list[str]:
    """Names accepted by :func:`load_config` (``sub/name`` for files in subfolders).

    Files under ``base/`` folders are shared pieces, not experiments, so they are not listed (they can still
    be loaded by path).
    """
    root = Path(experiments_dir) if experiments_dir is not None else EXPERIMENTS_DIR
    if not root.is_dir():
        return []
    names = []
    for path in root.rglob("*"):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        rel = path.relative_to(root)
        if "base" in rel.parts[:-1]:
            continue
        names.append(rel.with_suffix("").as_posix())
    return sorted(set(names))


def _resolve_experiment(experiment: str | Path, root: Path) -> Path:
    given = Path(experiment)
    if given.suffix in (".yaml", ".yml") or isinstance(experiment, Path):
        for candidate in (given, root / given):
            if candidate.is_file():
                return candidate.resolve()
        raise ConfigError(
            f"experiment file '{experiment}' not found (looked in the current directory and in {root}). "
            f"Pass an existing .yaml path or an experiment name such as: "
            f"{', '.join(list_experiments(root)) or '(none found)'}"
        )
    for suffix in (".yaml", ".yml"):
        candidate = root / f"{experiment}{suffix}"
        if candidate.is_file():
            return candidate.resolve()
    available = list_experiments(root)
    msg = f"unknown experiment '{experiment}' (no {experiment}.yaml in {root})."
    msg += _did_you_mean(difflib.get_close_matches(str(experiment), available, n=1, cutoff=0.5))
    msg += f" Available experiments: {', '.join(available) if available else '(none)'}."
    raise ConfigError(msg)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file '{_display(path)}' not found") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"could not parse YAML in '{_display(path)}': {e}") from None
    if isinstance(loaded, ListConfig):
        raise ConfigError(
            f"'{_display(path)}' must contain a mapping of config keys at the top level, not a list"
        )
    data = OmegaConf.to_container(loaded, resolve=False)
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


def _resolve_base(ref: str, including: Path, root: Path) -> Path:
    """Bases are relative to the experiments dir; the including file's folder is a fallback so that
    experiment files kept elsewhere can still inherit from their neighbours."""
    ref_path = Path(ref)
    candidates = [ref_path] if ref_path.is_absolute() else [root / ref_path, including.parent / ref_path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    tried = ", ".join(_display(c) for c in candidates)
    raise ConfigError(
        f"base '{ref}' listed in '{_display(including)}' not found (tried {tried}). "
        f"Base paths are relative to the experiments dir, e.g. 'base: [base/default.yaml]'"
    )


def _expand(path: Path, root: Path, stack: tuple[Path, ...] = ()) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (file, its keys without ``base``) in merge order: bases first (depth first), then the file."""
    if path in stack:
        chain = " -> ".join(_display(p) for p in (*stack, path))
        raise ConfigError(f"cycle in 'base:' inheritance: {chain}. Remove one of these 'base:' entries")
    data = _read_yaml(path)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(
            f"'base' in '{_display(path)}' = {bases!r}: expected a path or a list of paths relative to the "
            f"experiments dir, e.g. 'base: [base/default.yaml]'"
        )
    for ref in bases:
        yield from _expand(_resolve_base(ref, path, root), root, (*stack, path))
    yield path, data


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"malformed override {item!r}: expected key=value with a dotted key, "
            f"e.g. trainer.max_steps=50 or eval.shots=[0,2,4]"
        )
    _check_dotted_key(key)
    if value == "":
        # YAML reads an empty value as null; `name=` almost always means "empty string" (as in Hydra).
        return _nest(key, "")
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
    except yaml.YAMLError as e:
        # The marked error's `problem` is the useful part; its position refers to a one-line string.
        first = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(
            f"could not parse the value of override {item!r} (from {_COMMAND_LINE}) as YAML: {first}. "
            f"Quote it for the shell if it contains spaces or brackets, e.g. '{key}=[0,2,4]'"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"malformed override {item!r}: {e}. Expected key=value, e.g. trainer.max_steps=50"
        ) from None
    data = OmegaConf.to_container(parsed, resolve=False)
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


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


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


# --------------------------------------------------------------------------------------------------------
# Semantic checks
# --------------------------------------------------------------------------------------------------------


def _where(key: str, origin: Mapping[str, str]) -> str:
    # A key inherits the source of its nearest recorded ancestor (e.g. a whole section set on the CLI).
    probe = key
    while probe:
        if probe in origin:
            return origin[probe]
        probe = probe.rpartition(".")[0]
    return _SCHEMA_DEFAULT


def _choice_error(key: str, value: Any, choices: Sequence[str], origin: Mapping[str, str]) -> ConfigError:
    options = ", ".join(repr(c) for c in choices)
    msg = f"config key '{key}' = {value!r} (from {_where(key, origin)}): expected one of {options}."
    msg += _did_you_mean(difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5))
    return ConfigError(msg)


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
        from data_modules.shots import ShotPolicy

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
    if cfg.eval.bank.batch_size < 1:
        raise ConfigError(f"config key {at('eval.bank.batch_size')} must be >= 1")
    if cfg.data.task is not None:
        from data_modules.downstream import TASK_DIRS

        if cfg.data.task not in TASK_DIRS:
            raise _choice_error("data.task", cfg.data.task, sorted(TASK_DIRS), origin)
    if cfg.method.demo_design not in DEMO_DESIGNS:
        raise _choice_error("method.demo_design", cfg.method.demo_design, DEMO_DESIGNS, origin)
    if cfg.method.name != "mmict" and cfg.method.demo_design != "fused":
        raise ConfigError(
            f"config key {at('method.demo_design')} chooses MMICT's demonstration design; method.name="
            f"{cfg.method.name} has its own. Fix: method.name=mmict, or drop method.demo_design"
        )
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


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def _unresolved(cfg: DictConfig, dotted: str) -> Any:
    """The raw ``${...}`` text at a key (selecting it would try, and fail, to resolve it again)."""
    node: Any = OmegaConf.to_container(cfg, resolve=False)
    for part in re.split(r"\.|\[(\d+)\]", dotted):
        if not part:
            continue
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return "?"
    return node


def load_config(
    experiment: str | Path,
    overrides: Sequence[str] = (),
    experiments_dir: Path | str | None = None,
) -> DictConfig:
    """Load, merge and validate an experiment.

    ``experiment`` is a name (``"toy_aim"`` -> ``<experiments_dir>/toy_aim.yaml``) or a path to a YAML file.
    ``overrides`` are ``key=value`` strings whose values are parsed as YAML (``eval.shots=[0,2,4]``,
    ``backbone.name_or_path=null``). Raises :class:`ConfigError` on any problem.
    """
    if isinstance(overrides, str):
        # A bare string would be iterated character by character into nonsense overrides.
        overrides = [overrides]
    root = Path(experiments_dir) if experiments_dir is not None else EXPERIMENTS_DIR
    path = _resolve_experiment(experiment, root)

    cfg: DictConfig = OmegaConf.structured(ExperimentConfig)
    origin: dict[str, str] = {}
    for file, data in _expand(path, root):
        cfg = _merge(cfg, data, _display(file), origin)
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), _COMMAND_LINE, origin)

    try:
        # Surface broken ${...} interpolations now rather than when some callback first reads the key.
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        text = _unresolved(cfg, key)
        reason = str(getattr(e, "msg", e)).strip().splitlines()[0]
        raise ConfigError(
            f"config key '{key}' = {text!r} (from {_where(key, origin)}): "
            f"cannot resolve interpolation: {reason}"
        ) from None
    if not cfg.name:
        cfg.name = path.stem
    _check_semantics(cfg, origin)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def key_takes_list(dotted: str) -> bool:
    """Whether a config key's own value is a list (``eval.shots``): a sweep over it needs a list of lists."""
    tp = _SCHEMA_TYPES.get(dotted)
    return tp is not None and typing.get_origin(_unwrap_optional(tp)[0]) is list


def config_from_dict(
    data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "checkpoint"
) -> DictConfig:
    """Rebuild a validated config from a plain dict (a checkpoint's saved config), then apply overrides."""
    cfg: DictConfig = OmegaConf.structured(ExperimentConfig)
    origin: dict[str, str] = {}
    cfg = _merge(cfg, data, source, origin)
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), _COMMAND_LINE, origin)
    _check_semantics(cfg, origin)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def to_yaml(cfg: DictConfig | ExperimentConfig) -> str:
    """The config as YAML with interpolations resolved, so a saved run is self-contained."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig | ExperimentConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``to_yaml(cfg)`` to ``path`` (parents created); it loads back with ``load_config(path)``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(cfg), encoding="utf-8")
    return out
