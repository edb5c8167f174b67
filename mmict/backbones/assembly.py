"""Assembled LM inputs: the rows `Backbone.assemble` builds segment by segment, padded into one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmict.backbones.tokens import NO_TOKEN
from mmict.segments import Segment, Text

IGNORE_INDEX = -100  # label value the cross-entropy skips (transformers' convention)


@dataclass
class Assembled:
    """A batch of prompts in the language model's input space.

    `spans[b][i]` is the [start, end) range of segment i of prompt b in the padded sequence, so
    callers can pick hidden states at a segment's positions (AIM reads demo text positions).
    """

    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    position_ids: torch.Tensor  # (B, L); (4, B, L) for Qwen2-VL's multimodal rotary positions
    labels: torch.Tensor  # (B, L), IGNORE_INDEX outside target segments; not shifted
    spans: list[list[tuple[int, int]]]
    input_ids: torch.Tensor | None = None  # (B, L) token ids; NO_TOKEN (-1) at image, Embeds and padding rows

    @property
    def context_tokens(self) -> torch.Tensor:
        """Real (non-padding) positions per prompt: what the frozen model attends over."""
        return self.attention_mask.sum(dim=1)


@dataclass
class Row:
    """One prompt's rows: embeddings, labels and token ids, with each caller segment's span and the layout
    (segment, rows) that position ids are computed from (special tokens count as text)."""

    parts: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    layout: list[tuple[Segment, int]] = field(default_factory=list)
    length: int = 0

    def add(self, embeds: torch.Tensor, ids: list[int] | None, labels: torch.Tensor | None = None,
            segment: Segment | None = None) -> None:
        """Rows of a caller's `segment` (a span), or of special tokens when `segment` is None. `ids` None: vectors
        (image features, Embeds); `labels` None: no label."""
        n = int(embeds.shape[0])
        self.parts.append(embeds)
        self.labels.append(torch.full((n,), IGNORE_INDEX, dtype=torch.long) if labels is None else labels.long())
        self.ids.extend([NO_TOKEN] * n if ids is None else ids)
        if segment is not None:
            self.spans.append((self.length, self.length + n))
        self.layout.append((Text("") if segment is None else segment, n))
        self.length += n


def pad(rows: list[Row], hidden_size: int, padding_side: str, device: torch.device, dtype: torch.dtype
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
    """(inputs_embeds, attention_mask, labels, input_ids, spans) of the rows padded to the longest."""
    length = max(row.length for row in rows)
    embeds = torch.zeros((len(rows), length, hidden_size), device=device, dtype=dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
    input_ids = torch.full((len(rows), length), NO_TOKEN, dtype=torch.long, device=device)
    spans = []
    for b, row in enumerate(rows):
        n = row.length
        start = length - n if padding_side == "left" else 0
        if n:
            embeds[b, start : start + n] = torch.cat(row.parts)
            labels[b, start : start + n] = torch.cat(row.labels).to(device)
            input_ids[b, start : start + n] = torch.tensor(row.ids, dtype=torch.long)
        mask[b, start : start + n] = 1
        spans.append([(s + start, e + start) for s, e in row.spans])
    return embeds, mask, labels, input_ids, spans
