"""Spectral norm's power iteration as fused Triton kernels, for one layer or many at once.

The math is in `kernels/spectral/reference.py`. For a group of L layers (one, or
every spectral-normed layer of a module), one training forward is four launches whatever L is:

1. `_wv_kernel`:     t = W v                                  (pass 1 over W, a program per BM1 rows)
2. `_wtu_kernel`:    p[c] = W[chunk c]^T t[chunk c]           (pass 2 over W, a program per block of BN2
                     columns and chunk of CHUNK rows: partial sums, no atomics)
3. `_reduce_kernel`: |t|, s = (sum_c p[c]) / |t| in chunk order, |s_block|^2  (per BN3 columns; the
                     block-0 program stores u = t / |t|)
4. `_scale_kernel`:  sigma = |s|^2 / max(|s|, eps) from the partial sums in a fixed order,
                     v = s / max(|s|, eps) (block 0 stores it), W_sn = W / sigma (per element block),
                     or, with `write_w=False` (1/sigma applied to the layer's output), sigma and v only

Splitting pass 2 over row chunks keeps the whole chip busy on large layers: a 4096 x 4096 weight runs
1024 programs in pass 1 and 1024 in pass 2 (an H100/H200 has 132 SMs), where one program per column
block gave 32. The tiles are small enough for 4+ programs per SM by registers
(benchmarks/results/kernel_resources-*.md).

Each program finds its layer in a table of per-layer records (pointers as int64 addresses, sizes,
offsets), like Triton's grouped-GEMM tutorial, so layers of any shapes share a launch. W is read in
its own layout: the matrix view (out x rest, `dim` first) of a weight of shape (P.., M, Q..) puts
element (r, c) at (c // Q) * M * Q + r * Q + c % Q, so ConvTranspose (dim=1) needs no copy.

No atomics: every sum runs in a fixed order, so the same W gives bitwise the same u, v and sigma
on every rank of a DDP job (the buffers never need broadcasting). All arithmetic is fp32 whatever
the dtype of W and of the buffers. n_power_iterations > 1 repeats launches 1-4 (4 without W_sn).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.spectral import reference

# fields of a layer's record in the int64 table
# (w, u, v addresses; rows M, columns N, inner size Q; offsets into t, s, partial sums and output; number
# of partial sums; numel; offset into the pass-2 chunk sums, pass-2 column blocks, row chunks)
FIELDS = 15
# pass 1: rows x columns per tile; pass 2: tile and rows per chunk; pass 3: columns; pass 4: elements
BLOCK_M1, BLOCK_N1 = 4, 256
BLOCK_M2, BLOCK_N2, CHUNK = 32, 64, 256
BLOCK_N3, BLOCK_E, BLOCK_P = 256, 1024, 64
# the tiles above at their Triton num_warps
WARPS = 4


@triton.jit
def _record(table, prog, pid, F: tl.constexpr):
    """(this program's layer record, its block index within the layer)."""
    layer = tl.load(prog + 2 * pid)
    return table + layer * F, tl.load(prog + 2 * pid + 1), layer


@triton.jit
def _w_offsets(rows, cols, M, Q, SIMPLE: tl.constexpr):
    """Element offsets of W's matrix view at (rows x cols)."""
    if SIMPLE:  # dim = 0: row-major (M, Q) with Q = number of columns
        return rows[:, None] * Q + cols[None, :]
    return (cols // Q)[None, :] * (M * Q) + rows[:, None] * Q + (cols % Q)[None, :]


@triton.jit
def _matrix(rec, w_proto):
    """(W's pointer, rows M, columns N, inner size Q, offset into t) from a layer record."""
    w = tl.load(rec + 0).to(tl.pointer_type(w_proto.dtype.element_ty))
    return w, tl.load(rec + 3), tl.load(rec + 4), tl.load(rec + 5), tl.load(rec + 6)


@triton.jit
def _w_tile(w, rows, cols, M, N, Q, SIMPLE: tl.constexpr):
    """W[rows, cols] as an fp32 tile, zero outside the matrix."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return tl.load(w + _w_offsets(rows, cols, M, Q, SIMPLE), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _wv_kernel(
    table, prog, t_buf, w_proto, v_proto, F: tl.constexpr, SIMPLE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr
):
    """t[rows] = W[rows, :] v for this program's block of rows."""
    rec, blk, _ = _record(table, prog, tl.program_id(0), F)
    w, M, N, Q, t_off = _matrix(rec, w_proto)
    v = tl.load(rec + 2).to(tl.pointer_type(v_proto.dtype.element_ty))
    rows = blk * BM + tl.arange(0, BM)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for c0 in range(0, N, BN):
        cols = c0 + tl.arange(0, BN)
        vv = tl.load(v + cols, mask=cols < N, other=0.0).to(tl.float32)
        acc += _w_tile(w, rows, cols, M, N, Q, SIMPLE) * vv[None, :]
    tl.store(t_buf + t_off + rows, tl.sum(acc, axis=1), mask=rows < M)


@triton.jit
def _wtu_kernel(
    table,
    prog,
    t_buf,
    p_buf,
    w_proto,
    F: tl.constexpr,
    SIMPLE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    CH: tl.constexpr,
):
    """p[chunk, cols] = W[chunk rows, cols]^T t[chunk rows] for this program's (column block, chunk)."""
    rec, blk, _ = _record(table, prog, tl.program_id(0), F)
    w, M, N, Q, t_off = _matrix(rec, w_proto)
    p_off, n_cb = tl.load(rec + 12), tl.load(rec + 13)
    chunk, cb = blk // n_cb, blk % n_cb
    cols = cb * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for r0 in range(0, CH, BM):
        rows = chunk * CH + r0 + tl.arange(0, BM)
        tt = tl.load(t_buf + t_off + rows, mask=rows < M, other=0.0)
        acc += _w_tile(w, rows, cols, M, N, Q, SIMPLE) * tt[:, None]
    tl.store(p_buf + p_off + chunk * N + cols, tl.sum(acc, axis=0), mask=cols < N)


@triton.jit
def _reduce_kernel(table, prog, t_buf, p_buf, s_buf, parts, u_proto, eps, F: tl.constexpr, BN: tl.constexpr):
    """u = t / max(|t|, eps) (block 0 stores it); s[cols] = sum over chunks of p[chunk, cols] / |t|, in
    chunk order; parts[block] = |s[cols]|^2."""
    rec, blk, _ = _record(table, prog, tl.program_id(0), F)
    M, N, t_off, s_off, part_off = (
        tl.load(rec + 3),
        tl.load(rec + 4),
        tl.load(rec + 6),
        tl.load(rec + 7),
        tl.load(rec + 8),
    )
    p_off, n_chunks = tl.load(rec + 12), tl.load(rec + 14)
    sq = tl.zeros([BN], dtype=tl.float32)
    for r0 in range(0, M, BN):
        rows = r0 + tl.arange(0, BN)
        tt = tl.load(t_buf + t_off + rows, mask=rows < M, other=0.0)
        sq += tt * tt
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)
    cols = blk * BN + tl.arange(0, BN)
    cmask = cols < N
    acc = tl.zeros([BN], dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(p_buf + p_off + c * N + cols, mask=cmask, other=0.0)
    s = acc * inv
    tl.store(s_buf + s_off + cols, s, mask=cmask)
    tl.store(parts + part_off + blk, tl.sum(s * s, axis=0))
    if blk == 0:
        u = tl.load(rec + 1).to(tl.pointer_type(u_proto.dtype.element_ty))
        for r0 in range(0, M, BN):
            rows = r0 + tl.arange(0, BN)
            tt = tl.load(t_buf + t_off + rows, mask=rows < M, other=0.0)
            tl.store(u + rows, (tt * inv).to(u_proto.dtype.element_ty), mask=rows < M)


@triton.jit
def _scale_kernel(
    table,
    prog,
    s_buf,
    parts,
    sigma_buf,
    out_buf,
    w_proto,
    v_proto,
    eps,
    F: tl.constexpr,
    WRITE_W: tl.constexpr,
    BE: tl.constexpr,
    BP: tl.constexpr,
):
    """sigma = |s|^2 / max(|s|, eps); block 0: v = s / max(|s|, eps); W_SN[block] = W[block] / sigma."""
    rec, blk, layer = _record(table, prog, tl.program_id(0), F)
    N, s_off, part_off, n_parts = tl.load(rec + 4), tl.load(rec + 7), tl.load(rec + 8), tl.load(rec + 10)
    acc = tl.zeros([BP], dtype=tl.float32)
    for p0 in range(0, n_parts, BP):
        offs = p0 + tl.arange(0, BP)
        acc += tl.load(parts + part_off + offs, mask=offs < n_parts, other=0.0)
    ss = tl.sum(acc, axis=0)
    norm = tl.maximum(tl.sqrt(ss), eps)
    sigma = ss / norm
    if blk == 0:
        tl.store(sigma_buf + layer, sigma)
        v = tl.load(rec + 2).to(tl.pointer_type(v_proto.dtype.element_ty))
        for c0 in range(0, N, BE):
            cols = c0 + tl.arange(0, BE)
            s = tl.load(s_buf + s_off + cols, mask=cols < N, other=0.0)
            tl.store(v + cols, (s / norm).to(v_proto.dtype.element_ty), mask=cols < N)
    if WRITE_W:
        w = tl.load(rec + 0).to(tl.pointer_type(w_proto.dtype.element_ty))
        out = out_buf + tl.load(rec + 9)
        numel = tl.load(rec + 11)
        offs = blk * BE + tl.arange(0, BE)
        x = tl.load(w + offs, mask=offs < numel, other=0.0).to(tl.float32)
        tl.store(out + offs, (x / sigma).to(w_proto.dtype.element_ty), mask=offs < numel)


def _programs(counts: list[int], device) -> torch.Tensor:
    """The (layer, block) pairs of a grid with counts[l] blocks for layer l, flattened int32."""
    pairs = [(layer, b) for layer, n in enumerate(counts) for b in range(n)]
    return torch.tensor(pairs, dtype=torch.int32).reshape(-1).to(device, non_blocking=True)


def layer_geometry(M: int, N: int) -> dict[str, int]:
    """Programs per pass for one (M x N) matrix view, and the pass-2 split: what the launch grids of
    one layer hold (the benchmark's occupancy arithmetic reads it too)."""
    n_cb, n_chunks = triton.cdiv(N, BLOCK_N2), triton.cdiv(M, CHUNK)
    return {
        "pass1": triton.cdiv(M, BLOCK_M1),
        "pass2": n_cb * n_chunks,
        "pass3": triton.cdiv(N, BLOCK_N3),
        "pass4": triton.cdiv(M * N, BLOCK_E),
        "col_blocks": n_cb,
        "chunks": n_chunks,
    }


class _Plan:
    """The tables for one group of layers, rebuilt only when a pointer or shape changes."""

    def __init__(self, weights, layers):
        device = weights[0].device
        self.shapes = []
        rec, t_off, s_off, part_off, out_off, p_off = [], 0, 0, 0, 0, 0
        self.simple = True
        geos = []
        for w, sn in zip(weights, layers):
            M = w.shape[sn.dim]
            N = w.numel() // M
            Q = 1
            for d in w.shape[sn.dim + 1 :]:
                Q *= d
            self.simple &= Q == N
            geo = layer_geometry(M, N)
            geos.append(geo)
            n_parts = geo["pass3"]
            rec.append(
                [
                    w.data_ptr(),
                    sn._u.data_ptr(),
                    sn._v.data_ptr(),
                    M,
                    N,
                    Q,
                    t_off,
                    s_off,
                    part_off,
                    out_off,
                    n_parts,
                    w.numel(),
                    p_off,
                    geo["col_blocks"],
                    geo["chunks"],
                ]
            )
            self.shapes.append((M, N, t_off, s_off, out_off))
            t_off, s_off, part_off, out_off = t_off + M, s_off + N, part_off + n_parts, out_off + w.numel()
            p_off += geo["chunks"] * N
        self.sizes = (t_off, s_off, part_off, out_off, p_off)
        self.table = torch.tensor(rec, dtype=torch.int64).to(device, non_blocking=True)
        self.progs = {k: _programs([g[k] for g in geos], device) for k in ("pass1", "pass2", "pass3", "pass4")}
        self.progs["one"] = _programs([1] * len(weights), device)
        self.grids = {k: len(p) // 2 for k, p in self.progs.items()}


_plans: dict[tuple, _Plan] = {}


def _key(weights, layers) -> tuple:
    return tuple(
        (w.data_ptr(), tuple(w.shape), sn._u.data_ptr(), sn._v.data_ptr(), sn.dim) for w, sn in zip(weights, layers)
    )


def run(layers: list[reference.SpectralNorm], weights, write_w: bool = True) -> tuple[list[torch.Tensor], list[tuple]]:
    """One training-mode step of every layer in `layers` (same device, weight dtype, buffer dtype and
    n_power_iterations): updates their u, v buffers and returns (W_sn per layer, saved per layer)
    in the form `reference.SNWeights` expects; with `write_w=False`, sigma per layer (0-d fp32) instead
    of W_sn, for `reference.SNSigma` (W_sn is never written: the layer scales its output by 1/sigma)."""
    w0, sn0 = weights[0], layers[0]
    key = _key(weights, layers)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 64:
            _plans.clear()
        plan = _plans[key] = _Plan(weights, layers)
    t_size, s_size, n_parts, out_size, p_size = plan.sizes
    out_buf = torch.empty(out_size if write_w else 0, device=w0.device, dtype=w0.dtype)
    t_buf = torch.empty(t_size, device=w0.device, dtype=torch.float32)
    s_buf = torch.empty(s_size, device=w0.device, dtype=torch.float32)
    p_buf = torch.empty(p_size, device=w0.device, dtype=torch.float32)
    parts = torch.empty(n_parts, device=w0.device, dtype=torch.float32)
    sigma = torch.empty(len(weights), device=w0.device, dtype=torch.float32)
    progs, grids = plan.progs, plan.grids
    u0, v0 = sn0._u, sn0._v
    for it in range(sn0.n_power_iterations):
        last = write_w and it == sn0.n_power_iterations - 1
        _wv_kernel[(grids["pass1"],)](
            plan.table,
            progs["pass1"],
            t_buf,
            w0,
            v0,
            F=FIELDS,
            SIMPLE=plan.simple,
            BM=BLOCK_M1,
            BN=BLOCK_N1,
            num_warps=WARPS,
        )
        _wtu_kernel[(grids["pass2"],)](
            plan.table,
            progs["pass2"],
            t_buf,
            p_buf,
            w0,
            F=FIELDS,
            SIMPLE=plan.simple,
            BM=BLOCK_M2,
            BN=BLOCK_N2,
            CH=CHUNK,
            num_warps=WARPS,
        )
        _reduce_kernel[(grids["pass3"],)](
            plan.table, progs["pass3"], t_buf, p_buf, s_buf, parts, u0, sn0.eps, F=FIELDS, BN=BLOCK_N3, num_warps=WARPS
        )
        which = "pass4" if last else "one"
        _scale_kernel[(grids[which],)](
            plan.table,
            progs[which],
            s_buf,
            parts,
            sigma,
            out_buf,
            w0,
            v0,
            sn0.eps,
            F=FIELDS,
            WRITE_W=last,
            BE=BLOCK_E,
            BP=BLOCK_P,
            num_warps=WARPS,
        )
    outs, saved = [], []
    for i, ((M, N, t_off, s_off, out_off), sn, w) in enumerate(zip(plan.shapes, layers, weights)):
        outs.append(out_buf[out_off : out_off + w.numel()].view(w.shape) if write_w else sigma[i])
        saved.append((t_buf[t_off : t_off + M], s_buf[s_off : s_off + N], sigma[i], sn.dim, sn.eps))
    return outs, saved
