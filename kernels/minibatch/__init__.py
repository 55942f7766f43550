"""Minibatch discrimination (Salimans et al. 2016), one op in one folder: `minibatch_discrimination` (this
file) decides the path once per call: the custom op under torch.compile (op.py), the Triton kernels
(triton.py) where `_backend.choose` picks them, else the PyTorch reference (reference.py).
"""

from __future__ import annotations

import torch

from kernels import _backend
from kernels.minibatch import op, reference


def minibatch_discrimination(
    m: torch.Tensor,
    *,
    exclude_self: bool = True,
    group_size: int | None = None,
    backend: str | None = None,
    memory_budget: int = reference.DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """Minibatch discrimination features (Salimans et al. 2016):

        o[i, b] = sum_{j != i} exp(-sum_k |m[i, b, k] - m[j, b, k]|)

    Args:
        m: (B, O, K) fp32, bf16 or fp16 (fp64 on the torch backend): the M = x @ T of the paper,
            reshaped to B samples, O kernels of dimension K. Any strides.
        exclude_self: drop the j = i term (which is always exp(0) = 1).
        group_size: compare each sample only with those in its block of `group_size` consecutive
            rows (e.g. B/2 for D run on cat([real, fake]), so fakes never meet reals). None: one group.
        backend: None (auto: Triton on CUDA, the PyTorch fallback elsewhere; DISTGAN_KERNELS=torch|triton
            overrides), "triton" or "torch". Asking for Triton where it cannot run warns once and falls back.
        memory_budget: bytes of temporaries the PyTorch fallback may use (it works in blocks of rows).

    Returns:
        (B, O) in m's dtype, accumulated in fp32. Differentiable, twice (see MinibatchL1Triton).
    """
    if m.ndim != 3:
        raise ValueError(f"m must be (B, O, K); got shape {tuple(m.shape)}")
    if not m.is_floating_point():
        raise TypeError(f"m must be a floating-point tensor; got {m.dtype}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1 or None; got {group_size}")
    if torch.compiler.is_compiling():  # one custom op, or the fallback's torch ops for Inductor to fuse
        if _backend.compiled_op(backend, m):
            return op.minibatch_discrimination(m, exclude_self, group_size)
        return reference.minibatch_l1(m, exclude_self, group_size, memory_budget)
    if _backend.choose("minibatch_discrimination", backend, m) == "triton":
        from kernels.minibatch.triton import MinibatchL1Triton

        return MinibatchL1Triton.apply(m, exclude_self, group_size)
    return reference.minibatch_l1(m, exclude_self, group_size, memory_budget)
