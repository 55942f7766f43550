"""distgan's GPU kernels (Triton), each with a PyTorch reference and fallback.

Imports torch and triton, never distgan, so it is usable on its own.

- `minibatch_discrimination(m, ...)`: minibatch discrimination's pairwise L1 similarity sums.
- `spectral_norm(module, ...)`: a drop-in for torch.nn.utils.parametrizations.spectral_norm
  (PyTorch implementation so far; the fused Triton power iteration is still to come).
"""

from __future__ import annotations

import torch

from kernels import _backend, reference

__all__ = ["minibatch_discrimination", "spectral_norm"]


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
    if _backend.choose("minibatch_discrimination", backend, m) == "triton" and m.dtype != torch.float64:
        from kernels.minibatch_l1 import MinibatchL1Triton

        return MinibatchL1Triton.apply(m, exclude_self, group_size)
    return reference.minibatch_l1(m, exclude_self, group_size, memory_budget)


def spectral_norm(
    module: torch.nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> torch.nn.Module:
    """Spectrally normalise `module.<name>`, with the semantics of PyTorch's parametrization.

    u and v are buffers (`parametrizations.<name>.0._u` / `._v`, the same keys as PyTorch's, so
    state dicts load both ways), updated by one power iteration per training-mode forward without
    grad; eval uses the stored vectors. Conv weights are viewed as out x rest; `dim` defaults to 1
    for ConvTranspose and 0 otherwise. Returns the module.
    """
    from torch.nn.utils import parametrize

    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {type(module).__name__} has no tensor '{name}'")
    if dim is None:
        transposed = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    parametrize.register_parametrization(module, name, reference.SpectralNorm(weight, n_power_iterations, dim, eps))
    return module
