"""Frozen MLLM adapters behind one protocol (`Backbone`), loaded by family name."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from pathlib import Path
from typing import Any

from mmict.backbones.base import IGNORE_INDEX, Assembled, Backbone, ImageTransform

log = logging.getLogger(__name__)

# family -> "module:adapter class"; imported on use, so one family's import cost is not everyone's.
# Each adapter names its transformers model class (`model_class`).
FAMILIES: dict[str, str] = {
    "llava": "mmict.backbones.llava:LlavaBackbone",
    "llava_next": "mmict.backbones.llava_next:LlavaNextBackbone",
    "qwen2_vl": "mmict.backbones.qwen2_vl:Qwen2VLBackbone",
    "qwen2_5_vl": "mmict.backbones.qwen2_vl:Qwen2_5_VLBackbone",
    "idefics2": "mmict.backbones.idefics:Idefics2Backbone",
    "idefics3": "mmict.backbones.idefics:Idefics3Backbone",
    "blip2": "mmict.backbones.blip2:Blip2Backbone",  # OPT (decoder-only) or Flan-T5 (encoder-decoder)
}


def adapter_class(family: str) -> type[Backbone]:
    """The adapter class of a family name, with the nearest name suggested for a typo."""
    if family not in FAMILIES:
        near = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"unsupported backbone family '{family}'; supported: {sorted(FAMILIES)}.{hint}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def load_backbone(family: str, name_or_path: str, dtype: str = "float32") -> Backbone:
    """Load a frozen backbone from a hub id or a local folder (the same path for toy and real models)."""
    import torch
    import transformers

    adapter = adapter_class(family)
    if dtype not in DTYPES:
        raise ValueError(f"unsupported backbone.dtype '{dtype}'; use one of {sorted(set(DTYPES.values()))}")
    model_cls_name = adapter.model_class
    model_cls = getattr(transformers, model_cls_name)
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"backbone folder '{name_or_path}' does not exist. Point backbone.name_or_path at a saved "
            "model folder or a hub id (toy experiments build theirs when backbone.toy is set)."
        )
    try:
        _check_model_type(name_or_path, model_cls, family)
        model = model_cls.from_pretrained(name_or_path, dtype=getattr(torch, DTYPES[dtype]))
        tokenizer, image_processor = adapter.load_processors(name_or_path)
    except OSError as err:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if os.environ.get(
            "HF_HUB_OFFLINE") else ""
        raise OSError(
            f"could not load backbone '{name_or_path}' as {model_cls_name}{offline}: {err}\n"
            "Download it first (huggingface-cli download ...) or set backbone.name_or_path to a local folder."
        ) from err
    log.info("loaded %s backbone from %s (%s)", family, name_or_path, dtype)
    backbone = adapter(model, tokenizer, image_processor, name_or_path)
    if backbone.chat_template is None:  # many MLLMs keep their chat template with the processor
        backbone.chat_template = _processor_chat_template(name_or_path)
    return backbone


def _check_model_type(name_or_path: str, model_cls: Any, family: str) -> None:
    """Refuse a checkpoint of another architecture (transformers would only warn and init randomly)."""
    import transformers

    found = transformers.AutoConfig.from_pretrained(name_or_path).model_type
    expected = model_cls.config_class.model_type
    if found != expected:
        families = [f for f in FAMILIES if adapter_class(f).model_class
                    and getattr(transformers, adapter_class(f).model_class).config_class.model_type == found]
        hint = f"set backbone.family={families[0]}" if families else f"no mmict family loads '{found}' models"
        raise ValueError(f"'{name_or_path}' is a '{found}' checkpoint, not '{expected}' (backbone.family={family}): "
                         f"{hint}")


def _processor_chat_template(name_or_path: str) -> str | None:
    import transformers

    try:
        return getattr(transformers.AutoProcessor.from_pretrained(name_or_path), "chat_template", None)
    except (OSError, ValueError, TypeError, KeyError):  # no processor saved: the tokenizer's (none) stands
        return None


def build_backbone(cfg: Any) -> Backbone:
    """Load the backbone an experiment's `backbone` config section asks for (and add LoRA when it says so).

    It only loads: a toy backbone (`backbone.toy`) is written beforehand by `mmict.toy.prepare(cfg)`, which
    `mmict train` and `mmict eval` call, and is then loaded through exactly the path real checkpoints use.
    """
    if cfg.toy is not None and not (Path(str(cfg.name_or_path)) / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy backbone at {cfg.name_or_path} yet: it is built by mmict.toy.prepare(cfg), which `mmict train` "
            "and `mmict eval` run first; build it alone with `mmict pretrain-toy EXP`")
    backbone = load_backbone(cfg.family, cfg.name_or_path, cfg.dtype)
    backbone.use_chat_template = bool(cfg.get("chat_template", True))
    lora = cfg.get("lora")
    if lora is not None and lora.r > 0:
        from mmict.backbones.lora import add_lora

        add_lora(backbone, lora.r, lora.alpha, lora.dropout,
                 list(lora.target_modules) if lora.target_modules else None)
    return backbone


__all__ = ["IGNORE_INDEX", "Assembled", "Backbone", "ImageTransform", "FAMILIES", "adapter_class",
           "build_backbone", "load_backbone"]
