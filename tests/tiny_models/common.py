"""Pieces every tiny model shares: a word-level tokenizer that adds BOS like a real one, test images."""

from __future__ import annotations

from PIL import Image as PILImage

WORDS = ["USER", "ASSISTANT", ":", "what", "color", "is", "the", "shape", "?", "a", "red", "blue", "green",
         "circle", "square", "this", "answer", "question", "short", ".", "dax", "wug", "on", "left", "right"]


def word_tokenizer(special_tokens: list[str], extra_special: dict[str, str] | None = None,
                   words: list[str] = WORDS, bos: str = "<s>", eos: str = "</s>"):
    """A fast tokenizer over `words` whose encode adds BOS (as Llama/Mistral tokenizers do)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_list = ["<pad>", bos, eos, "<unk>"] + [t for t in special_tokens if t not in (bos, eos)] + words
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # spaces separate; "<tok>", words, punctuation are pieces
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<[^>]+>|\w+|[^\w\s]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=special_tokens, extra_special_tokens=extra_special or {},
    )


def test_image(size: tuple[int, int] = (24, 24), color: tuple[int, int, int] = (200, 40, 40)) -> PILImage.Image:
    """A coloured square on grey: not uniform, so a wrong crop or patch order changes the features."""
    image = PILImage.new("RGB", size, (120, 120, 120))
    w, h = size
    image.paste(PILImage.new("RGB", (w // 2, h // 2), color), (w // 4, h // 5))
    return image
