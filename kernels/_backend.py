"""Picks the Triton kernel or the PyTorch fallback for each call.

backend=None (auto): Triton for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1, the
interpreter the tests use), the PyTorch fallback otherwise. The environment variable
DISTGAN_KERNELS=torch|triton overrides auto. When Triton is asked for but cannot run the call
(not installed, or a CPU tensor without the interpreter), a warning is given once and the
fallback runs.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("triton", "torch")
# Under torch.compile: call the kernels as custom ops (kernels/*/op.py: one opaque op each, Triton on
# CUDA), or trace their PyTorch fallbacks for Inductor to fuse (False). Eager mode ignores it.
compile_ops = True
_warned: set[str] = set()


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_can_run(t: torch.Tensor) -> bool:
    return triton_importable() and (t.is_cuda or interpreter_on())


def kernels_compute(t: torch.Tensor) -> bool:
    """The kernels compute in fp32: a float64 tensor always takes the PyTorch path, whatever was asked
    (a float64 model, as in gradcheck and PyTorch's own tests, expects float64 arithmetic)."""
    return t.dtype != torch.float64


def choose(op: str, backend: str | None, t: torch.Tensor) -> str:
    """'triton' or 'torch' for `op` on tensor `t` (float64: always 'torch', see kernels_compute)."""
    requested = backend or os.environ.get("DISTGAN_KERNELS") or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {requested!r}")
    if requested == "torch" or not kernels_compute(t):
        return "torch"
    if triton_can_run(t):
        return "triton"
    if requested == "triton" and op not in _warned:
        _warned.add(op)
        why = (
            "triton is not installed"
            if not triton_importable()
            else f"the tensor is on {t.device} (set TRITON_INTERPRET=1 to run Triton on the CPU)"
        )
        warnings.warn(f"kernels.{op}: Triton requested but {why}; using the PyTorch fallback", stacklevel=3)
    return "torch"


def compiled_op(backend: str | None, t: torch.Tensor) -> bool:
    """Under torch.compile: call the op's custom op (one opaque call, the Triton kernels on CUDA), or
    let Inductor trace the PyTorch fallback (False: train.compile_kernels off, backend "torch", or
    float64, which the kernels never compute)."""
    return compile_ops and backend != "torch" and kernels_compute(t)


def auto(device: torch.device | str) -> str:
    """What backend=None picks for tensors on `device` ('triton' or 'torch'), e.g. to log it."""
    return choose("auto", None, torch.empty(0, device=device))
