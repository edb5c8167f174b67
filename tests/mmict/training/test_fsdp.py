"""FSDP strategy built from the backbone adapter, for every backbone family (no process group, no GPU).

FSDP1 cannot run on CPU, so what is checked here is the strategy object and the unit layout it will apply:
wrap classes (decoder layer + vision encoder layer + other blocks), activation checkpointing on the decoder
layer, use_orig_params, frozen and trainable parameters never in one unit, checkpoint kind.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from tiny_models import FAMILY_MODULES, save_tiny

from mmict.backbones import load_backbone
from mmict.backbones.lora import add_lora
from mmict.config import config_from_dict
from mmict.methods.aim.module import AIMModule
from mmict.methods.mmict.module import MMICTModule
from mmict.training.fsdp import (
    FrozenBackboneFSDP,
    build_fsdp_strategy,
    plan_units,
    resolve_state_dict_type,
    wrap_classes,
)

FAMILY = {"blip2_t5": "blip2"}
# The block classes each tiny family must be wrapped by: the LM's decoder layer and the vision encoder's layer.
EXPECTED = {
    "llava": {"LlamaDecoderLayer", "CLIPEncoderLayer"},
    "llava_next": {"LlamaDecoderLayer", "CLIPEncoderLayer"},
    "qwen2_vl": {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"},
    "qwen2_5_vl": {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"},
    "idefics2": {"MistralDecoderLayer", "Idefics2EncoderLayer", "Idefics2PerceiverLayer"},
    "idefics3": {"LlamaDecoderLayer", "Idefics3EncoderLayer"},
    "blip2": {"OPTDecoderLayer", "Blip2EncoderLayer", "Blip2QFormerLayer"},
    "blip2_t5": {"T5Block", "Blip2EncoderLayer", "Blip2QFormerLayer"},
}
DECODER = {"llava": "LlamaDecoderLayer", "llava_next": "LlamaDecoderLayer", "qwen2_vl": "Qwen2VLDecoderLayer",
           "qwen2_5_vl": "Qwen2_5_VLDecoderLayer", "idefics2": "MistralDecoderLayer", "idefics3": "LlamaDecoderLayer",
           "blip2": "OPTDecoderLayer", "blip2_t5": "T5Block"}
SETTINGS = SimpleNamespace(sharding_strategy="FULL_SHARD", activation_checkpointing=True, state_dict_type="auto",
                           sharded_above_params=1_000_000_000, cpu_offload=False)


def _aim(variant: str, path) -> AIMModule:
    family = FAMILY.get(variant, variant)
    cfg = config_from_dict({"method": {"name": "aim"},
                            "backbone": {"family": family, "name_or_path": str(path), "toy": None}})
    return AIMModule(cfg, backbone=load_backbone(family, str(path)))


def _names(classes) -> set[str]:
    return {c.__name__ for c in classes}


def _check_layout(module, strategy) -> None:
    plan = strategy.plan
    named = dict(module.named_parameters())
    assert not plan.mixed(), f"units mixing frozen and trainable: {plan.mixed()}"
    # Every trainable parameter is in FSDP (sharded, reduced); ignored ones are frozen only.
    in_units = {n for names in plan.units.values() for n in names}
    assert {n for n, p in named.items() if p.requires_grad} <= in_units
    assert all(not named[n].requires_grad for n in plan.ignored)
    assert set(plan.ignored) | in_units == set(named)
    ignored_ids = {id(p) for p in strategy.kwargs["ignored_states"]}
    assert ignored_ids == {id(named[n]) for n in plan.ignored}
    # One dtype per unit (FSDP1 flattens a unit into one tensor).
    for unit, names in plan.units.items():
        assert len({named[n].dtype for n in names}) == 1, unit


@pytest.fixture(scope="module", params=sorted(FAMILY_MODULES))
def variant_dir(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_strategy_per_family(variant_dir):
    variant, path = variant_dir
    module = _aim(variant, path)
    strategy = build_fsdp_strategy(module, SETTINGS, precision="bf16-mixed")
    assert isinstance(strategy, FSDPStrategy) and isinstance(strategy, FrozenBackboneFSDP)
    assert EXPECTED[variant] <= _names(strategy.wrap_classes)
    assert _names(wrap_classes(module)) == _names(strategy.wrap_classes)
    assert _names(strategy.activation_checkpointing_classes) == {DECODER[variant]}
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"  # tiny model: under sharded_above_params
    assert strategy.mixed_precision.param_dtype == torch.bfloat16
    assert strategy.mixed_precision.reduce_dtype == torch.float32  # trainable grads reduced in fp32
    # The torch policy picks exactly the block instances (+ nothing else: AIM has no LoRA).
    policy = strategy.kwargs["auto_wrap_policy"]
    targets = policy._run_policy(module, set(), {})
    assert targets and all(type(m) in strategy.wrap_classes for m in targets)
    decoder_layers = [m for m in module.modules() if type(m).__name__ == DECODER[variant]]
    assert all(m in targets for m in decoder_layers)
    _check_layout(module, strategy)
    # AIM: the projector trains, in the root unit, alone.
    assert strategy.plan.units["<root>"] and all(n.startswith("projector.") for n in strategy.plan.units["<root>"])
    assert strategy.plan.trainable["<root>"] is True


def test_lora_adapters_get_their_own_units(variant_dir):
    variant, path = variant_dir
    if variant not in ("llava", "blip2_t5"):
        pytest.skip("one decoder-only and one encoder-decoder family suffice")
    module = _aim(variant, path)
    add_lora(module.backbone, r=2)
    strategy = build_fsdp_strategy(module, SETTINGS)
    _check_layout(module, strategy)
    lora_units = [u for u, t in strategy.plan.trainable.items() if t and "lora_" in u]
    assert lora_units, "LoRA linears are units nested in their (frozen) decoder-layer units"
    assert strategy.mixed_precision is None  # 32-true


def test_mmict_hub_and_eoc(tmp_path):
    path = save_tiny("blip2", tmp_path / "blip2")
    hub = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
           "cross_attention_frequency": 1, "num_query_tokens": 4, "max_text_tokens": 32}
    cfg = config_from_dict({"method": {"name": "mmict", "mmict": {"hub": hub, "eoc_trainable": True}},
                            "backbone": {"family": "blip2", "name_or_path": str(path), "toy": None}})
    module = MMICTModule(cfg)
    strategy = build_fsdp_strategy(module, SETTINGS, precision="bf16-mixed")
    assert "InstructBlipQFormerLayer" in _names(strategy.wrap_classes)  # the M-Hub's own blocks
    _check_layout(module, strategy)
    root = strategy.plan.units["<root>"]
    assert "eoc" in root and "hub.query_tokens" in root  # loose trainable tensors: the (trainable) root unit


def test_sharded_checkpoints_for_large_models():
    assert resolve_state_dict_type("auto", 7_000_000_000, 1_000_000_000) == "sharded"
    assert resolve_state_dict_type("auto", 1_000_000, 1_000_000_000) == "full"
    assert resolve_state_dict_type("full", 7_000_000_000, 1_000_000_000) == "full"
    with pytest.raises(ValueError, match="state_dict_type"):
        resolve_state_dict_type("consolidated", 1, 1)


def test_plan_reports_a_mixed_unit():
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.a.requires_grad_(False)

    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([Block(), Block()])
    plan = plan_units(root, lambda m: isinstance(m, Block))
    assert plan.mixed() == ["blocks.0", "blocks.1"]


def test_trainer_refuses_fsdp_without_gpu(tmp_path, tiny_backbone_dir):
    from mmict.config import ConfigError, load_config
    from mmict.train import build_trainer

    common = ["trainer.strategy=fsdp", "logger.wandb=false", f"backbone.name_or_path={tiny_backbone_dir}",
              "backbone.toy=null"]
    # An explicit CPU accelerator is refused when the config loads, before any work (issue 26's range checks) ...
    with pytest.raises(ConfigError, match="fsdp.*CUDA"):
        load_config("toy_aim", [*common, "trainer.accelerator=cpu"])
    # ... and one that resolves to the CPU (auto, on a machine without a GPU) when the trainer is built.
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: trainer.accelerator=auto resolves to it")
    cfg = load_config("toy_aim", [*common, "trainer.accelerator=auto"])
    with pytest.raises(ConfigError, match="fsdp.*CUDA"):
        build_trainer(cfg, tmp_path)


def test_sharded_trainable_only_checkpoint_consolidates_and_loads(tmp_path, tiny_backbone_dir):
    """The documented consolidate step on a checkpoint laid out as FrozenBackboneFSDP writes it (sharded:
    `model` = trainable weights only, `optimizer_0`, meta.pt): the consolidated file loads into the module."""
    import subprocess
    import sys

    import torch.distributed.checkpoint as dcp

    cfg = config_from_dict({"method": {"name": "aim"},
                            "backbone": {"family": "llava", "name_or_path": str(tiny_backbone_dir), "toy": None}})
    module = AIMModule(cfg)
    checkpoint = {"state_dict": module.state_dict(), "global_step": 7}
    module.on_save_checkpoint(checkpoint)  # what Lightning calls before the strategy saves: frozen keys dropped
    trainable = checkpoint.pop("state_dict")
    assert trainable and all(k.startswith("projector.") for k in trainable)
    folder = tmp_path / "last.ckpt"
    dcp.save({"model": trainable}, checkpoint_id=folder)
    torch.save(checkpoint, folder / "meta.pt")
    done = subprocess.run([sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint", str(folder)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    full = torch.load(tmp_path / "last.ckpt.consolidated", weights_only=False)
    assert full["global_step"] == 7 and set(full["state_dict"]) == set(trainable)
    fresh = AIMModule(cfg, backbone=module.backbone)
    fresh.load_state_dict(full["state_dict"])  # strict: every trainable key, no frozen one
    assert torch.equal(fresh.projector.net.weight, module.projector.net.weight)


def test_norm_clipping_under_fsdp_goes_through_the_fsdp_root(tiny_backbone_dir):
    """Lightning's FSDP precision plugin raises on `gradient_clip_val` with the norm algorithm (seen on an H200
    in bench/gpu_checks.py); the module clips through the FSDP root instead, which reduces over shards."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    calls = []
    module = AIMModule(config_from_dict({"method": {"name": "aim"}, "backbone": {
        "family": "llava", "name_or_path": str(tiny_backbone_dir), "toy": None}}))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), model=SimpleNamespace(clip_grad_norm_=calls.append))
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    assert calls == [1.0]
