"""Prompts tokenised the way the family's processor tokenises them.

A processor gets one string per prompt, with its image token where each image goes, expands the image token and
tokenises the whole string. How a word is tokenised depends on what comes before it: SentencePiece Llama tokenizers
(`legacy=False`, Metaspace prepend_scheme "first": LLaVA-1.5, LLaVA-NeXT, Idefics2) give the first word of a string
a "▁" and a word right after a special token (an image) none, so tokenising each text segment alone adds a "▁"
token or changes the first piece after every image; pieces may also merge across two adjacent text segments.

So the prompt is rendered as that string and tokenised whole, then cut back into segments by character offsets:

- a `Text` segment is its text, as is (adjacent texts are concatenated: a separator is the caller's text);
- an `Image` is the family's image placeholder (`Backbone.image_placeholder`, e.g. "<image>", Qwen2-VL's
  "<|vision_start|><|image_pad|><|vision_end|>"), which must be one of the tokenizer's added tokens. It is not
  expanded: the expansion (repeated image tokens, Idefics' wrappers and row/col tags, LLaVA-NeXT's tiles) is made
  of added tokens, which are matched before pre-tokenisation, so the text either side tokenises the same. The
  image's rows are what `embed_images` returns;
- an `Embeds` segment (AIM's fused tokens, MMICT's features: vectors, no text) is rendered as the image
  placeholder too: the text around it is tokenised as the model would see it with an image in its place;
- family rewrites of the text after an image apply (`Backbone.text_after_image`: Idefics2's processor puts a
  space between its closing wrapper and a word).

A family whose processor keeps images out of the text (BLIP-2: the query tokens go in front of the tokenized text)
has no placeholder: images and Embeds cut the text, and each run of text between them is tokenised on its own.
A text that ends with EOS (a target) ends the string: the EOS id follows its tokens and what comes after starts a
new string. Special tokens (BOS, T5's EOS) are not rendered: `Backbone.special_token_layout` places them.

A token belongs to the segment holding its last character (a token that spans two texts, e.g. "▁red" whose space
ends the previous text, goes to the later one; a zero-width token to the segment at its position), so a target's
tokens are exactly the tokens of the whole string that end inside the target.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from mmict.segments import Embeds, Image, Prompt, Text

NO_TOKEN = -1  # `Assembled.input_ids` at rows that are no token: image features, Embeds, padding


def _strings(prompt: Prompt, placeholder: str | None, text_after_image: Callable[[str], str]
             ) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """The strings a prompt is tokenised as, each with (segment index, start, end) of the segments it renders."""
    out: list[tuple[str, list[tuple[int, int, int]]]] = []
    text, ranges, after_image = "", [], False

    def close() -> None:
        nonlocal text, ranges
        if ranges:
            out.append((text, ranges))
        text, ranges = "", []

    for i, seg in enumerate(prompt):
        if isinstance(seg, Text):
            piece = text_after_image(seg.text) if after_image and seg.text else seg.text
            after_image = after_image and not piece
            ranges.append((i, len(text), len(text) + len(piece)))
            text += piece
            if seg.ends_with_eos:
                close()
                after_image = False
        elif isinstance(seg, (Image, Embeds)):
            after_image = True
            if placeholder is None:
                close()
            else:
                ranges.append((i, len(text), len(text) + len(placeholder)))
                text += placeholder
        else:
            raise TypeError(f"not a segment: {type(seg).__name__} (use Text, Image or Embeds)")
    close()
    return out


def segment_token_ids(tokenizer: Any, prompts: list[Prompt], placeholder: str | None, eos_token_id: int,
                      text_after_image: Callable[[str], str] = lambda text: text) -> list[list[list[int] | None]]:
    """Per prompt, per segment: the token ids of a `Text` (its EOS appended when it ends with one), None for an
    `Image` or `Embeds` (their rows are vectors). All strings of the batch go through the tokenizer in one call."""
    plans = [(b, text, ranges) for b, prompt in enumerate(prompts)
             for text, ranges in _strings(prompt, placeholder, text_after_image)]
    out: list[list[list[int] | None]] = [[[] if isinstance(seg, Text) else None for seg in p] for p in prompts]
    if not plans:
        return _with_eos(out, prompts, eos_token_id)
    try:
        enc = tokenizer([text for _, text, _ in plans], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:  # a Python (slow) tokenizer gives no offsets
        raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; load the model's fast tokenizer "
                        "(AutoTokenizer's default)") from err
    expected = tokenizer(placeholder, add_special_tokens=False)["input_ids"] if placeholder else []
    for (b, text, ranges), ids, offsets in zip(plans, enc["input_ids"], enc["offset_mapping"]):
        filled = [(i, s, e) for i, s, e in ranges if e > s]  # empty texts hold no character, so no token
        starts = [s for _, s, _ in filled]
        image_ids: dict[int, list[int]] = {}
        last = 0
        for token, (start, end) in zip(ids, offsets):
            pos = min(end - 1 if end > start else start, len(text) - 1)
            k = max(bisect_right(starts, pos) - 1, last, 0)  # segments in order, whatever the offsets say
            last = k
            i = filled[k][0]
            if isinstance(prompts[b][i], Text):
                out[b][i].append(token)
            else:
                image_ids.setdefault(i, []).append(token)
        for got in image_ids.values():
            if got != expected:
                raise ValueError(f"the image placeholder {placeholder!r} tokenised as {got}, not {expected}: it must "
                                 "be one of the tokenizer's added tokens, matched whole")
    return _with_eos(out, prompts, eos_token_id)


def _with_eos(out: list[list[list[int] | None]], prompts: list[Prompt], eos_token_id: int
              ) -> list[list[list[int] | None]]:
    for ids, prompt in zip(out, prompts):
        for i, seg in enumerate(prompt):
            if isinstance(seg, Text) and seg.ends_with_eos:
                ids[i].append(eos_token_id)
    return out


def follows_image(prompt: Prompt, seg_ids: list[list[int] | None], special_at: int) -> list[bool]:
    """Whether each segment comes right after an `Image`: nothing between them but texts of no token (and no
    special token; `special_at` is where the leading special tokens go, -1 for none)."""
    out, after = [], False
    for i, (seg, ids) in enumerate(zip(prompt, seg_ids)):
        if i == special_at:
            after = False
        out.append(after)
        if isinstance(seg, Image):
            after = True
        elif isinstance(seg, Embeds) or ids:
            after = False
    return out
