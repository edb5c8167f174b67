"""MMICT's Multi-Modal Hub (M-Hub; Chen et al. 2023, arXiv 2312.06363): a Q-Former that also reads text.

The M-Hub is transformers' InstructBLIP Q-Former (`InstructBlipQFormerModel`): learned query tokens and
text tokens share self-attention, and the queries cross-attend to frozen vision features. It gives

- **visual-guided textual features** (`text_features`, for demonstrations): the outputs at the text
  positions of (demo image, demo text), padding removed (the reference code kept padded positions);
- **textual-guided visual features** (`query_features`, for the query): the outputs at the query-token
  positions of (query image, prompt);

both through one trainable linear projection into the frozen LLM's input-embedding space. Trainable:
the Q-Former (text branch included), the query tokens, the vision LayerNorm and the projection.

A sample's visual input is one image or a video: its frames' vision tokens are concatenated into one
cross-attention memory (plus a learned per-frame embedding when `temporal_embedding` is on), padded
across the batch and masked.

With a BLIP-2 backbone the M-Hub starts from the checkpoint's Q-Former, query tokens, vision LayerNorm
and `language_projection`; BLIP-2 checkpoints have no text branch (word and position embeddings, the
text feed-forward), so it starts per `method.mmict.text_init` (`text_init.py`: BERT's weights, as LAVIS, or
the query branch's). `HubInit` reports where every part came from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmict.methods.mmict.text_init import (
    POSITION,
    RANDOM_EMBEDDINGS,
    TEXT_FFN,
    WORD,
    is_text_branch,
    load_bert_text_branch,
    resolve_text_init,
)
from mmict.segments import Pixels

log = logging.getLogger(__name__)

Visual = Pixels | list[Pixels]  # one image, or a video's frames (a list, or a (T, C, H, W) tensor)


def frames_of(visual: Visual) -> list[Pixels]:
    """A sample's images: a video's frames, or the one image."""
    if isinstance(visual, (list, tuple)):
        if not visual:
            raise ValueError("a video sample has no frames")
        return list(visual)
    if torch.is_tensor(visual) and visual.dim() == 4:  # stacked frames (T, C, H, W)
        return list(visual)
    return [visual]


@dataclass
class HubInit:
    """Where the M-Hub's weights came from: what a researcher needs to know before trusting a run."""

    source: str  # "fresh" or the backbone checkpoint
    loaded: list[str] = field(default_factory=list)
    text_init: str = "query_branch"  # method.mmict.text_init, resolved
    parts: dict[str, str] = field(default_factory=dict)  # each part of the M-Hub -> where its weights came from

    def summary(self) -> str:
        head = "M-Hub: fresh (no BLIP-2 checkpoint to start from)" if self.source == "fresh" else \
            f"M-Hub initialised from {self.source}: {len(self.loaded)} tensors loaded"
        lines = [f"{head}; text branch: text_init={self.text_init}"]
        lines += [f"  {part}: {origin}" for part, origin in self.parts.items()]
        return "\n".join(lines)


