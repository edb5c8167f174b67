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

    `target=True` marks the tokens the loss is computed on. The backbone appends EOS to a target so
    the model learns where to stop; `eos` overrides that (a pretraining document's inner texts are
    targets that go on into the next image, so they take no EOS).
    """

    text: str
    target: bool = False
    eos: bool | None = None  # None: EOS after a target, none after plain text

    @property
    def ends_with_eos(self) -> bool:
        return self.target if self.eos is None else self.eos


# One image as the backbone's `image_transform` makes it: a (C, H, W) tensor for fixed-resolution
# families (LLaVA-1.5, BLIP-2), or a dict of the processor's per-image outputs where the image carries
# more than pixels (LLaVA-NeXT tiles + image size, Qwen2-VL patches + grid, Idefics crops + mask).
Pixels = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class Image:
    """One image, preprocessed by the backbone (`backbone.image_transform`)."""

    pixels: Pixels


@dataclass(frozen=True)
class Embeds:
    """Vectors already in the language model's input-embedding space: (n, d)."""

    embeds: torch.Tensor


Segment = Text | Image | Embeds
Prompt = list[Segment]
