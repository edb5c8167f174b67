"""Segments: the one representation every method uses to describe a prompt.

A prompt is a list of segments. The backbone adapter turns a batch of such lists into
`inputs_embeds`, attention mask, position ids and labels (see `mmict.backbones.base`). AIM turns a
demonstration into `Embeds(fused tokens)`, vanilla ICL keeps `Image` + `Text`, and the query is always
`Image` + `Text` (+ a target `Text` during training). One assembly path, tested once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Text:
    """Plain text, tokenized by the backbone's tokenizer without special tokens.

    `target=True` marks the tokens the loss is computed on (the backbone appends EOS to a target so
    the model learns where to stop).
    """

    text: str
    target: bool = False


@dataclass(frozen=True)
class Image:
    """Pixels as the backbone's image processor makes them: (C, H, W)."""

    pixels: torch.Tensor


@dataclass(frozen=True)
class Embeds:
    """Vectors already in the language model's input-embedding space: (n, d)."""

    embeds: torch.Tensor


Segment = Text | Image | Embeds
Prompt = list[Segment]
