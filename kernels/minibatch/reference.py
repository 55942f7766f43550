"""Minibatch discrimination in plain PyTorch: the fallback (CPU path) and the tests' ground truth.
It imports nothing of the Triton path.

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
