"""Minibatch discrimination's pairwise L1 as fused Triton kernels (forward and backward).

The math is in `kernels/minibatch/reference.py`'s docstring; each kernel's docstring states the part it
computes. Neither kernel materialises the (B, B, O, K) differences nor the (B, B, O) similarities:
a program owns BLOCK_I rows i of one kernel b, keeps them in registers, and walks over the rows j
of their groups BLOCK_J at a time, so extra memory is the output alone, O(B*O*K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.minibatch import reference


@triton.jit
def _load_rows(M, offs, b, offs_k, B, K, stride_mb, stride_mo, stride_mk):
    """Rows `offs` of kernel b of M as an fp32 (len(offs), BLOCK_K) tile, zero outside."""
    mask = (offs < B)[:, None] & (offs_k < K)[None, :]
    ptrs = M + offs[:, None] * stride_mb + b * stride_mo + offs_k[None, :] * stride_mk
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _group_span(pid_i, B, GROUP, BLOCK_I: tl.constexpr):
    """[start, end) of the rows j that share a group with rows pid_i*BLOCK_I ... of this program."""
    i_first = pid_i * BLOCK_I
    i_last = tl.minimum(i_first + BLOCK_I, B) - 1
    return (i_first // GROUP) * GROUP, tl.minimum((i_last // GROUP + 1) * GROUP, B)


@triton.jit
def minibatch_l1_forward_kernel(
    M,
    OUT,
    B,
    K,
    GROUP,
    stride_mb,
    stride_mo,
    stride_mk,
    stride_ob,
    stride_oo,
    EXCLUDE_SELF: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """o[i, b] = sum_{j in S(i)} exp(-sum_k |M[i,b,k] - M[j,b,k]|), accumulated in fp32.

    Grid: (cdiv(B, BLOCK_I), O). S(i): rows of i's group (`GROUP` consecutive rows), without i
    itself when EXCLUDE_SELF. Only the j blocks of the groups of this program's rows are visited."""
    pid_i = tl.program_id(0)
    b = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < B
    mi = _load_rows(M, offs_i, b, offs_k, B, K, stride_mb, stride_mo, stride_mk)
    j_start, j_end = _group_span(pid_i, B, GROUP, BLOCK_I)
    group_i = offs_i // GROUP
    acc = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < j_end
        mj = _load_rows(M, offs_j, b, offs_k, j_end, K, stride_mb, stride_mo, stride_mk)
        dist = tl.sum(tl.abs(mi[:, None, :] - mj[None, :, :]), axis=2)  # (BLOCK_I, BLOCK_J)
        keep = mask_j[None, :] & (group_i[:, None] == (offs_j // GROUP)[None, :])
        if EXCLUDE_SELF:
            keep = keep & (offs_i[:, None] != offs_j[None, :])
        acc += tl.sum(tl.where(keep, tl.exp(-dist), 0.0), axis=1)
    tl.store(OUT + offs_i * stride_ob + b * stride_oo, acc.to(OUT.dtype.element_ty), mask=mask_i)


@triton.jit
def minibatch_l1_backward_kernel(
    M,
    G,
    DM,
    B,
    K,
    GROUP,
    stride_mb,
    stride_mo,
    stride_mk,
    stride_gb,
    stride_go,
    stride_db,
    stride_do,
    stride_dk,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dM[i,b,k] = -sum_{j in group(i)} (g[i,b] + g[j,b]) * c[i,j,b] * sign(M[i,b,k] - M[j,b,k]).

    c[i,j,b] = exp(-sum_k |M[i,b,k] - M[j,b,k]|) is recomputed, never stored. The j = i term
    vanishes (sign(0) = 0), so the same kernel serves both settings of exclude_self.
    Grid: (cdiv(B, BLOCK_I), O); each program writes dM for its rows of kernel b."""
    pid_i = tl.program_id(0)
    b = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_K)
    mask_i = offs_i < B
    mi = _load_rows(M, offs_i, b, offs_k, B, K, stride_mb, stride_mo, stride_mk)
    gi = tl.load(G + offs_i * stride_gb + b * stride_go, mask=mask_i, other=0.0).to(tl.float32)
    j_start, j_end = _group_span(pid_i, B, GROUP, BLOCK_I)
    group_i = offs_i // GROUP
    dm = tl.zeros([BLOCK_I, BLOCK_K], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < j_end
        mj = _load_rows(M, offs_j, b, offs_k, j_end, K, stride_mb, stride_mo, stride_mk)
        gj = tl.load(G + offs_j * stride_gb + b * stride_go, mask=mask_j, other=0.0).to(tl.float32)
        diff = mi[:, None, :] - mj[None, :, :]  # (BLOCK_I, BLOCK_J, BLOCK_K)
        c = tl.exp(-tl.sum(tl.abs(diff), axis=2))
        keep = mask_j[None, :] & (group_i[:, None] == (offs_j // GROUP)[None, :])
        w = tl.where(keep, (gi[:, None] + gj[None, :]) * c, 0.0)
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        dm -= tl.sum(w[:, :, None] * sign, axis=1)
    tl.store(
        DM + offs_i[:, None] * stride_db + b * stride_do + offs_k[None, :] * stride_dk,
        dm.to(DM.dtype.element_ty),
        mask=mask_i[:, None] & (offs_k < K)[None, :],
    )


def block_sizes(k: int) -> tuple[int, int, int, int]:
    """(BLOCK_I, BLOCK_J, BLOCK_K, num_warps): a BLOCK_I x BLOCK_J x BLOCK_K fp32 tile of at most
    8192 elements (the 3-D difference tile lives in registers)."""
    block_k = triton.next_power_of_2(max(k, 1))
    block_i = 32 if block_k <= 8 else 16
    block_j = max(1, min(32, 8192 // (block_i * block_k)))
    return block_i, block_j, block_k, 4


def minibatch_l1_forward(
    m: torch.Tensor, exclude_self: bool, group_size: int | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """o (B, O) in m's dtype; every element of `out` (allocated when None) is written."""
    n, o, k = m.shape
    out = torch.empty(n, o, dtype=m.dtype, device=m.device) if out is None else out
    if n == 0 or o == 0:
        return out
    block_i, block_j, block_k, warps = block_sizes(k)
    grid = (triton.cdiv(n, block_i), o)
    minibatch_l1_forward_kernel[grid](
        m,
        out,
        n,
        k,
        group_size or n,
        m.stride(0),
        m.stride(1),
        m.stride(2),
        out.stride(0),
        out.stride(1),
        EXCLUDE_SELF=exclude_self,
        BLOCK_I=block_i,
        BLOCK_J=block_j,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out


def minibatch_l1_backward(
    m: torch.Tensor, grad: torch.Tensor, group_size: int | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """dL/dM (B, O, K) in m's dtype; every element of `out` (allocated when None) is written."""
    n, o, k = m.shape
    dm = torch.empty_like(m, memory_format=torch.contiguous_format) if out is None else out
    if n == 0 or o == 0:
        return dm
    block_i, block_j, block_k, warps = block_sizes(k)
    grid = (triton.cdiv(n, block_i), o)
    minibatch_l1_backward_kernel[grid](
        m,
        grad,
        dm,
        n,
        k,
        group_size or n,
        m.stride(0),
        m.stride(1),
        m.stride(2),
        grad.stride(0),
        grad.stride(1),
        dm.stride(0),
        dm.stride(1),
        dm.stride(2),
        BLOCK_I=block_i,
        BLOCK_J=block_j,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return dm


class MinibatchL1Triton(torch.autograd.Function):
    """Saves only M (the input) for backward; the backward kernel recomputes c.

    Double backward: when the backward runs with create_graph=True (e.g. a gradient penalty),
    grad mode is on inside it, and this op switches to `reference.minibatch_l1_backward`, whose
    torch ops autograd can differentiate again. Plain backward always uses the Triton kernel."""

    @staticmethod
    def forward(ctx, m, exclude_self, group_size):
        ctx.save_for_backward(m)
        ctx.group_size = group_size
        return minibatch_l1_forward(m, exclude_self, group_size)

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return reference.minibatch_l1_backward(m, grad, ctx.group_size), None, None
        return minibatch_l1_backward(m, grad, ctx.group_size), None, None
