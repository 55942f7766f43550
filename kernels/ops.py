"""The kernels as PyTorch custom ops, for torch.compile: a compiled graph calls them as single opaque
ops (0 graph breaks), with fake-tensor implementations for tracing and their backward registered.

- `distgan::spectral_norm(weight, u, v, n_power_iterations, eps, dim, write_w)` -> (W / sigma or an
  empty tensor, t = W v, s = W^T u, sigma, new u, new v): one layer's training-mode power iteration
  (functional: the caller copies u, v into the buffers); the Triton kernels of kernels/power_iteration.py where `_backend.choose` picks Triton,
  else the same arithmetic in torch ops. Gradient: reference.SNWeights' (and SNSigma's for sigma).
- `distgan::minibatch_l1(m, exclude_self, group_size)` and its backward: minibatch discrimination.

`kernels.SpectralNorm` and `kernels.minibatch_discrimination` call these only while compiling and
only when `_backend.compile_ops` is on (distgan's train.compile_kernels); otherwise a compiled graph
traces their PyTorch fallbacks, which Inductor fuses itself. Eager mode never goes through here.
"""

from __future__ import annotations

import types

import torch

from kernels import _backend, reference

# per (u, v) buffer pair: the vectors the kernels update in the op's place, so that the launch plan
# (kernels/power_iteration.py caches it by pointers) is built once, not rebuilt on every call
_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _sn_impl(weight, u, v, n_power_iterations, eps, dim, write_w):
    if _backend.choose("spectral_norm", None, weight) == "triton":
        from kernels import power_iteration

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


def _use_triton(m: torch.Tensor) -> bool:
    return _backend.choose("minibatch_discrimination", None, m) == "triton"


@torch.library.custom_op("distgan::minibatch_l1", mutates_args=())
def minibatch_l1_op(m: torch.Tensor, exclude_self: bool, group_size: int) -> torch.Tensor:
    group = group_size or None
    if _use_triton(m):
        from kernels import minibatch_l1

        return minibatch_l1.minibatch_l1_forward(m, exclude_self, group)
    with torch.no_grad():
        return reference.minibatch_l1(m, exclude_self, group).clone()


@minibatch_l1_op.register_fake
def _(m, exclude_self, group_size):
    return m.new_empty(m.shape[:2])


@torch.library.custom_op("distgan::minibatch_l1_backward", mutates_args=())
def minibatch_l1_backward_op(m: torch.Tensor, grad: torch.Tensor, group_size: int) -> torch.Tensor:
    group = group_size or None
    if _use_triton(m):
        from kernels import minibatch_l1

        return minibatch_l1.minibatch_l1_backward(m, grad, group)
    return reference.minibatch_l1_backward(m, grad, group, reference.DEFAULT_MEMORY_BUDGET)


@minibatch_l1_backward_op.register_fake
def _(m, grad, group_size):
    return torch.empty_like(m)


def _mb_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.group_size = inputs[2]


def _mb_backward(ctx, grad):
    (m,) = ctx.saved_tensors
    return minibatch_l1_backward_op(m, grad.contiguous(), ctx.group_size), None, None


minibatch_l1_op.register_autograd(_mb_backward, setup_context=_mb_setup)


def minibatch_discrimination(m: torch.Tensor, exclude_self: bool, group_size: int | None) -> torch.Tensor:
    return minibatch_l1_op(m, exclude_self, group_size or 0)
