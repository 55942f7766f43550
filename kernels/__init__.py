"""distgan's GPU kernels (Triton), each with a PyTorch reference and fallback, one folder per op:
kernels/minibatch/ and kernels/spectral/ (each: __init__.py the public function and its dispatch,
reference.py, triton.py, op.py the torch.compile custom op).

Imports torch and triton, never distgan, so it is usable on its own.

- `minibatch_discrimination(m, ...)`: minibatch discrimination's pairwise L1 similarity sums.
- `spectral_norm(module, ...)`: a drop-in for torch.nn.utils.parametrizations.spectral_norm whose
  power iteration runs in fused Triton kernels (two passes over W, fp32).
- `spectral_norm_all(module)`: one grouped power iteration (4 launches) for every spectral-normed
  layer of a module per forward.
"""

from __future__ import annotations

from kernels.minibatch import minibatch_discrimination
from kernels.spectral import SpectralNorm, spectral_norm, spectral_norm_all

__all__ = ["minibatch_discrimination", "spectral_norm", "spectral_norm_all", "SpectralNorm"]
