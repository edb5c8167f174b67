"""How close two fp32 computations of the same thing must be when their matmul shapes differ.

A padded batch, a batch of two or the HF model's own forward compute the same values as a single unpadded
prompt, but through matmuls of other shapes. BLAS then picks other kernels and blockings, so sums over the
hidden dimension are added in another order. Each such sum is off by up to ~sqrt(K) * 1.2e-7 (fp32 epsilon)
of the magnitudes it adds. Through a few layers, and with the tiny models' wide LM weights (std 0.5: logits
of order 10), that reaches 1e-5 to 4e-5: with transformers 5.25 and torch 2.15 the BLIP-2 Flan-T5 tests
measured 1.3e-5 to 2.05e-5 on one 2-core x86 machine and up to 3.7e-5 on another, against the old
atol=1e-5 (the suite was last green with it under transformers 5.23).

So the tolerance scales with the reference's magnitude and has a floor:

    atol = 1e-4 + 1e-5 * max|reference|,  rtol = 0

For those tests (max|logit| about 8) that is 1.8e-4: about 5 times the largest noise measured, and far below
what a real mismatch gives. A wrong position, an unmasked pad or a wrong token moves the same logits by 2.5e4
to 4e4 times this tolerance (`test_real_mismatch_fails_by_orders_of_magnitude` in
tests/mmict/backbones/test_backbone_blip2.py asserts at least 100 times, for each mistake and both LMs).
Computations through the *same* shapes (the same forward twice, a tensor saved and loaded back) are compared
exactly or at torch's defaults instead, not with this.
"""

from __future__ import annotations

import torch

FLOOR, SCALE = 1e-4, 1e-5


def fp32_atol(reference: torch.Tensor) -> float:
    """The absolute tolerance for `reference` recomputed through matmuls of other shapes (see the module doc)."""
    return FLOOR + SCALE * float(reference.detach().abs().max()) if reference.numel() else FLOOR


def assert_fp32_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    """`actual` equals `reference` up to the reordering noise of fp32 sums (shapes checked exactly)."""
    torch.testing.assert_close(actual, reference, atol=fp32_atol(reference), rtol=0)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())
