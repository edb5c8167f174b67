"""FSDP for a frozen MLLM with small trainable parts, built from the backbone adapter.

`build_fsdp_strategy(module, settings, precision)` returns a Lightning `FSDPStrategy` (our subclass,
`FrozenBackboneFSDP`) laid out for in-context tuning:

- **Units** (`auto_wrap_policy`): one FSDP unit per transformer block: the language model's decoder layer
  (`backbone.decoder_layer_cls`) and every other repeated block class of the model, found generically as
  the element class of a homogeneous `nn.ModuleList` (the vision encoder's layers, BLIP-2's Q-Former layers,
  Idefics2's perceiver layers, the M-Hub's Q-Former layers, ...). `wrap_classes(module)` lists them.
- **Frozen and trainable never share a flat parameter**: inside the frozen backbone, every leaf module
  whose weights train (LoRA's `lora_A` / `lora_B` linears) is a unit of its own, nested in its decoder-layer
  unit. The frozen weights outside every block (embeddings, LM head, final norms, the vision patch embedding,
  multimodal projector) are kept out of FSDP (`ignored_states`): replicated on each GPU, never sharded,
  never reduced (they have no gradient). The root unit therefore holds only trainable parameters (AIM's
  projector, the M-Hub's non-block weights, MMICT's `<eoc>` row). `plan_units(...)` computes this layout
  without a process group (the tests check it for every backbone family); FSDP1 also needs one dtype per
  flat parameter, which this layout gives for free (bf16 frozen units, fp32 trainable units).
- **Activation checkpointing** on the decoder layer class (gradients flow through the frozen LM to the
  fused tokens / M-Hub features; the frozen vision tower needs none).
- `use_orig_params=True` (the optimizer sees the module's own parameters: trainable ones only).
- **Mixed precision**: bf16 compute, fp32 gradient reduction and fp32 master weights of the trainable units
  (`param_dtype=bf16, reduce_dtype=fp32`), buffers left as loaded (rotary tables stay fp32).
- **Checkpoints hold only the trainable weights, the optimizer state and the loop state** (the frozen
  backbone is reloaded from `backbone.name_or_path`). `state_dict_type`: `sharded` (each rank writes its
  shard, no gather; the default from `sharded_above_params` parameters) or `full` (gathered on rank 0 into
  one file; FSDP1 gathers every unit to do so, so it is for small models). A sharded checkpoint is a folder;
  consolidate it into one file (for `mmict eval` or sharing) with
  `python -m lightning.pytorch.utilities.consolidate_checkpoint runs/.../checkpoints/last.ckpt`
  (writes `last.ckpt.consolidated`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from mmict.config.schema import FSDP_SHARDING, FSDP_STATE_DICT_TYPES
from mmict.methods.base import saved_in_checkpoint

log = logging.getLogger(__name__)

SHARDING_STRATEGIES = FSDP_SHARDING  # the one list, in the config schema (trainer.fsdp.sharding_strategy)
STATE_DICT_TYPES = FSDP_STATE_DICT_TYPES  # the one list, in the config schema
BACKBONE_ATTR = "backbone"


# ------------------------------------------------------------------------------------------------------
# Which modules become units
# ------------------------------------------------------------------------------------------------------


def _params(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
    return list(module.parameters(recurse=recurse))


def block_classes(root: nn.Module) -> set[type[nn.Module]]:
    """Element classes of homogeneous ModuleLists (transformer blocks), torch.nn's own classes excluded."""
    found: set[type[nn.Module]] = set()
    for module in root.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        (kind,) = kinds
        if kind.__module__.startswith("torch.nn") or not any(True for _ in module[0].children()):
            continue  # a list of Linear / LayerNorm is not a block
        if _params(module[0]):
            found.add(kind)
    return found


def _backbone_of(module: nn.Module) -> Any:
    backbone = getattr(module, BACKBONE_ATTR, None)
    if backbone is None or not hasattr(backbone, "decoder_layer_cls"):
        raise TypeError(f"{type(module).__name__} has no `{BACKBONE_ATTR}` adapter: FSDP is built from the backbone "
                        "adapter (mmict.backbones.Backbone)")
    return backbone


def wrap_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The block classes that become FSDP units: the LM's decoder layer plus every repeated block class."""
    return {_backbone_of(module).decoder_layer_cls} | block_classes(module)


def trainable_leaves(root: nn.Module) -> list[nn.Module]:
    """Leaf modules of `root` whose weights all train (LoRA's linears inside the frozen backbone)."""
    return [m for m in root.modules()
            if not any(True for _ in m.children()) and (ps := _params(m, recurse=False))
            and all(p.requires_grad for p in ps)]


