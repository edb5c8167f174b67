"""A per-head shift of the language model's attention output, before the attention's output projection.

MimIC (Kamichanw/MimIC) adds a learnt, query-dependent vector to every head's attention output right before the
output projection (`src/shift_encoder.py` lines 458-469: `do_shift(layer, q, K, attn_output)` then `o_proj`). The
reference replaces each family's attention `forward` to get there; this module gets the same point on every family
with forward hooks on modules every family already has:

- a forward pre-hook on the output projection (Llama/Mistral/Qwen2/Idefics2 `o_proj`, OPT `out_proj`, T5 `o`),
  whose input is the heads' outputs laid side by side, (B, T, heads * head_dim): the shift is applied there;
- forward hooks on the query and key projections, which give the gate its query and keys. They are the projections'
  outputs, *before* rotary position embedding (the reference's are after it): the hooks see no RoPE, which each
  family applies inside its attention forward. OPT (no RoPE) gets the reference's exact gate.

Generation runs with the KV cache: the keys of earlier steps are kept here, per layer, and a one-token forward adds
its key to them (a forward of more than one token starts afresh). Beam search reorders the model's cache but not
these keys, so under beam search the gate's normaliser of later steps reads each beam slot's own history; greedy
decoding (every toy and most VQA protocols) is exact.

Which layers: `Backbone.attention_layers()` (decoder layers; BLIP-2 with Flan-T5: the encoder's blocks, where the
prompt and, for a teacher, its demonstrations are attended; its decoder sees only the answer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Module names per family: the attention inside a layer, its projections, and the layer's feed-forward.
_ATTENTION = ("self_attn", "self_attention")
_OUT_PROJ = ("o_proj", "out_proj", "o")
_Q_PROJ = ("q_proj", "q")
_K_PROJ = ("k_proj", "k")
_FFN = ("mlp", "fc2")  # Llama/Mistral/Qwen2: mlp; OPT: fc2 (the FFN's output before the residual add)

# (layer, heads (B, T, H, d), queries (B, T, H, d), keys (B, S, H, d), causal) -> shifted heads
ShiftFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass
class HeadSite:
    """One layer's attention: where its heads are shifted and what the gate and the alignment loss read."""

    layer: int
    out_proj: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    ffn: nn.Module  # the layer's feed-forward block, whose output MimIC's alignment loss compares
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _child(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ValueError(f"{type(module).__name__} has no {what} (looked for {', '.join(names)}): override "
                     "Backbone.attention_layers for this family, or add its module name to head_shift.py")


def _attention_and_ffn(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    blocks = getattr(layer, "layer", None)  # T5: layer[0] self-attention (SelfAttention), layer[-1] feed-forward
    if isinstance(blocks, nn.ModuleList):
        return _child(blocks[0], ("SelfAttention",), "self-attention"), _child(blocks[-1], ("DenseReluDense",), "FFN")
    return _child(layer, _ATTENTION, "self-attention"), _child(layer, _FFN, "feed-forward block")


def head_sites(layers: list[nn.Module]) -> list[HeadSite]:
    """Each layer's attention projections and head layout, in layer order."""
    sites = []
    for i, layer in enumerate(layers):
        attn, ffn = _attention_and_ffn(layer)
        q, k, o = _child(attn, _Q_PROJ, "query projection"), _child(attn, _K_PROJ, "key projection"), \
            _child(attn, _OUT_PROJ, "output projection")
        head_dim = getattr(attn, "head_dim", None) or getattr(attn, "key_value_proj_dim", None)
        if not head_dim:
            raise ValueError(f"cannot tell the head size of {type(attn).__name__} (no head_dim / key_value_proj_dim)")
        sites.append(HeadSite(i, o, q, k, ffn, q.out_features // head_dim, k.out_features // head_dim, head_dim))
    return sites


class HeadShift:
    """While attached and enabled, `fn` rewrites every site's per-head attention output (all forwards: training,
    `Backbone.forward`, `generate` with its KV cache). `suspended()` turns it off for a block (a teacher pass)."""

    def __init__(self, sites: list[HeadSite], fn: ShiftFn, causal: bool = False) -> None:
        self.sites, self.fn, self.causal = sites, fn, causal
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._queries: dict[int, torch.Tensor] = {}
        self._keys: dict[int, torch.Tensor] = {}

    def attach(self) -> HeadShift:
        if self._handles:
            return self
        for site in self.sites:
            self._handles += [
                site.q_proj.register_forward_hook(self._keep_queries(site)),
                site.k_proj.register_forward_hook(self._keep_keys(site)),
                site.out_proj.register_forward_pre_hook(self._shift(site)),
            ]
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._queries, self._keys = [], {}, {}

    def __enter__(self) -> HeadShift:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was
            self._queries, self._keys = {}, {}

    def _keep_queries(self, site: HeadSite):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self.enabled:
                self._queries[site.layer] = out.unflatten(-1, (site.num_heads, site.head_dim))
        return hook

    def _keep_keys(self, site: HeadSite):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not self.enabled:
                return
            keys = out.unflatten(-1, (site.num_kv_heads, site.head_dim))
            if site.num_kv_heads != site.num_heads:  # grouped-query attention: each key serves a group of heads
                keys = keys.repeat_interleave(site.num_heads // site.num_kv_heads, dim=2)
            old = self._keys.get(site.layer)
            # One new token after a forward of this batch: a generation step with the KV cache (keys so far + its own).
            step = old is not None and keys.shape[1] == 1 and old.shape[0] == keys.shape[0]
            self._keys[site.layer] = torch.cat([old, keys], dim=1) if step else keys
        return hook

    def _shift(self, site: HeadSite):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not self.enabled:
                return None
            x = args[0]
            heads = x.unflatten(-1, (site.num_heads, site.head_dim))
            shifted = self.fn(site.layer, heads, self._queries[site.layer], self._keys[site.layer], self.causal)
            return (shifted.flatten(-2), *args[1:])
        return hook


@contextmanager
def recorded_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Each module's output of the forward run inside the block (the first element of a tuple output)."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)

    def keep(i: int):
        def hook(module: nn.Module, args: tuple, out) -> None:
            outputs[i] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["HeadShift", "HeadSite", "ShiftFn", "head_sites", "recorded_outputs"]
