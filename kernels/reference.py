"""Plain PyTorch versions of the kernels: the fallbacks (CPU path) and the tests' ground truth.

Minibatch discrimination (Salimans et al. 2016, "Improved Techniques for Training GANs", 3.2).
For M of shape (B, O, K) and each of the O kernels b:

    c[i, j, b] = exp(-sum_k |M[i, b, k] - M[j, b, k]|)
    o[i, b]    = sum_{j in S(i)} c[i, j, b]

where S(i) is the group of i (consecutive blocks of `group_size` rows; all rows without groups),
less i itself when `exclude_self`. Since c is symmetric in (i, j) and S(i) is symmetric,

    dL/dM[i, b, k] = -sum_{j in S(i)} (g[i, b] + g[j, b]) * c[i, j, b] * sign(M[i, b, k] - M[j, b, k])

with g = dL/do. The j = i term has sign(0) = 0, so `exclude_self` does not change the gradient.
"""

from __future__ import annotations

import contextlib
import math

import torch

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes of temporaries the chunked fallback may use


def _group(size: int | None, n: int) -> int:
    return n if size is None else int(size)


def minibatch_l1_naive(m: torch.Tensor, exclude_self: bool = True, group_size: int | None = None) -> torch.Tensor:
    """The textbook version: materialises the (B, B, O, K) differences. Ground truth for tests."""
    n = m.shape[0]
    g = _group(group_size, n)
    dist = (m[:, None] - m[None, :]).abs().sum(-1)  # (B, B, O)
    idx = torch.arange(n, device=m.device)
    keep = (idx[:, None] // g) == (idx[None, :] // g)
    if exclude_self:
        keep &= idx[:, None] != idx[None, :]
    return (torch.exp(-dist) * keep[..., None].to(dist.dtype)).sum(1)


def _compute_dtype(m: torch.Tensor) -> torch.dtype:
    return torch.float64 if m.dtype == torch.float64 else torch.float32


def _blocks(n: int, o: int, k: int, budget: int, itemsize: int) -> int:
    """Rows per block side so that one (rows x rows) block's temporaries fit in `budget` bytes,
    counting up to 4 live temporaries of (ci, cj, O, k) elements and 4 of (ci, cj, O)."""
    per_pair = o * (4 * k + 4) * itemsize
    return max(1, min(n, math.isqrt(max(1, budget // per_pair))))


def _columns(n: int, group: int, block: int, i0: int, i1: int):
    """(j0, j1) blocks covering every j in the groups of rows i0..i1-1."""
    j_lo = (i0 // group) * group
    j_hi = min(n, ((i1 - 1) // group + 1) * group)
    for j0 in range(j_lo, j_hi, block):
        yield j0, min(j_hi, j0 + block)


def _keep(i0, i1, j0, j1, group, exclude_self, device):
    i = torch.arange(i0, i1, device=device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    keep = (i // group) == (j // group)
    if exclude_self:
        keep &= i != j
    return keep


def minibatch_l1_forward(
    m: torch.Tensor,
    exclude_self: bool = True,
    group_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """o (B, O) in m's dtype, accumulated in fp32 (fp64 for fp64 input), in blocks of rows."""
    n, o, k = m.shape
    group = _group(group_size, n)
    x = m.to(_compute_dtype(m)).permute(1, 0, 2)  # (O, B, K): cdist batches over O
    out = torch.zeros(n, o, dtype=x.dtype, device=m.device)
    block = _blocks(n, o, k, memory_budget, x.element_size())
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        for j0, j1 in _columns(n, group, block, i0, i1):
            dist = torch.cdist(x[:, i0:i1], x[:, j0:j1], p=1.0)  # (O, ci, cj), no K-sized temporary
            c = torch.exp(-dist) * _keep(i0, i1, j0, j1, group, exclude_self, m.device).to(dist.dtype)
            out[i0:i1] += c.sum(2).t()
    return out.to(m.dtype)


def minibatch_l1_backward(
    m: torch.Tensor, grad: torch.Tensor, group_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> torch.Tensor:
    """dL/dM (B, O, K) from g = dL/do (B, O), in blocks of rows.

    When autograd is recording (the backward of a create_graph=True call, e.g. a gradient
    penalty), it runs in differentiable torch ops, so it can be differentiated again; that is how
    the fallback, and the Triton op that switches to it, support double backward. Otherwise it
    runs a leaner in-place version with one (O, ci, cj) buffer per block."""
    n, o, k = m.shape
    group = _group(group_size, n)
    dtype = _compute_dtype(m)
    x, g = m.to(dtype), grad.to(dtype)
    if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad):
        return _backward_differentiable(x, g, group, memory_budget).to(m.dtype)
    xt = x.permute(2, 1, 0).contiguous()  # (K, O, B): each k is an (O, B) matrix
    gt = g.t().contiguous()  # (O, B)
    xo = x.permute(1, 0, 2)  # (O, B, K) for cdist
    dm = torch.zeros(k, o, n, dtype=dtype, device=m.device)
    block = _blocks(n, o, 1, memory_budget, x.element_size())
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        for j0, j1 in _columns(n, group, block, i0, i1):
            w = torch.cdist(xo[:, i0:i1], xo[:, j0:j1], p=1.0).neg_().exp_()  # c, (O, ci, cj)
            w.mul_(gt[:, i0:i1, None] + gt[:, None, j0:j1])
            w.mul_(_keep(i0, i1, j0, j1, group, False, m.device).to(dtype))
            buf = torch.empty_like(w)
            for kk in range(k):
                torch.sub(xt[kk, :, i0:i1, None], xt[kk, :, None, j0:j1], out=buf)
                dm[kk, :, i0:i1] -= buf.sign_().mul_(w).sum(2)
    return dm.permute(2, 1, 0).to(m.dtype)


def _backward_differentiable(x: torch.Tensor, g: torch.Tensor, group: int, memory_budget: int) -> torch.Tensor:
    n, o, k = x.shape
    block = _blocks(n, o, k, memory_budget, x.element_size())
    rows = []
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        acc = torch.zeros(i1 - i0, o, k, dtype=x.dtype, device=x.device)
        for j0, j1 in _columns(n, group, block, i0, i1):
            diff = x[i0:i1, None] - x[None, j0:j1]  # (ci, cj, O, K)
            c = torch.exp(-diff.abs().sum(-1))
            keep = _keep(i0, i1, j0, j1, group, False, x.device)[..., None].to(x.dtype)
            w = (g[i0:i1, None] + g[None, j0:j1]) * c * keep  # (ci, cj, O)
            acc = acc - (w[..., None] * torch.sign(diff)).sum(1)
        rows.append(acc)
    return torch.cat(rows)


class MinibatchL1Chunked(torch.autograd.Function):
    """The memory-bounded fallback as an autograd op. Saves only M; the backward recomputes c."""

    @staticmethod
    def forward(ctx, m, exclude_self, group_size, memory_budget):
        ctx.save_for_backward(m)
        ctx.group_size, ctx.memory_budget = group_size, memory_budget
        return minibatch_l1_forward(m, exclude_self, group_size, memory_budget)

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        return minibatch_l1_backward(m, grad, ctx.group_size, ctx.memory_budget), None, None, None


def minibatch_l1(
    m: torch.Tensor,
    exclude_self: bool = True,
    group_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """The PyTorch fallback: differentiable (twice), extra memory bounded by `memory_budget`."""
    return MinibatchL1Chunked.apply(m, exclude_self, group_size, memory_budget)


# -- spectral norm ---------------------------------------------------------------------------------
#
# Spectral normalisation (Miyato et al. 2018): W_sn = W / sigma(W), sigma estimated by power
# iteration on the matrix view of W (out x rest; dim=1 first for ConvTranspose):
#     u <- normalize(W v),  v <- normalize(W^T u)   (training mode only, without grad)
#     sigma = u^T W v                                  (differentiable in W; u, v constants)
# which gives dW = G / sigma - (<G, W> / sigma^2) u v^T for G = dL/dW_sn.
#
# Two passes over W suffice: with s = W^T u from the second pass, v = s / |s| and
# sigma = u^T W v = v^T s = |s|^2 / |s| (PyTorch reads W a third time for sigma). Both the fallback
# and the Triton kernels compute sigma that way. The fallback runs the second pass with grad, so
# autograd gives the formula above; the Triton path returns W_sn through `SNWeights`, whose
# backward is that formula.


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
    (kernels.SpectralNorm: the Triton kernels of kernels/power_iteration.py); `kernels.spectral_norm_all`
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