class MHub(nn.Module):
    def __init__(self, qformer_config: Any, num_query_tokens: int, vision_width: int, llm_width: int,
                 max_frames: int = 0) -> None:
        super().__init__()
        from transformers import InstructBlipQFormerModel

        self.qformer = InstructBlipQFormerModel(qformer_config)
        width = qformer_config.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, width))
        nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
        self.vision_norm = nn.LayerNorm(vision_width)
        # Learned per-frame embedding added to a video's vision tokens; off (None) by default.
        self.temporal = nn.Embedding(max_frames, vision_width) if max_frames > 0 else None
        if self.temporal is not None:
            nn.init.zeros_(self.temporal.weight)  # starts as plain concatenation
        self.projection = nn.Linear(width, llm_width)
        self.num_query_tokens = num_query_tokens

    # ---- the cross-attention memory -----------------------------------------------------------
    def memory(self, per_sample: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples' frame features [[(n, d_v) per frame]] -> padded memory (B, M, d_v) and its mask (B, M)."""
        rows = []
        for frames in per_sample:
            if self.temporal is not None:
                if len(frames) > self.temporal.num_embeddings:
                    raise ValueError(f"a video has {len(frames)} frames; method.mmict.max_frames is "
                                     f"{self.temporal.num_embeddings}: raise it or sample fewer frames")
                frames = [f + self.temporal.weight[t] for t, f in enumerate(frames)]
            rows.append(torch.cat(list(frames), dim=0))
        length = max(r.shape[0] for r in rows)
        memory = rows[0].new_zeros((len(rows), length, rows[0].shape[1]))
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=memory.device)
        for b, row in enumerate(rows):
            memory[b, : row.shape[0]] = row
            mask[b, : row.shape[0]] = 1
        return self.vision_norm(memory), mask

    # ---- the two feature kinds ------------------------------------------------------------------
    def run(self, memory: torch.Tensor, memory_mask: torch.Tensor, input_ids: torch.Tensor | None,
            text_mask: torch.Tensor | None) -> torch.Tensor:
        """Q-Former outputs (B, Q + T, width): queries first, then the text tokens."""
        batch = memory.shape[0]
        queries = self.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=memory.device)
        mask = query_mask if text_mask is None else torch.cat([query_mask, text_mask], dim=1)
        out = self.qformer(input_ids=input_ids, attention_mask=mask, query_embeds=queries,
                           encoder_hidden_states=memory, encoder_attention_mask=memory_mask)
        return out.last_hidden_state

    def query_features(self, memory: torch.Tensor, memory_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                       text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Textual-guided visual features: the query positions, projected -> (B, Q, llm_width)."""
        hidden = self.run(memory, memory_mask, input_ids, text_mask)
        return self.projection(hidden[:, : self.num_query_tokens])

    def text_features(self, memory: torch.Tensor, memory_mask: torch.Tensor, input_ids: torch.Tensor,
                      text_mask: torch.Tensor) -> list[torch.Tensor]:
        """Visual-guided textual features: each sample's real text positions, projected -> [(T_b, llm_width)]."""
        hidden = self.run(memory, memory_mask, input_ids, text_mask)
        projected = self.projection(hidden[:, self.num_query_tokens :])
        return [projected[b, text_mask[b].bool()] for b in range(projected.shape[0])]


# ---- building one ---------------------------------------------------------------------------------
_SHARED = "Q-Former (self- and cross-attention, query feed-forward, input LayerNorm)"
# The Q-Former fields a BLIP-2 checkpoint fixes (the M-Hub must match them to load its weights).
_BLIP2_QFORMER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "cross_attention_frequency", "hidden_act", "layer_norm_eps", "hidden_dropout_prob",
                         "attention_probs_dropout_prob", "initializer_range")


def build_hub(backbone: Any, cfg: Any, vocab_size: int, pad_token_id: int) -> tuple[MHub, HubInit]:
    """The M-Hub for `backbone`, from the backbone's BLIP-2 checkpoint when it is one (and
    `cfg.init_from_backbone`), else fresh with the sizes in `cfg.hub`; its text branch per `cfg.text_init`."""
    from transformers import InstructBlipQFormerConfig

    text_init = resolve_text_init(cfg.text_init, cfg.hub_tokenizer)
    blip2 = backbone.family == "blip2" and cfg.init_from_backbone
    if blip2:
        q = backbone.config.qformer_config
        sizes = {name: getattr(q, name) for name in _BLIP2_QFORMER_FIELDS}
        num_query_tokens = backbone.config.num_query_tokens
    else:
        h = cfg.hub
        sizes = dict(hidden_size=h.hidden_size, num_hidden_layers=h.num_layers, num_attention_heads=h.num_heads,
                     intermediate_size=h.intermediate_size, cross_attention_frequency=h.cross_attention_frequency)
        num_query_tokens = h.num_query_tokens
    config = InstructBlipQFormerConfig(**sizes, vocab_size=vocab_size, pad_token_id=pad_token_id,
                                       max_position_embeddings=cfg.hub.max_text_tokens,
                                       encoder_hidden_size=backbone.vision_hidden_size)
    hub = MHub(config, num_query_tokens, backbone.vision_hidden_size, backbone.hidden_size,
               max_frames=cfg.max_frames if cfg.temporal_embedding else 0)
    init = _load_blip2(hub, backbone, text_init) if blip2 else _fresh(hub, backbone, text_init)
    if text_init == "bert":
        init.parts.update(load_bert_text_branch(hub.qformer, cfg.hub_tokenizer))
    if hub.temporal is not None:
        init.parts["temporal embedding (temporal)"] = "zeros (starts as plain concatenation of the frames)"
    return hub, init


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def report_size(hub: MHub, init: HubInit, backbone: Any) -> int:
    """Say the M-Hub's size at start ("M-Hub: 149.2M parameters (hidden 768, 12 layers, 32 queries; from ...)"), and
    warn when it has more parameters than the backbone's language model: the default sizes (a BERT-base Q-Former,
    the paper's, for 7B LLMs) on a small backbone build a hub bigger than the model it feeds, silently otherwise.
    Returns the M-Hub's parameter count."""
    n = parameter_count(hub)
    q = hub.qformer.config
    origin = "fresh, sizes from method.mmict.hub" if init.source == "fresh" else \
        f"the BLIP-2 checkpoint {init.source}, its sizes"
    log.info("M-Hub: %s parameters (hidden %d, %d layers, %d queries; from %s)", _human(n), q.hidden_size,
             q.num_hidden_layers, hub.num_query_tokens, origin)
    try:
        lm = parameter_count(backbone.language_model)
    except (AttributeError, NotImplementedError):  # an adapter without a separable language model: nothing to compare
        return n
    if n > lm:
        fix = ("set smaller sizes for this backbone: method.mmict.hub.hidden_size / num_layers / num_heads / "
               "intermediate_size (e.g. the backbone's own hidden size)") if init.source == "fresh" else \
            "its sizes come from the BLIP-2 checkpoint (method.mmict.init_from_backbone=false: a fresh one of " \
            "method.mmict.hub's sizes)"
        log.warning("the M-Hub has more parameters (%s) than the backbone's language model (%s, %s): %s",
                    _human(n), _human(lm), getattr(backbone, "name_or_path", "the backbone"), fix)
    return n


