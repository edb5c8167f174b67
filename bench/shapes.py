"""Random-weight MLLMs at real model shapes (no download), and the benchmark environment around them.

The 7B shapes are written from the published checkpoints' hyperparameters, so the compute, the weights' memory,
the image-token counts and the LM's position limit are the real models'; the weights are random (speed and
memory do not depend on them). `reduced-*` keep each architecture, its image-token count and its position limit,
with 2 layers and small widths, so the same code runs on a CPU (CI); `smoke-*` also shrink the images and the
position limit, so a test covers the over-context path in seconds.

Tokenizer: a word-level toy tokenizer (bench.common.WORDS plus the family's special tokens) whose ids all lie
below the real vocabulary; the embedding and output tables have the real vocabulary's size.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from bench import Context
from bench.common import WORDS, Env

# llava-hf/llava-1.5-7b-hf, config.json on the Hub (transformers' LlavaConfig documents this checkpoint: its
# defaults vision_feature_layer=-2, "default" select strategy, gelu projector, image_seq_length=576).
# Vision: CLIP ViT-L/14 at 336 px -> (336 / 14)^2 = 576 patch tokens (CLS dropped). Text: Vicuna-7B (Llama).
LLAVA_15_7B: dict[str, Any] = {
    "family": "llava", "image_side": 336,
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5},
    "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "hidden_act": "silu", "tie_word_embeddings": False},
    "mllm": {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"},
}

# Qwen/Qwen2-VL-7B-Instruct, config.json on the Hub. The vision numbers are also transformers' Qwen2VLVisionConfig
# defaults (depth 32, embed_dim 1280, 16 heads, mlp_ratio 4, patch 14, merge 2, temporal patch 2, out 3584); its
# Qwen2VLTextConfig defaults are the 72B's, so the text numbers are the 7B checkpoint's (28 layers of width 3584,
# 28 query / 4 KV heads, MLP 18944, vocabulary 152064, rope theta 1e6, M-RoPE sections [16, 24, 24], 32768
# positions, no sliding window in use). A 672 x 672 image -> 48 x 48 patches -> 24 x 24 = 576 merged tokens.
QWEN2_VL_7B: dict[str, Any] = {
    "family": "qwen2_vl", "image_side": 672,
    "vision": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
               "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"},
    "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "hidden_act": "silu", "use_sliding_window": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    "mllm": {"tie_word_embeddings": False},
}


def _reduced(spec: dict[str, Any], vision: dict[str, Any], text: dict[str, Any], **top: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    out["vision"].update(vision)
    out["text"].update(text)
    out.update(top)
    return out


_SMALL_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2}
_SMALL_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "projection_dim": 32}
# head_dim 32 -> 16 rotary frequencies, split (temporal, height, width) in Qwen2-VL's 1 : 1.5 : 1.5 proportion
_SMALL_QWEN = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}}
_SMALL_QWEN_VISION = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}

SHAPES: dict[str, dict[str, Any]] = {
    "llava-1.5-7b": LLAVA_15_7B,
    "qwen2-vl-7b": QWEN2_VL_7B,
    # the architectures, image-token counts (576) and position limits of the 7B shapes; 2 layers, small widths
    "reduced-llava": _reduced(LLAVA_15_7B, _SMALL_CLIP, _SMALL_LLAMA),
    "reduced-qwen2-vl": _reduced(QWEN2_VL_7B, _SMALL_QWEN_VISION, _SMALL_QWEN),
    # the harness check: 16 image tokens per image and 96 positions, so 2 shots of vanilla ICL are over context
    # and a 256-word vocabulary (the toy tokenizer's ids fit), so the output layer does not dominate
    "smoke-llava": _reduced(LLAVA_15_7B, {**_SMALL_CLIP, "image_size": 56},
                            {**_SMALL_LLAMA, "max_position_embeddings": 96, "vocab_size": 256}, image_side=56),
    "smoke-qwen2-vl": _reduced(QWEN2_VL_7B, _SMALL_QWEN_VISION, {**_SMALL_QWEN, "vocab_size": 256}, image_side=56),
}
# What `--shapes` accepts besides the names above.
SHAPE_GROUPS = {"7b": ("qwen2-vl-7b", "llava-1.5-7b"), "reduced": ("reduced-qwen2-vl", "reduced-llava"),
                "smoke": ("smoke-qwen2-vl", "smoke-llava")}
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<unk>"]


def resolve_shapes(names: tuple[str, ...] | None, cuda: bool, smoke: bool) -> tuple[str, ...]:
    """The shapes to measure: the ones asked for (groups expanded), else 7B on a GPU, reduced on a CPU."""
    if not names:
        return SHAPE_GROUPS["smoke" if smoke else "7b" if cuda else "reduced"]
    out: list[str] = []
    for name in names:
        for shape in SHAPE_GROUPS.get(name, (name,)):
            if shape not in SHAPES:
                raise ValueError(f"unknown shape '{shape}': use one of {', '.join([*SHAPE_GROUPS, *SHAPES])}")
            if shape.endswith("-7b") and not cuda:
                raise ValueError(f"shape '{shape}' needs a CUDA GPU (its bf16 weights alone are ~15 GiB); on a CPU use "
                                 "--shapes reduced (the same architectures with 2 layers and small widths)")
            out.append(shape)
    return tuple(dict.fromkeys(out))


def llava_parts(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model class, config, image processor) of a LLaVA-1.5 shape, with the toy tokenizer."""
    import transformers

    from mmict.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(list(WORDS))
    text = transformers.LlamaConfig(**spec["text"], bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**spec["vision"]), text_config=text,
                                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **spec["mllm"])
    side = spec["image_side"]
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return transformers.LlavaForConditionalGeneration, config, (tokenizer, processor)


