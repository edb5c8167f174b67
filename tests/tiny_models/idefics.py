"""Tiny Idefics2 (SigLIP-style tower + perceiver resampler + Mistral) and Idefics3 (tower + pixel-shuffle
connector + Llama) checkpoints, saved with their processors like hub checkpoints.

Both image processors split images into crops by default here (Idefics2's 4 quarters + the whole image,
Idefics3's grid of `max_image_size` tiles + a global view), so a single image already takes several crops;
`image_splitting=False` saves the one-crop setting. `tokenizer="real"` uses the kind of tokenizer the checkpoints have
(Idefics2: SentencePiece Llama/Mistral, legacy=False; Idefics3: Llama 3's byte-level BPE; see `real_tokenizers`);
`chat_template=True` saves the checkpoint's chat template with the processor.
"""

from __future__ import annotations

from pathlib import Path

from .chat_templates import TEMPLATES
from .common import word_tokenizer
from .real_tokenizers import byte_level_bpe, sentencepiece_llama

FAKE, IMAGE, END_OF_UTTERANCE, GLOBAL = "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]  # Idefics3's tile tags, up to 6x6

# Idefics2: crops are resized to shortest/longest edge (aspect ratio kept), so crops of two images differ in
# size and a batch pads them; the vision tower takes up to IDEFICS2_MAX_SIDE pixels a side.
IDEFICS2_MAX_SIDE, IDEFICS2_MIN_SIDE, IDEFICS2_PATCH, IDEFICS2_LATENTS = 28, 14, 7, 4
# Idefics3: images are resized to longest edge IDEFICS3_LONGEST and cut into IDEFICS3_TILE-pixel square tiles
# (2x2 for a square image); each tile gives (TILE / PATCH)^2 / SCALE^2 tokens after the pixel shuffle.
IDEFICS3_LONGEST, IDEFICS3_TILE, IDEFICS3_PATCH, IDEFICS3_SCALE = 32, 16, 4, 2
IDEFICS3_SEQ_LEN = (IDEFICS3_TILE // IDEFICS3_PATCH) ** 2 // IDEFICS3_SCALE**2
INIT_STD = 0.1  # well above transformers' 0.02, so a wrong image feature visibly moves the logits


def _tokenizer(variant: str, kind: str = "word"):
    from tokenizers import AddedToken

    special = [FAKE, IMAGE, END_OF_UTTERANCE] + ([GLOBAL, *ROW_COL] if variant == "idefics3" else [])
    if kind == "real":
        return sentencepiece_llama(special) if variant == "idefics2" else byte_level_bpe("llama3", special)
    tokenizer = word_tokenizer(special)
    # Registered as special added tokens (same ids): matched whole before pre-tokenization and skipped when
    # decoding, as in the hub tokenizers.
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    # Idefics3's layout puts "\n" after every row of tiles; the word-level pre-tokenizer would drop it, so it is a
    # token of its own (as in Llama 3's vocabulary).
    tokenizer.add_tokens([AddedToken("\n", normalized=False)])
    return tokenizer


def _text_kwargs(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def _vision_kwargs(image_size: int, patch_size: int) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=image_size, patch_size=patch_size)


def _build(variant: str, image_splitting: bool, tokenizer_kind: str = "word"):
    """(model, processor) of a variant, random weights deterministic in a fixed seed."""
    import torch
    import transformers as tf

    tokenizer = _tokenizer(variant, tokenizer_kind)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    torch.manual_seed(0)
    if variant == "idefics2":
        config = tf.Idefics2Config(
            text_config=tf.MistralConfig(**_text_kwargs(tokenizer)),
            vision_config=_vision_kwargs(IDEFICS2_MAX_SIDE, IDEFICS2_PATCH),
            perceiver_config=dict(hidden_size=32, rms_norm_eps=1e-5, resampler_n_latents=IDEFICS2_LATENTS,
                                  resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
                                  num_key_value_heads=1),
            image_token_id=image_token_id, tie_word_embeddings=False,
        )
        model = tf.Idefics2ForConditionalGeneration(config)
        image_processor = tf.Idefics2ImageProcessor(
            size={"shortest_edge": IDEFICS2_MIN_SIDE, "longest_edge": IDEFICS2_MAX_SIDE},
            do_image_splitting=image_splitting)
        processor = tf.Idefics2Processor(image_processor, tokenizer, image_seq_len=IDEFICS2_LATENTS)
    elif variant == "idefics3":
        config = tf.Idefics3Config(
            text_config=tf.LlamaConfig(**_text_kwargs(tokenizer)),
            vision_config=_vision_kwargs(IDEFICS3_TILE, IDEFICS3_PATCH),
            scale_factor=IDEFICS3_SCALE, image_token_id=image_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = tf.Idefics3ForConditionalGeneration(config)
        image_processor = tf.Idefics3ImageProcessor(
            size={"longest_edge": IDEFICS3_LONGEST}, max_image_size={"longest_edge": IDEFICS3_TILE},
            do_image_splitting=image_splitting)
        processor = tf.Idefics3Processor(image_processor, tokenizer, image_seq_len=IDEFICS3_SEQ_LEN)
    else:
        raise ValueError(f"unknown Idefics variant '{variant}': use idefics2 or idefics3")
    with torch.no_grad():
        # transformers initialises the perceiver latents to ones (all resampled tokens of a crop would be equal)
        # and every matrix at std 0.02 (a near-uniform LM): redraw them so features and greedy tokens discriminate.
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith("latents"):
                param.normal_(0.0, INIT_STD)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, processor


def save_tiny(path: Path, variant: str = "idefics2", image_splitting: bool = True, tokenizer: str = "word",
              chat_template: bool = False) -> Path:
    """Write model, tokenizer, image processor and the family's processor to `path`."""
    model, processor = _build(variant, image_splitting, tokenizer)
    if chat_template:
        processor.chat_template = TEMPLATES[variant]
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def hf_inputs(path: Path, image, text: str) -> dict:
    """`text` holds "<image>" where the image goes; the family's processor expands it (crops, row/col layout)."""
    from transformers import AutoProcessor

    return dict(AutoProcessor.from_pretrained(path)(images=image, text=text, return_tensors="pt"))
