"""Every attention layer of distgan goes through `attend`, which is F.scaled_dot_product_attention.

PyTorch picks the fastest backend for the inputs (flash, memory-efficient, cuDNN; flash on the CPU
too), but only the math backend has a derivative of its backward: a gradient penalty differentiated
twice (`variant.penalty_mode=exact`, the lazy mode's regularisation step, unrolled D steps with
`variant.unroll_grad`) fails with "derivative for ..._attention_backward is not implemented". Those
code paths run inside `math_only()`, which `attend` reads at each call; everything else (approximate
penalties, G, sampling) lets PyTorch choose.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_math_only = False


@contextlib.contextmanager
def math_only():
    """Attention inside this block runs SDPA's math backend (differentiable twice)."""
    global _math_only
    before, _math_only = _math_only, True
    try:
        yield
    finally:
        _math_only = before


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dimensions (scale None: 1 / sqrt(q's last dim))."""
    if _math_only:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