def qwen_tokenizer() -> Any:
    """Word-level, with Qwen2-VL's special tokens (no BOS, as Qwen2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(QWEN_SPECIALS + [w for w in WORDS if w not in QWEN_SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    # matched before pre-tokenisation, so "<|vision_end|>what" splits as Qwen's processor splits it
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:7]})
    return tokenizer


def qwen_parts(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    import transformers

    tokenizer = qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    text = {**spec["text"], "bos_token_id": None, "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    config = transformers.Qwen2VLConfig(
        text_config=text, vision_config=spec["vision"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], **spec["mllm"])
    v, side = spec["vision"], spec["image_side"]
    unit = v["patch_size"] * v["spatial_merge_size"]
    # the bench image's side is kept as it is (a multiple of patch x merge): its token count is the shape's
    processor = transformers.Qwen2VLImageProcessor(
        patch_size=v["patch_size"], merge_size=v["spatial_merge_size"], temporal_patch_size=v["temporal_patch_size"],
        min_pixels=unit * unit, max_pixels=side * side)
    return transformers.Qwen2VLForConditionalGeneration, config, (tokenizer, processor)


def build_backbone(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The shape's MLLM with random weights, created on `device` in `dtype` (a 7B model is never materialised in
    fp32 or on the CPU), SDPA attention, behind its mmict adapter."""
    from mmict.backbones import adapter_class

    spec = SHAPES[shape]
    model_cls, config, (tokenizer, processor) = (llava_parts if spec["family"] == "llava" else qwen_parts)(spec)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    try:
        # Parameters are allocated and initialised where they will run, in their final dtype; meta + to_empty is
        # not used because it would leave the non-persistent rotary buffers uninitialised.
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = model_cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return adapter_class(spec["family"])(model, tokenizer, processor, f"random-weights:{shape}")


class ShapeEnv(Env):
    """`bench.common.Env` (demo pool, bank, batches, answering as evaluation does) around a real-shape backbone."""

    def __init__(self, ctx: Context, shape: str, device: torch.device, dtype: torch.dtype) -> None:
        backbone = build_backbone(shape, device, dtype)
        self.weights_mib = sum(p.numel() * p.element_size() for p in backbone.model.parameters()) / 2**20
        self.parameters = sum(p.numel() for p in backbone.model.parameters())
        self.attach(ctx, backbone, shape, SHAPES[shape]["family"], SHAPES[shape]["image_side"])
        self.module.to(device)  # the projector (fp32, as it trains); the backbone is already there
