"""AIM (Gao et al. 2024, arXiv 2406.07588): demos read alone, compressed into fused tokens.

The frozen MLLM reads each (image, text) demonstration on its own. The hidden states at the demo's
text positions, which have attended over the demo's image, go through a trainable projection into
the LLM's input-embedding space: one *fused token* per text token. The fused tokens replace the whole
demo (image tokens included) in the query prompt.

How a demo is read (`method.aim.read_format`) and which of its positions are kept (`method.aim.read_span`):

- raw, text (the default, the paper's): `[BOS][image][text]`, the text's positions;
- raw, answer: `[BOS][image][instruction][answer]`, the answer's positions;
- chat, text: `[BOS][chat prefix][image][instruction][chat suffix][answer]` (one user turn, image + instruction,
  then the assistant's answer, wrapped by the model's template as a query is: `Backbone.wrap_query`, which may
  also put the template's text between the image and the instruction, and before the answer), the instruction's
  and the answer's positions in that order, never the template's own tokens;
- chat, answer: the same sequence, the answer's positions.

A demo text is split (`split_demo`) after the last of the answer cues it holds (`method.aim.answer_cues`, e.g.
"Short answer:" in the task table's "Question:{q} Short answer:{a}"); a text without a cue (a web document's
text, MMICT's bare captions) is all answer, with no instruction. The split is a function of the text alone, so a
demo's reading stays a function of its text and image, which is what the demonstration bank stores by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from mmict.backbones.base import Backbone
from mmict.config.schema import AIM_ANSWER_CUES, AIM_READ_FORMATS, AIM_READ_SPANS, PROJECTOR_INITS
from mmict.segments import Image, Pixels, Prompt, Text


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


def split_demo(text: str, cues: Sequence[str]) -> tuple[str, str]:
    """(instruction, answer) of a demo text: the answer follows the cue that ends last in the text, leading
    whitespace left out; the instruction is the text up to and including that cue. ("", text) when the text holds
    no cue or nothing follows it: the whole text is the answer."""
    end = max((text.rfind(c) + len(c) for c in cues if c and c in text), default=-1)
    answer = text[end:].lstrip() if end >= 0 else ""
    if not answer:
        return "", text
    return text[:end], answer


class DemoReader:
    """Reads demonstrations with the frozen backbone and returns their text-position hidden states.

    Every demo is its own sequence (see the module docstring for its layout per `read_format`), never attending
    to other demos or the query, which is what lets fused tokens of a fixed demo be computed once and cached.
    """

    def __init__(self, backbone: Backbone, layer: int = -1, final_norm: bool = True, read_format: str = "raw",
                 read_span: str = "text", answer_cues: Sequence[str] = AIM_ANSWER_CUES) -> None:
        n_states = backbone.num_layers + 1
        if not -n_states <= layer < n_states:
            raise ValueError(
                f"method.aim.layer={layer} is out of range for a {n_states - 1}-layer LM "
                f"(use -1 for the final layer, or 0..{n_states - 1})"
            )
        if read_format not in AIM_READ_FORMATS:
            raise ValueError(f"unknown method.aim.read_format '{read_format}': use one of {AIM_READ_FORMATS}")
        if read_span not in AIM_READ_SPANS:
            raise ValueError(f"unknown method.aim.read_span '{read_span}': use one of {AIM_READ_SPANS}")
        self.backbone = backbone
        self.layer = layer % n_states
        self.is_final = self.layer == n_states - 1
        self.final_norm = final_norm
        self.read_format, self.read_span, self.answer_cues = read_format, read_span, tuple(answer_cues)
        self.chat_template: str | None = None  # the template's hash, for the bank's key
        if read_format == "chat":
            if backbone.chat_affixes() is None:
                raise ValueError(f"method.aim.read_format=chat reads demos through the chat template, and backbone "
                                 f"{backbone.name_or_path} has none (or backbone.chat_template=false): use "
                                 "method.aim.read_format=raw")
            self.chat_template = hashlib.sha256(str(backbone.chat_template).encode()).hexdigest()[:16]

    @property
    def splits(self) -> bool:
        """Whether demos are split into instruction and answer (every reading but raw text)."""
        return not (self.read_format == "raw" and self.read_span == "text")

    def reading_key(self) -> dict | None:
        """What the reading depends on beyond the layer and norm (the demonstration bank's key); None for the
        default raw text reading, so banks built before these settings existed keep their key."""
        if not self.splits:
            return None
        key = {"read_format": self.read_format, "read_span": self.read_span, "answer_cues": list(self.answer_cues)}
        if self.chat_template is not None:
            key["chat_template"] = self.chat_template
        return key

    def demo_prompt(self, image: Pixels, text: str) -> tuple[Prompt, list[int]]:
        """One demo's sequence (BOS excluded: `assemble` adds it), and its segments whose positions are read."""
        if not self.splits:
            return [Image(image), Text(text)], [1]
        instruction, answer = split_demo(text, self.answer_cues)
        user: Prompt = [Image(image)] + ([Text(instruction)] if instruction else [])
        kept = user[1:] if self.read_span == "text" else []
        if self.read_format == "raw":
            prompt = [*user, Text(answer)]
        else:  # wrapped as a query is (`Backbone.wrap_query`), the answer as the assistant's turn, no EOS after it
            prompt = self.backbone.wrap_query([*user, Text(answer, target=True, eos=False)])
        read = [i for i, seg in enumerate(prompt) if any(seg is k for k in kept)]
        if len(read) != len(kept):
            raise RuntimeError(f"the chat wrap of {self.backbone.name_or_path} did not keep the demo's instruction "
                               "as its own segment: its positions cannot be read")
        return prompt, [*read, len(prompt) - 1]  # the answer is the wrapped prompt's last segment

    @torch.no_grad()
    def read(self, images: Sequence[Pixels], texts: list[str]) -> list[torch.Tensor]:
        """N preprocessed images and N texts -> N tensors (n_read_tokens_i, d)."""
        if len(texts) == 0:
            return []
        made = [self.demo_prompt(img, text) for img, text in zip(images, texts)]
        batch = self.backbone.assemble([prompt for prompt, _ in made], padding_side="right")
        hidden = self.backbone.hidden_states(batch)[self.layer]
        # transformers' last hidden state already has the final norm; earlier layers get it on request.
        if not self.is_final and self.final_norm:
            hidden = self.backbone.final_norm(hidden)
        out = []
        for b, (_, read) in enumerate(made):
            parts = [hidden[b, s:e] for s, e in (batch.spans[b][i] for i in read)]
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return out
