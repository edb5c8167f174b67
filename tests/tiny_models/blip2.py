"""Tiny random-init BLIP-2 checkpoints, no download: variant "blip2" (OPT LM) and "blip2_t5" (Flan-T5 LM).

Both load with family "blip2" (the adapter picks OPT or T5 from `config.use_decoder_only_language_model`).
Each folder holds the model, a word-level tokenizer that adds special tokens like the real one (OPT: "</s>"
as BOS in front; T5: "</s>" as EOS at the end, no BOS), the BLIP image processor and `Blip2Processor`
(which writes `num_query_tokens` "<image>" tokens in front of the tokenized text). `tokenizer="real"` uses the kind
the checkpoints have instead (`real_tokenizers`: OPT's byte-level BPE, Flan-T5's SentencePiece unigram).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import WORDS, word_tokenizer
from .real_tokenizers import byte_level_bpe, t5_unigram

IMAGE_SIZE, PATCH = 16, 8
NUM_QUERY_TOKENS = 4
VARIANTS = ("blip2", "blip2_t5")


def t5_tokenizer() -> Any:
    """A word-level tokenizer with T5's conventions: <pad>=0 (also the decoder start), </s>=1 appended, no BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "</s>", "<unk>", "<image>", *WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<[^>]+>|\w+|[^\w\s]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def build(variant: str = "blip2", seed: int = 0, decoder_layers: int | None = None,
          image_token_as_string: bool = False, tokenizer: str = "word") -> tuple[Any, Any]:
    """(model, processor) of a tiny BLIP-2 with the LM `variant` names.

    `decoder_layers`: a T5 decoder deeper than its 2-layer encoder (transformers 5.25's generate fails on
    one without mmict's guard). `image_token_as_string`: the OPT tokenizer stores `image_token` as a plain
    string, as tokenizers saved with `extra_special_tokens` do (5.25's Blip2Processor fails on it)."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        T5Config,
    )

    if variant not in VARIANTS:
        raise ValueError(f"unknown BLIP-2 variant '{variant}': use one of {VARIANTS}")
    real = tokenizer == "real"
    if variant == "blip2_t5":
        tokenizer = t5_unigram(["<image>"]) if real else t5_tokenizer()
        text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2,
                        num_decoder_layers=decoder_layers or 2, num_heads=2, relative_attention_num_buckets=8,
                        relative_attention_max_distance=32,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    else:
        # OPT's tokenizer uses </s> as BOS and EOS (both id 2 in the real one).
        extra = {"image_token": "<image>"} if image_token_as_string else None
        tokenizer = (byte_level_bpe("gpt2", ["<image>"], extra) if real
                     else word_tokenizer(["<image>"], extra, bos="</s>", eos="</s>"))
        text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                         do_layer_norm_before=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = Blip2VisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 cross_attention_frequency=1)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                         num_query_tokens=NUM_QUERY_TOKENS,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        # At BLIP-2's init (std 0.02) a random LM is nearly uniform and greedy decoding repeats one token
        # whatever the prompt; wider weights in the LM, the projection and the queries make it prompt-dependent.
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name.startswith(("language_model.", "language_projection.", "query_tokens")):
                p.normal_(0.0, 0.5)
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    return model, processor


def save_tiny(path: Path, variant: str = "blip2", chat_template: bool = False, **options: Any) -> Path:
    if chat_template:
        raise ValueError("BLIP-2 checkpoints have no chat template")
    model, processor = build(variant, **options)
    model.save_pretrained(path)
    processor.save_pretrained(path)  # tokenizer, image processor and processor_config (num_query_tokens)
    return path


def hf_inputs(path: Path, image, text: str) -> dict:
    """The model's own processor on one image and `text` (which holds no image token: the processor puts the
    `num_query_tokens` image tokens in front of the tokenized text, BOS included)."""
    from mmict.backbones.blip2 import load_processor

    return dict(load_processor(str(path))(images=image, text=text, return_tensors="pt"))
