"""Spectral norm in plain PyTorch: the power iteration and its gradients, the parametrization
(`SpectralNorm`, state-dict compatible with torch.nn.utils.parametrizations.spectral_norm), the
fallback of the Triton path and the tests' ground truth. It imports nothing of the Triton path.
"""

from __future__ import annotations

import contextlib

import torch


def sn_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The (out x rest) matrix view of `weight` with `dim` first."""
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.ndim) if d != dim))
    return weight.flatten(1)


def _from_matrix(mat: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Inverse of sn_matrix: a (shape[dim] x rest) matrix back to `shape`."""
    if dim == 0:
        return mat.reshape(shape)
    order = [dim, *(d for d in range(len(shape)) if d != dim)]
    full = mat.reshape([shape[d] for d in order])
    return full.permute(*(order.index(d) for d in range(len(shape))))


def _fp32(weight: torch.Tensor):
    """Autocast off (so the power iteration stays fp32) only where it is on: entering the context
    costs more than the iteration on small layers."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.autocast(weight.device.type, enabled=False)
    return contextlib.nullcontext()


def iteration_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the power iteration runs in: float64 for float64 weights (as PyTorch's does, so
    gradcheck holds), float32 for float32, bf16 and fp16 ones."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)


def sn_grad(w, t, s, sigma, dim, eps, g_out=None, g_sigma=None) -> torch.Tensor:
    """dL/dW (in W's dtype) of W_sn = W / sigma and/or of sigma itself, with sigma = u^T W v as a
    function of W and u = t/|t|, v = s/|s| constants: d sigma/dW = u v^T, so
    dL/dW = G/sigma - (<G, W>/sigma^2) u v^T + g_sigma u v^T for G = dL/dW_sn."""
    uv = _from_matrix(torch.outer(_normalize(t, eps), _normalize(s, eps)), w.shape, dim)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    if g_out is not None:
        gf = g_out.float()
        dw = gf / sigma - ((gf * w.float()).sum() / (sigma * sigma)) * uv
    if g_sigma is not None:
        dw = dw + g_sigma.float() * uv
    return dw.to(w.dtype)


@torch.no_grad()
def power_vectors(mat: torch.Tensor, v: torch.Tensor, n: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """n power iterations on the matrix `mat` from v, without grad: (t = W v, u = t/|t|) of the last
    one (s = W^T u is left to the caller, which may want it differentiable)."""
    for i in range(n):
        t = torch.mv(mat, v)
        u = _normalize(t, eps)
        if i + 1 < n:
            v = _normalize(torch.mv(mat.t(), u), eps)
    return t, u


def _sn_save(ctx, weights, saved) -> None:
    ctx.meta = [(dim, eps) for _, _, _, dim, eps in saved]
    ctx.save_for_backward(*weights, *(x for t, s, sigma, _, _ in saved for x in (t, s, sigma)))


def _sn_backward(ctx, grads, kind: str) -> tuple:
    """The weights' gradients from the outputs' (`kind`: "g_out" for W_sn, "g_sigma" for sigma)."""
    n = len(ctx.meta)
    tensors = ctx.saved_tensors
    weights, rest = tensors[:n], tensors[n:]
    out = [None]
    for i, (g, w, (dim, eps)) in enumerate(zip(grads, weights, ctx.meta)):
        if g is None or not ctx.needs_input_grad[1 + i]:
            out.append(None)
            continue
        t, s, sigma = rest[3 * i : 3 * i + 3]
        out.append(sn_grad(w, t, s, sigma, dim, eps, **{kind: g}))
    return tuple(out)


class SNWeights(torch.autograd.Function):
    """W_sn[i] = W[i] / sigma[i] for one or many layers, sigma[i] = u_i^T W[i] v_i as a function of
    W[i] with u_i, v_i constants (PyTorch's gradient). `compute(weights)` runs the power iteration
    (updating the buffers) and returns (outputs, [(t, s, sigma, dim, eps)]): t = W v (u = t/|t|),
    s = W^T u (v = s/|s|), both fp32 and fresh, so later calls that update the buffers in place
    (D on real, then on fake, before backward) cannot change this call's gradient."""

    @staticmethod
    def forward(ctx, compute, *weights):
        outs, saved = compute(weights)
        _sn_save(ctx, weights, saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        return _sn_backward(ctx, grads, "g_out")


class SNSigma(torch.autograd.Function):
    """sigma[i] = u_i^T W[i] v_i for one or many layers, as a function of W[i] with u_i, v_i constants:
    d sigma / dW = u v^T. For layers that scale their output by 1/sigma instead of using W / sigma
    (`kernels.spectral_norm(..., scale="output")`): autograd through conv(x, W) / sigma then gives
    exactly the gradient of conv(x, W / sigma). `compute(weights)` is `SNWeights`' with sigma per layer
    (0-d fp32) in place of W_sn."""

    @staticmethod
    def forward(ctx, compute, *weights):
        sigmas, saved = compute(weights)
        _sn_save(ctx, weights, saved)
        return tuple(sigmas)

    @staticmethod
    def backward(ctx, *grads):
        return _sn_backward(ctx, grads, "g_sigma")


class SpectralNorm(torch.nn.Module):
    """A parametrization with the semantics and state-dict keys (`_u`, `_v`) of
    `torch.nn.utils.parametrizations.spectral_norm`, so models and checkpoints move freely
    between the two. The power iteration runs in fp32 (autocast off) also for bf16/fp16 weights, and
    in fp64 for fp64 weights; complex weights are refused.

    In training mode the iteration runs in two passes of torch ops, unless `fused` gives the result
    (kernels.SpectralNorm: the Triton kernels of kernels/spectral/triton.py); `kernels.spectral_norm_all`
    leaves a whole module's results in `_pending` before the layers ask for them. `backend` is kept
    for that subclass (this module never reads it)."""

    def __init__(
        self,
        weight: torch.Tensor,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
        backend: str | None = None,
    ):
        super().__init__()
        if weight.is_complex():
            raise TypeError(
                f"kernels.spectral_norm does not support complex weights ({weight.dtype}): its power iteration is "
                "real. Use torch.nn.utils.parametrizations.spectral_norm, which iterates with conjugate transposes"
            )
        if not weight.is_floating_point():
            raise TypeError(f"kernels.spectral_norm needs a floating-point weight; got {weight.dtype}")
        ndim = weight.ndim
        if not -ndim <= dim < ndim:
            raise IndexError(f"dim {dim} out of range for a weight with {ndim} dimensions")
        if n_power_iterations <= 0:
            raise ValueError(f"n_power_iterations must be positive; got {n_power_iterations}")
        self.dim = dim % ndim
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        self.backend = backend
        self.scale = "weight"  # or "output": the layer divides its output by sigma (kernels.spectral_norm)
        # a grouped result (kernels.spectral_norm_all) for this forward: (W, W_sn or sigma, "weight" or "sigma")
        self._pending: tuple[torch.Tensor, torch.Tensor, str] | None = None
        if ndim > 1:
            mat = sn_matrix(weight, self.dim)
            u = torch.nn.functional.normalize(mat.new_empty(mat.shape[0]).normal_(0, 1), dim=0, eps=eps)
            v = torch.nn.functional.normalize(mat.new_empty(mat.shape[1]).normal_(0, 1), dim=0, eps=eps)
            self.register_buffer("_u", u)
            self.register_buffer("_v", v)
            with torch.no_grad():
                self.power_iteration(weight, 15)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return sn_matrix(weight, self.dim)

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, iterations: int) -> None:
        """`iterations` steps in iteration_dtype (fp32, or fp64 for fp64 weights), updating the stored u, v in place."""
        dt = iteration_dtype(weight)
        with _fp32(weight):
            w = self.matrix(weight).to(dt)
            v = self._v.to(dt)
            for _ in range(iterations):
                u = _normalize(torch.mv(w, v), self.eps)
                v = _normalize(torch.mv(w.t(), u), self.eps)
        self._u.copy_(u)
        self._v.copy_(v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return torch.nn.functional.normalize(weight, dim=0, eps=self.eps)
        pending, self._pending = self._pending, None
        dt = iteration_dtype(weight)
        if not self.training:
            return (weight.to(dt) / self._stored_sigma(weight)).to(weight.dtype)
        if pending is not None and pending[0] is weight and pending[2] == "weight":
            return pending[1]
        fused = self.fused(weight)
        if fused is not None:
            return fused
        return (weight.to(dt) / self._sigma_fallback(weight)).to(weight.dtype)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """sigma (0-d, in iteration_dtype) as a differentiable function of `weight` with u, v constants,
        after this forward's power iteration in training mode (from the stored vectors in eval): what a
        layer with `scale="output"` divides its output by, so that W / sigma is never written."""
        pending, self._pending = self._pending, None
        if not self.training:
            return self._stored_sigma(weight)
        if pending is not None and pending[0] is weight and pending[2] == "sigma":
            return pending[1]
        fused = self.fused(weight, write_w=False)
        if fused is not None:
            return fused
        return self._sigma_fallback(weight)

    def _stored_sigma(self, weight: torch.Tensor) -> torch.Tensor:
        dt = iteration_dtype(weight)
        with _fp32(weight):
            return torch.dot(self._u.to(dt), torch.mv(self.matrix(weight).to(dt), self._v.to(dt)))

    def _sigma_fallback(self, weight: torch.Tensor) -> torch.Tensor:
        # The fallback (also what torch.compile traces, without graph breaks): two passes over W,
        # the second one differentiable, so that sigma = v^T (W^T u) = u^T W v carries the
        # gradient u v^T with u, v constants, as in PyTorch.
        dt = iteration_dtype(weight)
        with _fp32(weight):
            mat = self.matrix(weight).to(dt)
            _, u = power_vectors(mat, self._v.to(dt), self.n_power_iterations, self.eps)
            s = torch.mv(mat.t(), u)
            v = _normalize(s.detach(), self.eps)
            self._u.copy_(u)
            self._v.copy_(v)
            return torch.dot(v, s)

    def fused(self, weight: torch.Tensor, write_w: bool = True) -> torch.Tensor | None:
        """W / sigma (or sigma, with write_w=False) from a fused kernel, or None for the torch ops.
        The reference has none: `kernels.SpectralNorm` (kernels/__init__.py) overrides this with the
        Triton dispatch."""
        return None

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value
