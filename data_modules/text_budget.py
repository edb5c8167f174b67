"""Texts cut to a token budget (`data.max_text_tokens`) before they reach a training step, and counted.

A web document can hold a text of 100,000 words; read whole, it makes a sequence no step finishes. Every text an
episode takes is cut here, in the DataLoader worker: first to `CHARS_PER_TOKEN` characters per token of the budget
(so no tokenizer ever sees a huge text whole), then, when the backbone's tokenizer is given, to the budget's number
of tokens at a token boundary. Each cut is counted in the skip report under its reason (`skips.record_cut`: "cut:
text to 512 tokens (data.max_text_tokens)"): the text is kept, shortened, and never shortened silently.

The tokens are counted for the text alone; inside a prompt a tokenizer may split its first word differently, so the
budget holds to within a token or two.
"""

from __future__ import annotations

from typing import Any

from .skips import record_cut

# A token of real text averages 3-5 characters: 8 per token leaves the token cut the one that binds for ordinary
# text, while bounding what the tokenizer reads.
CHARS_PER_TOKEN = 8


class TextBudget:
    """Cuts texts to ``max_tokens`` tokens of ``tokenizer`` (None: to ``max_tokens * CHARS_PER_TOKEN`` characters
    only). Picklable with the stream it belongs to (a Hugging Face tokenizer pickles)."""

    def __init__(self, max_tokens: int, tokenizer: Any = None) -> None:
        if int(max_tokens) < 1:
            raise ValueError(f"data.max_text_tokens must be at least 1, got {max_tokens}: it is how many tokens of "
                             "a web text an episode keeps (the schema's default is 512)")
        self.max_tokens = int(max_tokens)
        self.max_chars = self.max_tokens * CHARS_PER_TOKEN
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> str:
        if len(text) > self.max_chars:
            text = text[: self.max_chars]
            if self.tokenizer is None:
                record_cut(f"text to {self.max_chars} characters (data.max_text_tokens={self.max_tokens})")
                return text
            cut = self._to_tokens(text)
            # whichever cut binds is the one reported
            record_cut(f"text to {self.max_tokens} tokens (data.max_text_tokens)" if cut is not None else
                       f"text to {self.max_chars} characters (data.max_text_tokens={self.max_tokens})")
            return text if cut is None else cut
        # A text of fewer UTF-8 bytes than the budget has fewer tokens too (a token covers at least one byte): most
        # texts end here, untokenized.
        if self.tokenizer is None or len(text.encode("utf-8")) <= self.max_tokens:
            return text
        cut = self._to_tokens(text)
        if cut is None:
            return text
        record_cut(f"text to {self.max_tokens} tokens (data.max_text_tokens)")
        return cut

    def _to_tokens(self, text: str) -> str | None:
        """``text`` cut after its ``max_tokens``-th token; None when it has no more tokens than that."""
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a Python (slow) tokenizer gives no offsets: decode the kept ids instead
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= self.max_tokens:
                return None
            return self.tokenizer.decode(ids[: self.max_tokens])
        offsets = enc["offset_mapping"]
        if len(offsets) <= self.max_tokens:
            return None
        return text[: offsets[self.max_tokens - 1][1]]


__all__ = ["CHARS_PER_TOKEN", "TextBudget"]