@dataclass
class UnitPlan:
    """The FSDP layout of a module: unit name -> parameter names; `ignored` stay out of FSDP."""

    units: dict[str, list[str]] = field(default_factory=dict)
    trainable: dict[str, bool | None] = field(default_factory=dict)  # True / False / None (mixed)
    ignored: list[str] = field(default_factory=list)

    def mixed(self) -> list[str]:
        return [u for u, t in self.trainable.items() if t is None]


class _WrapPolicy:
    """`CustomPolicy` predicate: block instances and trainable leaves inside the backbone."""

    def __init__(self, classes: Iterable[type[nn.Module]], extra: Iterable[nn.Module]) -> None:
        self.classes = tuple(classes)
        self.extra = set(extra)  # modules hash by identity

    def __call__(self, module: nn.Module) -> bool:
        return isinstance(module, self.classes) or module in self.extra


def wrap_policy(module: nn.Module) -> tuple[Any, _WrapPolicy]:
    """(torch `CustomPolicy`, its predicate) for `module` (a FrozenBackboneModule)."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    backbone = _backbone_of(module)
    predicate = _WrapPolicy(wrap_classes(module), trainable_leaves(backbone))
    return CustomPolicy(predicate), predicate


def plan_units(module: nn.Module, predicate: Callable[[nn.Module], bool]) -> UnitPlan:
    """Simulate FSDP's wrapping: each parameter belongs to its deepest wrapped ancestor, else to the root;
    frozen parameters left in the root are the ones `ignored_states` keeps out of FSDP."""
    owner: dict[str, str] = {}

    def visit(mod: nn.Module, prefix: str, unit: str) -> None:
        if prefix and predicate(mod):
            unit = prefix
        for name, _ in mod.named_parameters(recurse=False):
            owner.setdefault(f"{prefix}.{name}" if prefix else name, unit)
        for name, child in mod.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name, unit)

    visit(module, "", "<root>")
    named = dict(module.named_parameters())
    plan = UnitPlan()
    for name, unit in owner.items():
        if name not in named:
            continue  # a shared parameter seen under another name first
        if unit == "<root>" and not named[name].requires_grad:
            plan.ignored.append(name)
            continue
        plan.units.setdefault(unit, []).append(name)
    for unit, names in plan.units.items():
        flags = {named[n].requires_grad for n in names}
        plan.trainable[unit] = flags.pop() if len(flags) == 1 else None
    return plan


# ------------------------------------------------------------------------------------------------------
# The strategy
# ------------------------------------------------------------------------------------------------------


# Lightning writes a sharded checkpoint as a folder of torch.distributed.checkpoint shards plus "meta.pt" (the
# loop and callback states). These two helpers do what lightning/fabric/strategies/fsdp.py's private
# `_is_sharded_checkpoint` and `_get_sharded_state_dict_context` do (Lightning 2.6), through torch's public API.
SHARDED_METADATA_FILE = "meta.pt"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA_FILE).is_file()


def sharded_state_dict_context(module: nn.Module) -> Any:
    """FSDP's sharded state-dict mode, offloaded to the CPU (model and optimizer), as Lightning saves."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

    return FSDP.state_dict_type(module=module, state_dict_type=StateDictType.SHARDED_STATE_DICT,
                                state_dict_config=ShardedStateDictConfig(offload_to_cpu=True),
                                optim_state_dict_config=ShardedOptimStateDictConfig(offload_to_cpu=True))


@contextmanager
def _quiet_missing_frozen_keys():
    """FSDP logs one warning per parameter missing from a (trainable-only) sharded state dict."""
    fsdp_log = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
    level = fsdp_log.level
    fsdp_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        fsdp_log.setLevel(level)


class FrozenBackboneFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy with checkpoints of the trainable weights only and the frozen leftovers kept
    out of FSDP (moved to the device here, since FSDP does not move ignored parameters)."""

    strategy_name = "fsdp_frozen_backbone"

    def __init__(self, *args: Any, keep_key: Callable[[str], bool] = saved_in_checkpoint,
                 ignored_params: Iterable[nn.Parameter] = (), plan: UnitPlan | None = None, **kwargs: Any) -> None:
        ignored = list(ignored_params)
        if ignored:
            kwargs["ignored_states"] = ignored
        super().__init__(*args, **kwargs)
        self.keep_key = keep_key
        self.ignored_params = ignored
        self.plan = plan

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # A later stage of the same Trainer (train() validates before and after fit) gets the module whose blocks
        # the first stage wrapped in place; Lightning would then skip the root wrap and leave the root's
        # parameters (the trainable modules) as stale shard views. Reuse the first stage's root instead.
        root = getattr(self, "_root", None)
        if root is not None and getattr(root, "module", None) is model:
            return root
        for p in self.ignored_params:
            if p.device != self.root_device:
                p.data = p.data.to(self.root_device)
        wrapped = super()._setup_model(model)
        self._root = wrapped
        return wrapped

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # `sharded`: no gather at all; `full`: FSDP1 gathers every unit to rank 0, then the frozen part is dropped.
        return {k: v for k, v in super().lightning_module_state_dict().items() if self.keep_key(k)}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        assert module is not None
        if is_sharded_checkpoint(path):
            return self._load_sharded(path, weights_only)
        strict = module.strict_loading
        module.strict_loading = False  # the frozen backbone is not in the checkpoint, by design
        try:
            with _quiet_missing_frozen_keys():
                return super().load_checkpoint(path, weights_only)
        finally:
            module.strict_loading = strict

    def _load_sharded(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """Lightning's sharded load restricted to the saved (trainable) keys."""
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.model is not None and self.lightning_module is not None
        with sharded_state_dict_context(self.model):
            state = {k: v for k, v in self.model.state_dict().items() if self.keep_key(k)}
            module_state = {"model": state}
            dcp_load(module_state, checkpoint_id=path)  # as Lightning's own sharded load does (torch >= 2.3)
            with _quiet_missing_frozen_keys():
                self.model.load_state_dict(module_state["model"], strict=False)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                reader = FileSystemReader(path=path)
                for idx, optim in enumerate(self.optimizers):
                    key = f"optimizer_{idx}"
                    optim_state = load_sharded_optimizer_state_dict(model_state_dict=module_state["model"],
                                                                    optimizer_key=key, storage_reader=reader)
                    optim.load_state_dict(FSDP.optim_state_dict_to_load(optim_state_dict=optim_state[key],
                                                                        model=self.model, optim=optim))
        return torch.load(path / SHARDED_METADATA_FILE, weights_only=weights_only)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resolve_state_dict_type(kind: str, n_params: int, sharded_above: int) -> str:
    if kind not in STATE_DICT_TYPES:
        raise ValueError(f"trainer.fsdp.state_dict_type={kind!r}: use one of {STATE_DICT_TYPES}")
    if kind != "auto":
        return kind
    return "sharded" if n_params >= sharded_above else "full"


def mixed_precision_for(precision: str) -> Any:
    """bf16/fp16 compute with fp32 gradient reduction; buffers untouched; None for fp32 runs."""
    from torch.distributed.fsdp import MixedPrecision

    if precision.startswith("bf16"):
        dtype = torch.bfloat16
    elif precision.startswith("16"):
        dtype = torch.float16
    else:
        return None
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=None)


def build_fsdp_strategy(module: nn.Module, settings: Any, precision: str = "32-true") -> FrozenBackboneFSDP:
    """The FSDP strategy for `module` (a FrozenBackboneModule: `.backbone` adapter + trainable parts).

    `settings` is the `trainer.fsdp` config section (sharding_strategy, activation_checkpointing,
    state_dict_type, sharded_above_params, cpu_offload). Builds nothing distributed: no process group is
    needed until `Trainer.fit` sets the strategy up.
    """
    if settings.sharding_strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"trainer.fsdp.sharding_strategy={settings.sharding_strategy!r}: use one of "
                         f"{SHARDING_STRATEGIES}")
    backbone = _backbone_of(module)
    policy, predicate = wrap_policy(module)
    plan = plan_units(module, predicate)
    mixed = plan.mixed()
    if mixed:
        # FSDP (use_orig_params) can run this, at the cost of gradient memory for the frozen part of the unit.
        log.warning("FSDP: these units mix frozen and trainable parameters: %s", ", ".join(mixed))
    named = dict(module.named_parameters())
    ignored = [named[n] for n in plan.ignored]
    n_params = count_params(module)
    state_dict_type = resolve_state_dict_type(settings.state_dict_type, n_params, settings.sharded_above_params)
    activation = {backbone.decoder_layer_cls} if settings.activation_checkpointing else None
    strategy = FrozenBackboneFSDP(
        auto_wrap_policy=policy,
        activation_checkpointing_policy=activation,
        sharding_strategy=settings.sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=bool(settings.cpu_offload),
        mixed_precision=mixed_precision_for(precision),
        use_orig_params=True,
        ignored_params=ignored,
        plan=plan,
    )
    strategy.wrap_classes = set(predicate.classes)  # type: ignore[attr-defined]
    strategy.activation_checkpointing_classes = activation or set()  # type: ignore[attr-defined]
    trainable_units = sum(1 for t in plan.trainable.values() if t)
    log.info("FSDP: %d units (%d trainable), wrap classes %s, activation checkpointing on %s, %d frozen tensors "
             "kept out of FSDP, %s checkpoints (%.2fB parameters)", len(plan.units), trainable_units,
             sorted(c.__name__ for c in predicate.classes), backbone.decoder_layer_cls.__name__ if activation else
             "nothing", len(ignored), state_dict_type, n_params / 1e9)
    return strategy
