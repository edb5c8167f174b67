"""Frozen MLLM adapters behind one protocol (`Backbone`), loaded by family name."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

from mmict.backbones.base import IGNORE_INDEX, Assembled, Backbone, ImageTransform
from mmict.backbones.llava import LlavaBackbone

log = logging.getLogger(__name__)

FAMILIES: dict[str, tuple[type[Backbone], str]] = {
    # family -> (adapter, transformers model class name)
    "llava": (LlavaBackbone, "LlavaForConditionalGeneration"),
}

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def load_backbone(family: str, name_or_path: str, dtype: str = "float32") -> Backbone:
    """Load a frozen backbone from a hub id or a local folder (the same path for toy and real models)."""
    import torch
    import transformers

    if family not in FAMILIES:
        near = difflib.get_close_matches(family, FAMILIES, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"unsupported backbone family '{family}'; supported: {sorted(FAMILIES)}.{hint}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported backbone.dtype '{dtype}'; use one of {sorted(set(DTYPES.values()))}")
    adapter, model_cls_name = FAMILIES[family]
    model_cls = getattr(transformers, model_cls_name)
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"backbone folder '{name_or_path}' does not exist. Point backbone.name_or_path at a saved "
            "model folder or a hub id (toy experiments build theirs when backbone.toy is set)."
        )
    try:
        model = model_cls.from_pretrained(name_or_path, dtype=getattr(torch, DTYPES[dtype]))
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        image_processor = transformers.AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as err:
        offline = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if os.environ.get(
            "HF_HUB_OFFLINE") else ""
        raise OSError(
            f"could not load backbone '{name_or_path}' as {model_cls_name}{offline}: {err}\n"
            "Download it first (huggingface-cli download ...) or set backbone.name_or_path to a local folder."
        ) from err
    log.info("loaded %s backbone from %s (%s)", family, name_or_path, dtype)
    return adapter(model, tokenizer, image_processor, name_or_path)


def build_backbone(cfg: Any) -> Backbone:
    """Build the backbone an experiment's `backbone` config section asks for.

    With `backbone.toy` set and no model at `name_or_path`, a tiny random-init LLaVA is written there
    first, so the toy world goes through exactly the loading path real checkpoints use.
    """
    if cfg.toy is not None:
        from mmict.backbones.toy import ensure_toy_backbone

        ensure_toy_backbone(cfg.name_or_path, cfg.toy)
    return load_backbone(cfg.family, cfg.name_or_path, cfg.dtype)


__all__ = ["IGNORE_INDEX", "Assembled", "Backbone", "ImageTransform", "FAMILIES", "build_backbone",
           "load_backbone"]
