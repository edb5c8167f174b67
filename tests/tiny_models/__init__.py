"""Tiny random-init models of every backbone family, saved like real checkpoints (no download).

`save_tiny(family, path)` writes a model folder that `load_backbone(family, path)` loads through the
same code path as a hub checkpoint. One module per family; each exposes `save_tiny(path, **options)`
and `hf_inputs(path, image, text)`: the model's own processor inputs for a single-image prompt (parity).
"""

from __future__ import annotations

import importlib
from pathlib import Path

# family -> module in this package that builds it
FAMILY_MODULES = {
    "llava": "llava",
    "llava_next": "llava",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "idefics2": "idefics",
    "idefics3": "idefics",
    "blip2": "blip2",  # OPT; "blip2_t5" builds the Flan-T5 variant
    "blip2_t5": "blip2",
}


def builder(variant: str):
    return importlib.import_module(f"tiny_models.{FAMILY_MODULES[variant]}")


def save_tiny(variant: str, path: Path, **options) -> Path:
    """Write the tiny model of `variant` (a family name, or blip2_t5) to `path`; returns `path`. `options` go to
    the family's builder (e.g. `tokenizer="real"`, `chat_template=True`)."""
    return builder(variant).save_tiny(Path(path), variant=variant, **options)
