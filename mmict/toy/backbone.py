"""The toy backbone: a tiny LLaVA (CLIP vision tower + Llama LM) with a word-piece tokenizer.

It is built from configs (no download), saved as an ordinary transformers folder, and then loaded
through `load_backbone` like any real checkpoint. A marker file records the recipe hash so a stale
folder is rebuilt (with a warning) and a folder that is not a toy backbone is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from mmict.toy.language import DEFAULT_ATTRIBUTES, word_pools
from mmict.toy.tokenizer import build_tokenizer, toy_language

log = logging.getLogger(__name__)

MARKER = "mmict_toy_backbone.json"
# 2: syllable word pieces, text warm-up, frozen vision tower; 3: vision stage; 4: grounding; 5: the tokenizer adds
# BOS as Llama's does, and the LLaVA processor is saved (a normal HF folder: the processor's ids are the adapter's)
RECIPE_VERSION = 5


def build_toy_llava(cfg: Any, vocabulary: list[str], pieces: list[str] = ()) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image_processor) for a tiny random-init LLaVA, deterministic in `cfg.seed`."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tokenizer = build_tokenizer(vocabulary, pieces)
    vision = CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_hidden_size * 4, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.num_heads, projection_dim=cfg.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return model, tokenizer, image_processor


ARCH_FIELDS = ("image_size", "patch_size", "vision_hidden_size", "vision_layers", "text_hidden_size",
               "text_layers", "num_heads", "intermediate_size", "max_position_embeddings", "seed")
PRETRAIN_FIELDS = ("pretrain_steps", "pretrain_text_steps", "pretrain_vision_steps", "pretrain_grounding_weight",
                   "pretrain_grounding_layer", "pretrain_batch_size", "pretrain_lr", "pretrain_mix")
# The toy BLIP-2's own fields (`family: blip2`): its Q-Former, and BLIP-2's stage 1 (mmict/toy/qformer_stage.py).
BLIP2_FIELDS = ("family", "qformer_hidden_size", "qformer_layers", "num_query_tokens", "pretrain_qformer_steps")


def toy_recipe(cfg: Any) -> dict:
    """The fields that determine the toy backbone (architecture, language, pretraining) and their hash."""

    keys = ARCH_FIELDS + (PRETRAIN_FIELDS if getattr(cfg, "pretrain_steps", 0) else ())
    keys += BLIP2_FIELDS if family_of(cfg) == "blip2" else ()
    fields = {k: _plain(getattr(cfg, k, 0)) for k in keys}
    if fields.get("pretrain_mix", 0) is None:  # the default mix: left out, so recipes written before it keep their hash
        del fields["pretrain_mix"]
    elif isinstance(fields.get("pretrain_mix"), dict):  # a kind at weight 0 is not in the mix (the stream drops it)
        fields["pretrain_mix"] = {k: v for k, v in fields["pretrain_mix"].items() if v}
    words, pieces = toy_language()
    pools = {name: hashlib.sha256(" ".join(ws).encode()).hexdigest()[:8] for name, ws in word_pools().items()}
    blob = json.dumps({"fields": fields, "vocabulary": words, "pieces": pieces, "word_pools": pools,
                       "binding_attributes": DEFAULT_ATTRIBUTES, "version": RECIPE_VERSION}, sort_keys=True)
    return {"fields": fields, "hash": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def family_of(cfg: Any) -> str:
    family = getattr(cfg, "family", None) or "llava"
    if family not in ("llava", "blip2"):
        raise ValueError(f"backbone.toy.family={family!r}: the toy backbones are llava (a tiny LLaVA) and blip2 (a "
                         "tiny BLIP-2 with an OPT LM)")
    return family


def _plain(value: Any) -> Any:
    """A recipe field as plain JSON (a config mapping such as `pretrain_mix` becomes a dict)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value


def ensure_toy_backbone(path: str | Path, cfg: Any, force: bool = False) -> Path:
    """Write the toy backbone to `path` unless an up-to-date one is already there (or `force`)."""
    path = Path(path)
    recipe = toy_recipe(cfg)
    marker = path / MARKER
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("hash") == recipe["hash"] and not force:
            return path
        log.warning("toy backbone at %s was built from another recipe (%s != %s): rebuilding it",
                    path, old.get("hash"), recipe["hash"])
        shutil.rmtree(path)
    elif path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"{path} exists and is not a toy backbone (no {MARKER}); refusing to overwrite it. "
            "Set backbone.toy=null to load it as a real model, or choose another backbone.name_or_path."
        )
    if family_of(cfg) == "blip2":
        from mmict.toy.blip2 import write_toy_blip2

        recipe.update(write_toy_blip2(path, cfg))
        marker.write_text(json.dumps(recipe, indent=2))
        return path
    model, tokenizer, image_processor = build_toy_llava(cfg, *toy_language())
    if getattr(cfg, "pretrain_steps", 0):
        from mmict.backbones.llava import LlavaBackbone
        from mmict.toy.pretrain import pretrain_toy_backbone

        report = pretrain_toy_backbone(LlavaBackbone(model, tokenizer, image_processor, str(path)), cfg)
        recipe.update(report)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    # The processor as a LLaVA checkpoint ships it (tokenizer, image processor and how many tokens an image
    # expands to), so the toy backbone is a normal HF folder: `AutoProcessor` loads it (mmict doctor compares the
    # adapter with the model on it).
    from transformers import LlavaProcessor

    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                   vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                   num_additional_image_tokens=1).save_pretrained(path)
    marker.write_text(json.dumps(recipe, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built toy backbone at %s (%.2f M params, recipe %s)", path, n_params / 1e6, recipe["hash"])
    return path
