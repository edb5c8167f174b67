"""Tiny random-init Qwen2-VL and Qwen2.5-VL checkpoints (variants "qwen2_vl", "qwen2_5_vl"), no download.

Each folder holds the model, a word-level tokenizer with Qwen's special tokens, the Qwen2-VL image
processor (dynamic resolution: 4-pixel patches, 2x2 merge, so a 32x32 image gives 16 image tokens)
and the family's full processor, so `load_backbone(variant, path)` loads it like a hub checkpoint and
`hf_inputs` is exactly what the model's own processor makes. `tokenizer="real"` uses a byte-level BPE
`Qwen2Tokenizer` (`real_tokenizers`); `chat_template=True` saves Qwen2-VL-Instruct's chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage

# Qwen's special tokens (names as in the real tokenizer); no BOS, like Qwen2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<unk>"]
WORDS = ("a an the red blue green yellow circle square triangle shape on in of left right center top bottom "
         "it is what where which color Question Short answer : ? . , one two three big small image this there "
         "and dog cat").split()
PATCH, MERGE, TEMPORAL = 4, 2, 2
MIN_PIXELS, MAX_PIXELS = 16 * 16, 64 * 64  # smart_resize keeps test images between 16x16 and 64x64
VARIANTS = ("qwen2_vl", "qwen2_5_vl")


def build_tokenizer(kind: str = "word") -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .real_tokenizers import byte_level_bpe

    if kind == "real":  # <|endoftext|> is its first token, as in Qwen2's vocabulary; no <unk>, no BOS
        tokenizer = byte_level_bpe("qwen2", [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<unk>")],
                                   {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
        tokenizer.eos_token = "<|im_end|>"  # as Qwen2-VL-Instruct's
        return tokenizer

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )
    # Special tokens are matched before pre-tokenization, so "<|vision_end|>what" splits as the processor expects.
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:7]})
    return tokenizer


def build_model(variant: str, tokenizer: Any, seed: int = 0) -> Any:
    import transformers

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    common = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, depth=2, num_heads=2)
    if variant == "qwen2_vl":
        vision = transformers.Qwen2VLVisionConfig(embed_dim=32, hidden_size=32, mlp_ratio=2, **common)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif variant == "qwen2_5_vl":
        # window attention in block 0 (4x4-patch windows), full attention in block 1, as in the real tower
        vision = transformers.Qwen2_5_VLVisionConfig(hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                                      window_size=4 * PATCH, fullatt_block_indexes=[1],
                                                      tokens_per_second=2, **common)
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown Qwen2-VL variant '{variant}': use one of {VARIANTS}")
    config = config_cls(
        text_config=text, vision_config=vision.to_dict(), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    return model


def build_processor(variant: str, tokenizer: Any) -> Any:
    import transformers

    kw = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, min_pixels=MIN_PIXELS,
              max_pixels=MAX_PIXELS)
    image_processor = transformers.Qwen2VLImageProcessor(**kw)
    video_processor = transformers.Qwen2VLVideoProcessor(**kw)
    processor_cls = transformers.Qwen2VLProcessor if variant == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor)


def save_tiny(path: Path, variant: str = "qwen2_vl", tokenizer: str = "word", chat_template: bool = False) -> Path:
    from .chat_templates import TEMPLATES

    path = Path(path)
    tokenizer = build_tokenizer(tokenizer)
    model = build_model(variant, tokenizer)
    processor = build_processor(variant, tokenizer)
    if chat_template:
        processor.chat_template = TEMPLATES[variant]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)  # tokenizer, image and video processor, processor config
    return path


def hf_inputs(path: Path, image: PILImage.Image, text: str) -> dict:
    """The processor's inputs for `<|vision_start|><|image_pad|><|vision_end|>text`: the layout Qwen's
    chat template gives an image, with the image pad expanded to the image's merged tokens."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    prompt = f"<|vision_start|>{processor.image_token}<|vision_end|>{text}"
    return dict(processor(images=[image.convert("RGB")], text=[prompt], return_tensors="pt"))
