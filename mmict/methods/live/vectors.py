"""LIVE's trainable part: a vector per steered layer and its scale (alpha).

As the reference's `GlobalICVEncoder` (icv_src/icv_encoder/global_icv_encoder.py lines 26-43): vectors of shape
(1, layers, d) drawn from N(0, 0.01^2), scales of shape (1, layers) filled with `alpha_init`, optionally through a
sigmoid; the shift at layer i is alpha_i * v_i (icv_src/icv_module.py lines 89-92).
"""

from __future__ import annotations

import torch
from torch import nn


class LiveVectors(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, alpha_init: float = 0.1, alpha_sigmoid: bool = False,
                 alpha_learnable: bool = True, init_std: float = 0.01) -> None:
        super().__init__()
        # The state-dict names `icv` and `alpha` are what checkpoints hold: the reference's own names.
        self.alpha = nn.Parameter(torch.full((1, num_layers), float(alpha_init)), requires_grad=alpha_learnable)
        self.icv = nn.Parameter(torch.empty(1, num_layers, hidden_size))
        nn.init.normal_(self.icv, mean=0.0, std=init_std)
        self.alpha_sigmoid = alpha_sigmoid

    def scales(self) -> torch.Tensor:
        """(layers,) the per-layer scale."""
        return (torch.sigmoid(self.alpha) if self.alpha_sigmoid else self.alpha)[0]

    def forward(self) -> torch.Tensor:
        """(layers, d) the shift added at each layer."""
        return self.scales().unsqueeze(-1) * self.icv[0]
