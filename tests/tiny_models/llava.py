"""Tiny LLaVA-1.5 and LLaVA-NeXT checkpoints (CLIP vision tower + Llama LM), with their processors.

`tokenizer="word"` (default): a word-level tokenizer; "real": a SentencePiece Llama tokenizer (legacy=False) like the
checkpoints' (`real_tokenizers`). `chat_template=True` saves the checkpoint's chat template with the processor."""

from __future__ import annotations

from pathlib import Path

from .chat_templates import TEMPLATES
from .common import word_tokenizer
from .real_tokenizers import sentencepiece_llama

IMAGE_SIZE, PATCH = 16, 8


def _configs(variant: str, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    common = dict(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_select_strategy="default", vision_feature_layer=-1)
    if variant == "llava_next":
        pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
        return LlavaNextConfig(image_grid_pinpoints=pinpoints, **common), pinpoints
    return LlavaConfig(**common), None


def save_tiny(path: Path, variant: str = "llava", tokenizer: str = "word", chat_template: bool = False) -> Path:
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    build = {"word": word_tokenizer, "real": sentencepiece_llama}[tokenizer]
    tokenizer = build(["<image>"], {"image_token": "<image>"})
    config, pinpoints = _configs(variant, tokenizer)
    torch.manual_seed(0)
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if variant == "llava_next":
        model = LlavaNextForConditionalGeneration(config)
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints),
            tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
            num_additional_image_tokens=1)
    else:
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer,
                                   patch_size=PATCH, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    with torch.no_grad():  # a random LM is nearly uniform; scale it so greedy decoding is not a tie-break
        model.lm_head.weight.mul_(20)
    if chat_template:
        processor.chat_template = TEMPLATES[variant]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def hf_inputs(path: Path, image, text: str) -> dict:
    """`text` holds "<image>" where the image goes; the processor expands it as the model expects."""
    from transformers import AutoProcessor

    return dict(AutoProcessor.from_pretrained(path)(images=image, text=text, return_tensors="pt"))
