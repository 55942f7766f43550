"""Spectral norm as a PyTorch custom op, for torch.compile: a compiled graph calls it as one opaque op
(0 graph breaks), with a fake-tensor implementation for tracing and its backward registered.

`distgan::spectral_norm(weight, u, v, n_power_iterations, eps, dim, write_w)` -> (W / sigma or an empty
tensor, t = W v, s = W^T u, sigma, new u, new v): one layer's training-mode power iteration (functional:
the caller copies u, v into the buffers); the Triton kernels of spectral/triton.py where `_backend.choose`
picks Triton, else the same arithmetic in torch ops. Gradient: reference.SNWeights' (SNSigma's for sigma).
The parametrization calls it only while compiling with `_backend.compile_ops` on (train.compile_kernels).
"""

from __future__ import annotations

import types

import torch

from kernels import _backend
from kernels.spectral import reference

# per (u, v) buffer pair: the vectors the kernels update in the op's place, so that the launch plan
# (kernels/spectral/triton.py caches it by pointers) is built once, not rebuilt on every call
_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _sn_impl(weight, u, v, n_power_iterations, eps, dim, write_w):
    if _backend.choose("spectral_norm", None, weight) == "triton":
        from kernels.spectral import triton as power_iteration

        key = (u.data_ptr(), v.data_ptr(), u.shape, v.shape, u.dtype, u.device)
        if key not in _scratch:
            if len(_scratch) > 256:
                _scratch.clear()
            _scratch[key] = (torch.empty_like(u), torch.empty_like(v))
        u2, v2 = _scratch[key]
        v2.copy_(v)  # the op is functional: the buffers themselves are copied back by the caller
        layer = types.SimpleNamespace(_u=u2, _v=v2, dim=dim, eps=eps, n_power_iterations=n_power_iterations)
        outs, saved = power_iteration.run([layer], [weight], write_w=write_w)
        t, s, sigma = saved[0][:3]
        out = outs[0] if write_w else weight.new_empty(0)
        return out, t.clone(), s.clone(), sigma.clone(), u2.clone(), v2.clone()
    dt = reference.iteration_dtype(weight)
    with torch.no_grad():
        mat = reference.sn_matrix(weight, dim).to(dt)
        t, uu = reference.power_vectors(mat, v.to(dt), n_power_iterations, eps)
        s = torch.mv(mat.t(), uu)
        vv = s / s.norm().clamp_min(eps)
        sigma = torch.dot(vv, s)
        out = (weight.to(dt) / sigma).to(weight.dtype) if write_w else weight.new_empty(0)
    return out, t.float(), s.float(), sigma.float(), uu.to(u.dtype), vv.to(v.dtype)


@torch.library.custom_op("distgan::spectral_norm", mutates_args=())
def spectral_norm_op(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    n_power_iterations: int,
    eps: float,
    dim: int,
    write_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sn_impl(weight, u, v, n_power_iterations, eps, dim, write_w)


@spectral_norm_op.register_fake
def _(weight, u, v, n_power_iterations, eps, dim, write_w):
    rows = weight.shape[dim]
    cols = weight.numel() // rows
    out = weight.new_empty(weight.shape) if write_w else weight.new_empty(0)
    f32 = dict(dtype=torch.float32)
    return (
        out,
        weight.new_empty(rows, **f32),
        weight.new_empty(cols, **f32),
        weight.new_empty((), **f32),
        torch.empty_like(u),
        torch.empty_like(v),
    )


def _sn_setup(ctx, inputs, output):
    weight, _, _, _, eps, dim, write_w = inputs
    _, t, s, sigma, _, _ = output
    ctx.save_for_backward(weight, t, s, sigma)
    ctx.eps, ctx.dim, ctx.write_w = eps, dim, write_w


def _sn_backward(ctx, g_out, g_t, g_s, g_sigma, g_u, g_v):
    weight, t, s, sigma = ctx.saved_tensors
    g_out = g_out if ctx.write_w else None
    dw = reference.sn_grad(weight, t, s, sigma, ctx.dim, ctx.eps, g_out=g_out, g_sigma=g_sigma)
    return dw, None, None, None, None, None, None


spectral_norm_op.register_autograd(_sn_backward, setup_context=_sn_setup)


def spectral_norm(sn: reference.SpectralNorm, weight: torch.Tensor, write_w: bool = True) -> torch.Tensor:
    """W / sigma (or sigma) of layer `sn` through the custom op, updating its u, v (the op itself is
    functional, as autograd needs: it returns the new vectors, copied here into the buffers)."""
    out, _, _, sigma, u, v = spectral_norm_op(weight, sn._u, sn._v, sn.n_power_iterations, sn.eps, sn.dim, write_w)
    with torch.no_grad():
        sn._u.copy_(u)
        sn._v.copy_(v)
    return out if write_w else sigma


# -- minibatch discrimination --------------------------------------------------------------------------
