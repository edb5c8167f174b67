"""Adding a vector to the language model's residual stream: one per decoder layer, through forward hooks.

In-context-vector methods (LIVE, `mmict.methods.live`) shift the frozen LM's hidden states by a learnt vector per
layer. This module finds the layers through the backbone protocol (`backbone.language_model` and
`backbone.decoder_layer_cls`), so every family gets the same hook:

- decoder-only families (LLaVA, LLaVA-NeXT, Idefics2/3, Qwen2-VL, BLIP-2-OPT): the LM's decoder layers, in order;
- encoder-decoder BLIP-2-T5: the encoder's blocks. The prompt (image queries, question) lives in the encoder, so
  its states are "the query's hidden states" that LIVE shifts; the decoder only ever holds the answer being
  generated and reads the shifted prompt through cross-attention. (T5's decoder blocks are of the same class and
  are deliberately left alone.)

`site` says which output is shifted: "layer" (the decoder layer's output, the residual stream; LIVE's reference
for Idefics-v1, config/lmm/idefics-9B.yaml line 7) or "mlp" (the layer's MLP output, before it is added to the
residual; LIVE's reference for Idefics2, config/lmm/idefics2-8B-base.yaml line 8).

The shift applies at every position of every forward the hooks see, generation included: with the KV cache, each
new token's position gets it as it is computed (LIVE's reference edits every layer call inside `generate`,
icv_src/icv_model/icv_intervention.py lines 115-129). `positions` restricts it to a (B, T) mask of a full-length
forward; forwards of another length (cached generation steps) follow `shift_generated`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

SITES: tuple[str, ...] = ("layer", "mlp")


def steered_layers(backbone: Any, site: str = "layer") -> list[nn.Module]:
    """The modules whose outputs get one vector each, in layer order (see the module docstring)."""
    if site not in SITES:
        raise ValueError(f"steering site {site!r}: use one of {SITES}")
    lm = backbone.language_model
    if getattr(backbone, "is_encoder_decoder", False):
        layers = list(lm.encoder.block)
    else:
        cls = backbone.decoder_layer_cls
        layers = [m for m in lm.modules() if isinstance(m, cls)]
    if not layers:
        raise RuntimeError(f"no {backbone.decoder_layer_cls.__name__} layers found in {type(lm).__name__}: "
                           f"the {backbone.family} adapter's language_model / decoder_layer_cls do not match")
    if site == "mlp":
        missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), nn.Module)]
        if missing:
            raise ValueError(f"steering site 'mlp': layers {missing} of {backbone.family} have no `.mlp` submodule; "
                             "use site 'layer'")
        layers = [layer.mlp for layer in layers]
    return layers


def shift_hidden(hidden: torch.Tensor, shift: torch.Tensor, preserve_norm: bool,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """`hidden` (B, T, D) + `shift` (D,); with `preserve_norm` each position's result rescaled to the norm it had
    (LIVE's reference, icv_intervention.py lines 66-73). `mask` (B, T) bool: only there."""
    shift = shift.to(hidden.dtype)
    shifted = hidden + shift
    if preserve_norm:
        # The reference divides by the shifted norm unguarded; the clamp only matters at all-zero rows (padding).
        shifted = shifted / shifted.norm(dim=-1, keepdim=True).clamp_min(1e-12) * hidden.norm(dim=-1, keepdim=True)
    if mask is not None:
        shifted = torch.where(mask.to(hidden.device).unsqueeze(-1), shifted, hidden)
    return shifted


class ResidualSteering:
    """Forward hooks that add `shifts()[i]` (a (num_layers, D) tensor, recomputed at each forward so gradients reach
    the vectors) to the output of layer i. Hooks stay registered until `remove`; `enabled` switches them off (a
    disabled hook leaves the output untouched: bit-identical to no hook)."""

    def __init__(self, backbone: Any, shifts: Callable[[], torch.Tensor], site: str = "layer",
                 preserve_norm: bool = True, shift_generated: bool = True) -> None:
        self.layers = steered_layers(backbone, site)
        self.shifts, self.preserve_norm, self.shift_generated = shifts, preserve_norm, shift_generated
        self.enabled = True
        self.positions: torch.Tensor | None = None  # (B, T) bool mask of full-length forwards; None: everywhere
        self._current: torch.Tensor | None = None
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.enabled:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            # the shifts are computed once per forward, at its first layer, then read by the others
            if index == 0 or self._current is None:
                self._current = self.shifts()
                if self._current.shape[0] != len(self.layers):
                    raise ValueError(f"steering has {len(self.layers)} layers but the shifts are "
                                     f"{tuple(self._current.shape)}: give one vector per layer")
            mask = self.positions
            if mask is not None and mask.shape[:2] != hidden.shape[:2]:
                if not self.shift_generated:
                    return None
                mask = None  # a cached generation step: its new positions are shifted
            new = shift_hidden(hidden, self._current[index], self.preserve_norm, mask)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._current = None

    @contextmanager
    def set(self, enabled: bool, positions: torch.Tensor | None = None) -> Iterator[ResidualSteering]:
        """Within the block: hooks on or off, and the position mask; restored after."""
        before = self.enabled, self.positions
        self.enabled, self.positions, self._current = enabled, positions, None
        try:
            yield self
        finally:
            (self.enabled, self.positions), self._current = before, None


@contextmanager
def steer(backbone: Any, shifts: torch.Tensor | Callable[[], torch.Tensor], site: str = "layer",
          preserve_norm: bool = True, positions: torch.Tensor | None = None,
          shift_generated: bool = True) -> Iterator[ResidualSteering]:
    """Within the block, every forward (and generation) of `backbone` has layer i's output shifted by `shifts[i]`;
    the hooks are removed on exit. `shifts`: a (num_layers, D) tensor, or a callable giving one."""
    fn = shifts if callable(shifts) else (lambda: shifts)
    steering = ResidualSteering(backbone, fn, site, preserve_norm, shift_generated)
    steering.positions = positions
    try:
        yield steering
    finally:
        steering.remove()
