"""Tiny tokenizers of the kinds the real checkpoints use, trained locally on a few sentences (no download).

The word-level tokenizers of `common` split at spaces, so they cannot show how a real tokenizer treats the text
around an image token. These can (`save_tiny(..., tokenizer="real")` builds a family with its kind):

- `sentencepiece_llama`: transformers' `LlamaTokenizer` with `legacy=False` (LLaVA-1.5, LLaVA-NeXT vicuna/mistral,
  Idefics2's Mistral): BPE with byte fallback behind a Metaspace pre-tokenizer with prepend_scheme "first", so
  the first word of a string gets "▁" and a word right after a special token (an image) does not.
- `byte_level_bpe`: byte-level BPE after a split regex: "qwen2" (`Qwen2Tokenizer`, no BOS), "llama3" (Idefics3:
  Llama 3's regex, BOS <|begin_of_text|> added) or "gpt2" (`GPT2Tokenizer` as OPT's: "</s>" as BOS, added).
- `t5_unigram`: transformers' `T5Tokenizer` (Flan-T5): unigram pieces after WhitespaceSplit + Metaspace
  prepend_scheme "always", "</s>" appended, no BOS.

Vocabularies are a few hundred pieces learned from `CORPUS`, so most words are several pieces and unseen
characters fall back to bytes (SentencePiece) or byte pieces (byte-level), as rare words do in real ones.
"""

from __future__ import annotations

import json
from typing import Any

CORPUS = [
    "USER: what color is the shape? ASSISTANT: red",
    "a red circle on the left. a blue square on the right.",
    "a green triangle in the center of the image.",
    "Question: what shape is this? Short answer: circle",
    "Question:what is on the left? Short answer:a dog",
    "the answer is green. the answer is blue. this is a big one.",
    "describe the image in one word. there is a small cat.",
    "[INST] what is in the picture? [/INST] a dog",
    "User: is it big or small?\nAssistant: small",
    "system\nYou are a helpful assistant.\nuser\nwhat is it?\nassistant\nyellow",
    "Output: a photo of two cats and one dog on the right.",
    "is an image with: 'hello' written on it. Is it hateful? Answer: no. Answer:yes",
    "dax wug blicket toma: the red one, the blue one, the green one.",
]
# Llama 3's pre-tokenization regex (Idefics3's LM).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _model_json(tokenizer: Any) -> dict:
    return json.loads(tokenizer.to_str())["model"]


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def _added(tokenizer: Any, special_tokens: list[str]) -> Any:
    """Register the family's tokens as special added tokens (matched whole, before pre-tokenization)."""
    from tokenizers import AddedToken

    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, special=True, normalized=False) for t in special_tokens]})
    return tokenizer


def sentencepiece_llama(special_tokens: list[str], extra_special: dict[str, str] | None = None,
                        vocab_size: int = 420) -> Any:
    """A `LlamaTokenizer` (legacy=False: Metaspace prepend_scheme "first", byte fallback), BOS <s> added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    # Learned per word (SentencePiece pieces never cross a "▁" boundary), used as one string like the real one.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces],
                                  show_progress=False)
    # Newlines are not pieces of a SentencePiece vocabulary: they fall back to the byte <0x0A>.
    tok.train_from_iterator([line.replace("\n", " ") for line in CORPUS], trainer)
    model = _model_json(tok)
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=_merges(model), legacy=False, add_bos_token=True,
                               pad_token="<unk>", extra_special_tokens=extra_special or {})
    return _added(tokenizer, special_tokens)


def byte_level_bpe(kind: str, special_tokens: list[str], extra_special: dict[str, str] | None = None,
                   vocab_size: int = 420) -> Any:
    """Byte-level BPE of `kind` "qwen2", "llama3" or "gpt2" (see the module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Tokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    specials = {"qwen2": ["<|endoftext|>"], "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
                "gpt2": ["<s>", "<pad>", "</s>", "<unk>"]}[kind]
    regex = {"qwen2": QWEN2_REGEX, "llama3": LLAMA3_REGEX, "gpt2": None}[kind]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    tok.pre_tokenizer = (byte_level if regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level]))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = _model_json(tok)
    extra = {"extra_special_tokens": extra_special or {}}
    if kind == "qwen2":
        tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=_merges(model), eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None, **extra)
    elif kind == "gpt2":  # OPT: "</s>" is BOS (prepended) and EOS
        tokenizer = GPT2Tokenizer(vocab=model["vocab"], merges=_merges(model), bos_token="</s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", add_bos_token=True, **extra)
    else:
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          special_tokens=[("<|begin_of_text|>", model["vocab"]["<|begin_of_text|>"])]),
        ])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                            eos_token="<|end_of_text|>", pad_token="<|pad|>", **extra)
    return _added(tokenizer, special_tokens)


def t5_unigram(special_tokens: list[str], vocab_size: int = 300) -> Any:
    """A `T5Tokenizer`: unigram pieces, WhitespaceSplit + Metaspace "always", "</s>" appended, no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    vocab = [tuple(piece) for piece in _model_json(tok)["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    return _added(tokenizer, special_tokens)
