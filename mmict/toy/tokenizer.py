"""The toy backbones' tokenizer (both families share it): whole words of the toy language, word pieces for
nonsense words, BOS in front as Llama's tokenizers do."""

from __future__ import annotations

from typing import Any

from mmict.toy.language import SYLLABLES, binding_vocabulary, toy_vocabulary

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def build_tokenizer(vocabulary: list[str], pieces: list[str] = ()) -> Any:
    """A fast tokenizer over the toy vocabulary: whole words, plus word pieces for nonsense words.

    Words split like `\\w+|[^\\w\\s]+`; a word that is not in the vocabulary is cut into `pieces`
    (longest first, continuations written "##po"), so "dapo" -> "da", "##po" and decodes back to "dapo".
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + [w for w in vocabulary if w not in SPECIAL_TOKENS]
    words += [p for p in pieces if p not in words] + [f"##{p}" for p in pieces]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins pieces, and words with spaces
    # BOS in front when special tokens are asked for, as Llama's tokenizers do: the model's own processor then gives
    # the ids the adapter gives (which adds BOS itself and tokenises its segments without special tokens).
    bos = words.index("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def toy_language() -> tuple[list[str], list[str]]:
    """(whole words, word pieces) of the toy world: captions, VQA and binding texts, and syllables."""

    return sorted(set(toy_vocabulary() + binding_vocabulary())), list(SYLLABLES)


__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "toy_language"]
