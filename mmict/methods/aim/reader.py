"""AIM (Gao et al. 2024, arXiv 2406.07588): demos read alone, compressed into fused tokens.

The frozen MLLM reads each (image, text) demonstration on its own. The hidden states at the demo's
text positions, which have attended over the demo's image, go through a trainable projection into
the LLM's input-embedding space: one *fused token* per text token. The fused tokens replace the whole
demo (image tokens included) in the query prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmict.backbones.base import Backbone
from mmict.config.schema import PROJECTOR_INITS
from mmict.segments import Image, Pixels, Text


class FusedTokenProjector(nn.Module):
    """Hidden states (n, d_hidden) -> fused tokens (n, d_embed). Linear by default, MLP as an option."""

    def __init__(self, d_hidden: int, d_embed: int, kind: str = "linear", mlp_hidden: int | None = None,
                 init: str = "default") -> None:
        super().__init__()
        if init not in PROJECTOR_INITS:
            raise ValueError(f"unknown projector init '{init}': use one of {', '.join(PROJECTOR_INITS)}")
        if init == "identity" and (kind != "linear" or d_hidden != d_embed):
            raise ValueError(f"an identity init needs a square linear projector (got {kind}, {d_hidden} -> {d_embed})")
        if kind == "linear":
            self.net: nn.Module = nn.Linear(d_hidden, d_embed)
            if init == "identity":
                nn.init.eye_(self.net.weight)
                nn.init.zeros_(self.net.bias)
        elif kind == "mlp":
            width = mlp_hidden or d_embed
            self.net = nn.Sequential(nn.Linear(d_hidden, width), nn.GELU(), nn.Linear(width, d_embed))
        else:
            raise ValueError(f"unknown projector kind '{kind}': use 'linear' or 'mlp'")
        self.d_hidden, self.d_embed = d_hidden, d_embed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


class DemoReader:
    """Reads demonstrations with the frozen backbone and returns their text-position hidden states.

    Every demo is its own sequence `[BOS][demo image][demo text]` (never attending to other demos or the
    query), which is what lets fused tokens of a fixed demo be computed once and cached.
    """

    def __init__(self, backbone: Backbone, layer: int = -1, final_norm: bool = True) -> None:
        n_states = backbone.num_layers + 1
        if not -n_states <= layer < n_states:
            raise ValueError(
                f"method.aim.layer={layer} is out of range for a {n_states - 1}-layer LM "
                f"(use -1 for the final layer, or 0..{n_states - 1})"
            )
        self.backbone = backbone
        self.layer = layer % n_states
        self.is_final = self.layer == n_states - 1
        self.final_norm = final_norm

    @torch.no_grad()
    def read(self, images: Sequence[Pixels], texts: list[str]) -> list[torch.Tensor]:
        """N preprocessed images and N texts -> N tensors (n_text_tokens_i, d)."""
        if len(texts) == 0:
            return []
        prompts = [[Image(img), Text(text)] for img, text in zip(images, texts)]
        batch = self.backbone.assemble(prompts, padding_side="right")
        hidden = self.backbone.hidden_states(batch)[self.layer]
        # transformers' last hidden state already has the final norm; earlier layers get it on request.
        if not self.is_final and self.final_norm:
            hidden = self.backbone.final_norm(hidden)
        text_spans = [spans[1] for spans in batch.spans]
        return [hidden[b, s:e] for b, (s, e) in enumerate(text_spans)]