def _fresh(hub: MHub, backbone: Any, text_init: str) -> HubInit:
    init = HubInit("fresh", text_init=text_init)
    random = "random (a fresh InstructBLIP Q-Former's init: normal(0, initializer_range))"
    init.parts["query tokens (query_tokens)"] = random
    init.parts[_SHARED] = random
    norm = backbone.vision_output_norm()
    if norm is not None:
        hub.vision_norm.load_state_dict(norm.state_dict())
    init.parts["vision LayerNorm (vision_norm)"] = \
        "the backbone's vision output norm" if norm is not None else "ones and zeros (PyTorch's LayerNorm)"
    init.parts["projection (projection)"] = "random (PyTorch's Linear init)"
    if text_init == "query_branch":  # a fresh text branch: random, as the rest (the init before issue 21)
        init.parts.update({WORD: RANDOM_EMBEDDINGS, POSITION: RANDOM_EMBEDDINGS, TEXT_FFN: random})
    return init


def _load_blip2(hub: MHub, backbone: Any, text_init: str) -> HubInit:
    """Copy BLIP-2's Q-Former, queries, vision LayerNorm and projection; under `text_init=query_branch` start the
    text branch it lacks as before issue 21 (`bert`: `build_hub` loads it from BERT)."""
    model = backbone.model
    source = {f"qformer.{_instructblip_key(k)}": v for k, v in model.qformer.state_dict().items()}
    source["query_tokens"] = model.query_tokens
    source.update({f"vision_norm.{k}": v for k, v in backbone.vision_output_norm().state_dict().items()})
    source.update({f"projection.{k}": v for k, v in model.language_projection.state_dict().items()})
    own = hub.state_dict()
    loaded = sorted(k for k in source if k in own)
    unknown = sorted(k for k in source if k not in own)
    if unknown:
        raise RuntimeError(f"BLIP-2 Q-Former keys with no place in the M-Hub: {unknown[:5]} ... ({len(unknown)})")
    hub.load_state_dict({k: source[k].to(own[k].dtype) for k in loaded}, strict=False)
    missing = [k for k in own if k not in source]
    init = HubInit(str(backbone.name_or_path), loaded=loaded, text_init=text_init)
    ckpt = f"the BLIP-2 checkpoint ({backbone.name_or_path})"
    init.parts.update({"query tokens (query_tokens)": f"{ckpt}: query_tokens", _SHARED: f"{ckpt}: qformer",
                       "vision LayerNorm (vision_norm)": f"{ckpt}: the vision tower's post_layernorm",
                       "projection (projection)": f"{ckpt}: language_projection"})
    other = sorted({_group(k) for k in missing if not is_text_branch(k) and not k.startswith("temporal.")})
    if other:  # none with today's transformers; named, never silent
        init.parts[f"not in the checkpoint: {', '.join(other)}"] = "random (a fresh Q-Former's init)"
    if text_init != "query_branch":
        return init
    # The text feed-forward of every layer starts as a copy of the query feed-forward (the BLIP-2 layer's only
    # one); word and position embeddings start random (std = initializer_range), as in a fresh Q-Former.
    copied = []
    with torch.no_grad():
        for key in missing:
            twin = key.replace(".intermediate.", ".intermediate_query.").replace(".output.", ".output_query.")
            if twin != key and twin in source:
                own[key].copy_(source[twin])
                copied.append(key)
    init.parts[WORD] = init.parts[POSITION] = f"{RANDOM_EMBEDDINGS} (BLIP-2 checkpoints have no text embeddings)"
    init.parts[TEXT_FFN] = f"copied from the query feed-forward ({len(copied)} tensors)"
    return init


def _instructblip_key(key: str) -> str:
    # Blip2QFormerModel keeps its input LayerNorm at the top; InstructBLIP's sits in `embeddings`.
    return f"embeddings.{key}" if key.startswith("layernorm.") else key


def _group(key: str) -> str:
    return ".".join(key.split(".")[:3])


__all__ = ["HubInit", "MHub", "Visual", "build_hub", "frames_of"]
