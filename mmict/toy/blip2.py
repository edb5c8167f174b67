"""The toy BLIP-2: a tiny `Blip2ForConditionalGeneration` (vision tower, Q-Former, OPT language model) built from
configs, and the files a real BLIP-2 user has beside it.

It is what MMICT's paper starts from (BLIP-2's pretrained Q-Former), at toy size, so MMICT's `init_from_backbone`
path, its BERT text-branch init and the design baselines run exactly as on a real BLIP-2 checkpoint:

- the model folder is an ordinary BLIP-2 checkpoint (`save_pretrained` + `Blip2Processor`), loaded through the
  `blip2` family like `Salesforce/blip2-opt-2.7b`; as on the real checkpoint the Q-Former has **no text branch**
  (transformers' `Blip2QFormerModel` has none);
- `qformer_text/` beside the weights is the analogue of `bert-base-uncased` for LAVIS: a BERT checkpoint (the
  stage-1 Q-Former's text branch: word and position embeddings, text feed-forward, and its self-attention as
  BERT's) with a BERT-style WordPiece tokenizer ([CLS] text [SEP]) over the toy language. MMICT reads it with
  `method.mmict.hub_tokenizer=<backbone>/qformer_text` and `text_init=bert`, as the reference reads BERT.

Pretraining (`mmict.toy.qformer_stage`, `mmict.toy.pretrain`) follows BLIP-2's two stages; see there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmict.toy.tokenizer import SPECIAL_TOKENS, build_tokenizer, toy_language

QFORMER_TEXT_DIR = "qformer_text"  # the BERT-like text branch and its tokenizer, beside the BLIP-2 weights
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_toy_blip2(cfg: Any, vocabulary: list[str], pieces: list[str] = ()) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image_processor) of a tiny random-init BLIP-2 with an OPT LM, deterministic in `cfg.seed`.

    The tokenizer is the toy one (word pieces for nonsense words); OPT's convention of "</s>" as BOS is not copied:
    the toy tokenizer's "<s>" is BOS, which the `blip2` adapter puts behind a leading image as BLIP-2-OPT does."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = build_tokenizer(vocabulary, pieces)
    vision = Blip2VisionConfig(image_size=cfg.image_size, patch_size=cfg.patch_size,
                               hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_hidden_size * 4,
                               num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.num_heads,
                               # BLIP-2's default (1e-10) suits loading EVA-CLIP weights, not training a tower from
                               # scratch: at it the toy tower's tokens learnt colour only (shape 42%, position 22%).
                               initializer_range=0.02)
    qformer = Blip2QFormerConfig(hidden_size=cfg.qformer_hidden_size, num_hidden_layers=cfg.qformer_layers,
                                 num_attention_heads=cfg.num_heads, intermediate_size=cfg.qformer_hidden_size * 2,
                                 cross_attention_frequency=1, encoder_hidden_size=cfg.vision_hidden_size)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size,
                     word_embed_proj_dim=cfg.text_hidden_size, ffn_dim=cfg.intermediate_size,
                     num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.num_heads,
                     max_position_embeddings=cfg.max_position_embeddings, do_layer_norm_before=True,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                         num_query_tokens=cfg.num_query_tokens,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(cfg.seed)
    model = Blip2ForConditionalGeneration(config)
    for gen in (model.generation_config, model.language_model.generation_config):
        gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        gen.bos_token_id = tokenizer.bos_token_id
    image_processor = BlipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})
    return model, tokenizer, image_processor


def build_hub_tokenizer(vocabulary: list[str], pieces: list[str] = ()) -> Any:
    """A BERT-style WordPiece tokenizer over the toy language: "[CLS] a red circle [SEP]", nonsense words cut into
    "##" pieces, as `bert-base-uncased`'s tokenizer is to English (the M-Hub's text tokenizer in LAVIS)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    skip = set(SPECIAL_TOKENS)
    words = BERT_SPECIALS + [w for w in vocabulary if w not in skip and w not in BERT_SPECIALS]
    words += [p for p in pieces if p not in words] + [f"##{p}" for p in pieces]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = words.index("[CLS]"), words.index("[SEP]")
    tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def save_text_branch(qformer: Any, hub_tokenizer: Any, path: str | Path) -> Path:
    """Save a stage-1 InstructBLIP Q-Former's text branch as a BERT checkpoint (+ its tokenizer) under `path`.

    BERT's self-attention, embeddings LayerNorm and text feed-forward are the Q-Former's (its layers are BERT
    layers with cross-attention and a query feed-forward added); token-type embeddings are zeros (the Q-Former has
    none, so a BERT reading this checkpoint sees the same embeddings)."""
    from transformers import BertConfig, BertModel

    q = qformer.config
    config = BertConfig(vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                        num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                        max_position_embeddings=q.max_position_embeddings, type_vocab_size=1,
                        pad_token_id=hub_tokenizer.pad_token_id, layer_norm_eps=q.layer_norm_eps)
    bert = BertModel(config, add_pooling_layer=False)
    source = qformer.state_dict()
    mapped = {"embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
              "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
              "embeddings.LayerNorm.weight": "embeddings.layernorm.weight",
              "embeddings.LayerNorm.bias": "embeddings.layernorm.bias"}
    for i in range(q.num_hidden_layers):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            theirs = part.replace("attention.self.", "attention.attention.")  # the Q-Former's name for BERT's
            for kind in ("weight", "bias"):
                mapped[f"encoder.layer.{i}.{part}.{kind}"] = f"encoder.layer.{i}.{theirs}.{kind}"
    state = bert.state_dict()
    with torch.no_grad():
        for mine, theirs in mapped.items():
            state[mine].copy_(source[theirs])
        state["embeddings.token_type_embeddings.weight"].zero_()
    path = Path(path)
    bert.save_pretrained(path)
    hub_tokenizer.save_pretrained(path)
    return path


