"""Spectral norm (Miyato et al. 2018), one op in one folder: `spectral_norm(module)` (a drop-in for
torch.nn.utils.parametrizations.spectral_norm), `spectral_norm_all(module)` (every layer's power
iteration as one group) and the parametrization `SpectralNorm`, which decides the path once per call:
the custom op under torch.compile (op.py), the fused Triton kernels (triton.py) where `_backend.choose`
picks them (never for float64), else the PyTorch reference (reference.py).
"""

from __future__ import annotations

import functools
import types

import torch

from kernels import _backend
from kernels.spectral import op, reference


class SpectralNorm(reference.SpectralNorm):
    """The reference parametrization with the Triton dispatch: in a training forward, the fused
    kernels of kernels/spectral/triton.py where `_backend.choose` picks Triton (CUDA tensors, or
    the interpreter), else the reference's torch ops. Its state (u, v) and keys are the reference's."""

    def fused(self, weight: torch.Tensor, write_w: bool = True) -> torch.Tensor | None:
        if torch.compiler.is_compiling():
            if not _backend.compiled_op(self.backend, weight):
                return None  # Inductor traces and fuses the fallback's torch ops
            return op.spectral_norm(self, weight, write_w)
        if not weight.is_contiguous() or _backend.choose("spectral_norm", self.backend, weight) != "triton":
            return None  # (fp64 included: the fallback iterates in fp64; the kernels accumulate in fp32)
        from kernels.spectral import triton as fused

        function = reference.SNWeights if write_w else reference.SNSigma
        return function.apply(functools.partial(fused.run, [self], write_w=write_w), weight)[0]


def spectral_norm(
    module: torch.nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    backend: str | None = None,
    scale: str = "weight",
) -> torch.nn.Module:
    """Spectrally normalise `module.<name>`, with the semantics of PyTorch's parametrization.

    u and v are buffers (`parametrizations.<name>.0._u` / `._v`, the same keys as PyTorch's, so
    state dicts load both ways), updated by `n_power_iterations` power iterations per training-mode
    forward without grad; eval uses the stored vectors. Conv weights are viewed as out x rest; `dim`
    defaults to 1 for ConvTranspose and 0 otherwise. The iteration runs in fp32 (also under
    autocast and for bf16/fp16 weights), reads W twice and takes sigma from the second pass.
    float64 weights iterate in float64, with the PyTorch ops on either backend (as PyTorch's
    parametrization does, so gradcheck holds). Complex weights raise TypeError: the iteration is real.
    `backend` as for `minibatch_discrimination`.

    `scale="output"` (Linear and Conv1d/2d/3d, name "weight"): the layer computes op(x, W) / sigma + b
    instead of op(x, W / sigma) + b. That is the same function and, with sigma differentiable in W
    (`reference.SNSigma`), the same gradient, but W / sigma is never written: on the Triton path the
    power iteration reads W twice and writes nothing of its size (two passes over W instead of four).
    The parametrization, its state-dict keys and `module.weight` (W / sigma) are unchanged.
    Returns the module.
    """
    from torch.nn.utils import parametrize

    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {type(module).__name__} has no tensor '{name}'")
    if dim is None:
        transposed = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    if scale not in ("weight", "output"):
        raise ValueError(f"scale must be 'weight' or 'output'; got {scale!r}")
    if scale == "output" and (name != "weight" or not isinstance(module, _OUTPUT_SCALED)):
        raise ValueError(
            f"scale='output' applies to the weight of Linear and Conv1d/2d/3d layers (1/sigma moves to their "
            f"output exactly); got {type(module).__name__}.{name}: use scale='weight'"
        )
    sn = SpectralNorm(weight, n_power_iterations, dim, eps, backend=backend)
    sn.scale = scale
    parametrize.register_parametrization(module, name, sn)
    if scale == "output":
        module.forward = types.MethodType(_output_scaled_forward, module)
    return module


_OUTPUT_SCALED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _output_scaled_forward(self, x: torch.Tensor) -> torch.Tensor:
    """op(x, W) / sigma + b for a layer of `spectral_norm(..., scale="output")`."""
    plist = self.parametrizations.weight
    weight = plist.original
    sigma = plist[0].sigma(weight)
    if isinstance(self, torch.nn.Linear):
        y = torch.nn.functional.linear(x, weight)
    else:
        y = self._conv_forward(x, weight, None)
    y = y / sigma.to(y.dtype)
    if self.bias is None:
        return y
    if isinstance(self, torch.nn.Linear):
        return y + self.bias
    return y + self.bias.view(-1, *([1] * len(self.kernel_size)))  # over the spatial dims


def spectral_norm_all(module: torch.nn.Module) -> torch.nn.Module:
    """Run the power iteration of every `kernels.spectral_norm` layer inside `module` as one group:
    4 Triton launches per training forward of `module` however many layers it has (instead of 4 per
    layer). Layers are grouped by device, dtypes and n_power_iterations, so a module whose layers all
    agree gets one group. Each layer's result is handed to it when it reads its weight; a layer that
    reads its weight twice in one forward runs its own iteration the second time, as PyTorch's would.
    Where Triton does not run (CPU without the interpreter, backend "torch") this changes nothing.
    Calling it again on the same module is a no-op. Returns the module."""
    if getattr(module, "_distgan_sn_owners", None) is not None:
        return module
    owners = [
        plist
        for m in module.modules()
        for plist in getattr(m, "parametrizations", {}).values()
        if len(plist) == 1 and isinstance(plist[0], reference.SpectralNorm)
    ]
    if not owners:
        raise ValueError(f"{type(module).__name__} has no layer with kernels.spectral_norm to group")
    # a plain attribute, not hooks' closures, so copy.deepcopy(module) groups the copy's own layers
    module._distgan_sn_owners = owners
    module.register_forward_pre_hook(_group_before)
    module.register_forward_hook(_group_after)
    return module


def _group_before(module: torch.nn.Module, args) -> None:
    owners = module._distgan_sn_owners
    for plist in owners:
        plist[0]._pending = None
    if not module.training or torch.compiler.is_compiling():
        return
    groups: dict[tuple, list] = {}
    for plist in owners:
        sn, w = plist[0], plist.original
        if not sn.training or w.ndim < 2 or not w.is_contiguous():
            continue
        if _backend.choose("spectral_norm", sn.backend, w) != "triton":
            continue
        key = (w.device, w.dtype, sn._u.dtype, sn.n_power_iterations, sn.eps, sn.scale)
        groups.setdefault(key, []).append((sn, w))
    if not groups:
        return
    from kernels.spectral import triton as fused

    for key, members in groups.items():
        layers, weights = [m[0] for m in members], [m[1] for m in members]
        if key[-1] == "output":  # these layers divide their outputs by sigma: W / sigma is not written
            outs = reference.SNSigma.apply(functools.partial(fused.run, layers, write_w=False), *weights)
        else:
            outs = reference.SNWeights.apply(functools.partial(fused.run, layers), *weights)
        for sn, w, out in zip(layers, weights, outs):
            sn._pending = (w, out, "sigma" if key[-1] == "output" else "weight")


def _group_after(module: torch.nn.Module, args, output) -> None:
    for plist in module._distgan_sn_owners:
        plist[0]._pending = None
