"""MimIC's attention heads: a learnt per-head shift, scaled per query by a gate that mimics the demonstrations' share
of the attention (Kamichanw/MimIC `src/shift_encoder.py`, `AttnApproximator` with
VECTOR_SHIFT | LEARNABLE_SHIFT_SCALE | MULTI_HEAD, the `mimic` encoder config).

For query q at one head, attention over demos D and the query's own context K splits as
    SA(q, [D; K]) = mu * SA(q, D) + (1 - mu) * SA(q, K),   mu = Z1 / (Z1 + Z2),
with Z1 = sum exp(q d) over the demo keys (unknown without demos: learnt as log Z1 = w . q + b, per head) and
Z2 = sum exp(q k / sqrt(d)) over the query's own keys. The head's output gets `+ mu * shift`: the shift stands for
the demos' term (the reference's `attn_output + mu * shift`, line 724; it drops the (1 - mu) factor, and so do we).
"""

from __future__ import annotations

import torch
from torch import nn


class MultiheadGate(nn.Module):
    """log Z1 per head: a linear function of the head's query (the reference's `MultiheadLinear`, lines 547-556:
    weights ~ N(0, 0.02^2), bias 0)."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_layers, num_heads, head_dim).normal_(0, 0.02))
        self.bias = nn.Parameter(torch.zeros(num_layers, num_heads))

    def forward(self, layer: int, queries: torch.Tensor) -> torch.Tensor:
        """(B, T, H, d) queries -> (B, T, H) log Z1."""
        return torch.einsum("btnd,nd->btn", queries, self.weight[layer]) + self.bias[layer]


class MimICShift(nn.Module):
    """Every layer's per-head shift and gate: the only parameters MimIC trains."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        # The reference's init (lines 609-620): randn * 0.001, so the untrained model is almost the frozen one.
        self.shift = nn.Parameter(torch.randn(num_layers, num_heads, head_dim) * 0.001)
        self.gate = MultiheadGate(num_layers, num_heads, head_dim)

    def gate_values(self, layer: int, queries: torch.Tensor, keys: torch.Tensor, causal: bool) -> torch.Tensor:
        """mu, (B, T, H): the demos' share of the attention each query would give them (reference lines 694-715)."""
        q, k = queries.float(), keys.float()
        scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
        if causal and scores.shape[-1] >= scores.shape[-2]:
            # Query t sees keys up to its own position (the last T keys are the queries' own): what the model's
            # attention sees. The reference sums over every key of the sequence (causal=False).
            t, s = scores.shape[-2:]
            future = torch.ones(t, s, dtype=torch.bool, device=scores.device).triu(s - t + 1)
            scores = scores.masked_fill(future, float("-inf"))
        log_z2 = torch.logsumexp(scores, dim=-1).transpose(1, 2)  # (B, T, H)
        log_z1 = self.gate(layer, q)
        return torch.exp(log_z1 - torch.logaddexp(log_z1, log_z2))

    def forward(self, layer: int, heads: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                causal: bool = False) -> torch.Tensor:
        """(B, T, H, d) attention output per head -> shifted (`mmict.backbones.head_shift.ShiftFn`)."""
        mu = self.gate_values(layer, queries, keys, causal).unsqueeze(-1)
        return heads + (mu * self.shift[layer]).to(heads.dtype)


__all__ = ["MimICShift", "MultiheadGate"]