def copy_shared_qformer(stage1: Any, query_tokens: torch.Tensor, model: Any) -> int:
    """Copy a stage-1 InstructBLIP Q-Former's shared weights (everything but the text branch) and its query tokens
    into a `Blip2ForConditionalGeneration`; returns the number of tensors copied. Every Blip2 Q-Former weight must
    be found (a mismatch is a bug, raised)."""
    target = model.qformer.state_dict()
    source = stage1.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in target.items():
            # Blip2QFormerModel keeps its input LayerNorm at the top; InstructBLIP's sits in `embeddings`.
            theirs = f"embeddings.{key}" if key.startswith("layernorm.") else key
            if theirs not in source:
                raise KeyError(f"stage-1 Q-Former has no {theirs!r} for the BLIP-2 Q-Former's {key!r}")
            value.copy_(source[theirs])
            copied += 1
        model.query_tokens.copy_(query_tokens)
    return copied + 1


def write_toy_blip2(path: str | Path, cfg: Any, progress: bool = True) -> dict:
    """Build, pretrain and save the toy BLIP-2 at `path` (the model, its `Blip2Processor`, `qformer_text/`); returns
    the pretraining report for the marker.

    Stages, as BLIP-2 is built: the vision tower reads colour, shape and position (`mmict.toy.pretrain`, the toy
    stand-in for a pretrained ViT); stage 1 trains the Q-Former with its text branch (`mmict.toy.qformer_stage`);
    its shared part goes into the model; stage 2 trains queries -> Q-Former -> projection -> LM on captions, VQA
    and concept episodes (the LM from scratch too, unlike BLIP-2's frozen OPT: a toy LM has no pretraining to
    keep; so it also learns multimodal in-context learning there)."""
    from transformers import Blip2Processor

    from mmict.backbones.blip2 import Blip2Backbone
    from mmict.toy.pretrain import pretrain_toy_backbone

    path = Path(path)
    words, pieces = toy_language()
    model, tokenizer, image_processor = build_toy_blip2(cfg, words, pieces)
    hub_tokenizer = build_hub_tokenizer(words, pieces)
    backbone = Blip2Backbone(model, tokenizer, image_processor, str(path))
    stage1: dict[str, Any] = {}

    def qformer_stage(bb: Any) -> dict:
        from mmict.toy.qformer_stage import pretrain_qformer

        module, report = pretrain_qformer(model.vision_model, bb.image_transform, hub_tokenizer, cfg, progress)
        copy_shared_qformer(module.qformer, module.query_tokens, model)
        stage1["qformer"] = module.qformer
        return {"qformer_stage1": report}

    report = pretrain_toy_backbone(backbone, cfg, progress=progress,
                                   after_vision=qformer_stage if cfg.pretrain_qformer_steps else None)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                   num_query_tokens=cfg.num_query_tokens).save_pretrained(path)
    if "qformer" in stage1:
        save_text_branch(stage1["qformer"], hub_tokenizer, path / QFORMER_TEXT_DIR)
    return report


__all__ = ["QFORMER_TEXT_DIR", "build_hub_tokenizer", "build_toy_blip2", "copy_shared_qformer", "save_text_branch",
           "write_toy_blip2"]
