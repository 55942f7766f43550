"""Minibatch discrimination's pairwise L1: time and peak memory of each implementation.

Implementations: naive (materialises B x B x O x K), the chunked fallback (kernels/minibatch/reference.py),
torch.compile of naive, a torch.cdist(p=1) formulation, and Triton (GPU only: under the CPU
interpreter its timings mean nothing). Modes: forward (no grad) and forward + backward.
Sizes: B in {64, 256, 1024, 4096} at O=128, K=16 (headline) and the paper's B=100, O=100, K=5.

Each (implementation, size, mode) runs in its own process, so peak memory is measured cleanly:
torch.cuda.max_memory_allocated on GPU, the growth of the process's peak RSS on CPU, both minus
the inputs. On GPU the table adds the FP32 floor, 2*B^2*O*K operations at the measured FP32 rate.
Runs whose naive memory would not fit are skipped and marked.

    python benchmarks/bench_minibatch_l1.py [--sizes 64 256 1024 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

IMPLS = ("naive", "chunked", "compile", "cdist", "triton")


def cdist_formulation(m: torch.Tensor) -> torch.Tensor:
    x = m.permute(1, 0, 2)  # (O, B, K)
    c = torch.exp(-torch.cdist(x, x, p=1.0))  # (O, B, B)
    return (c.sum(2) - 1.0).t()  # minus the j = i term, exp(0) = 1


def build(impl: str):
    from kernels import minibatch_discrimination
    from kernels.minibatch import reference

    if impl == "naive":
        return reference.minibatch_l1_naive
    if impl == "chunked":
        return lambda m: minibatch_discrimination(m, backend="torch")
    if impl == "compile":
        return torch.compile(reference.minibatch_l1_naive)
    if impl == "cdist":
        return cdist_formulation
    if impl == "triton":
        return lambda m: minibatch_discrimination(m, backend="triton")
    raise ValueError(impl)


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(impl: str, b: int, o: int, k: int, mode: str, repeats: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = build(impl)
    torch.manual_seed(0)
    m = (torch.randn(b, o, k, device=device) * 0.3).requires_grad_(mode == "fwd+bwd")
    g = torch.randn(b, o, device=device)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(m)
        else:
            out = fn(m)
            torch.autograd.grad(out, m, g)
        if device == "cuda":
            torch.cuda.synchronize()

    # CPU: the peak RSS never goes down, so the baseline is taken before the warm-up call (whose
    # peak, compilation included for torch.compile, then counts); GPU: the allocator's peak after it.
    base = peak_bytes(device)
    step()  # warm-up (compiles)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if device == "cuda" else 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    extra = (peak_bytes(device) - base_alloc) if device == "cuda" else (peak_bytes(device) - base)
    return {"ms": 1000 * statistics.median(times), "peak_extra_mb": max(extra, 0) / 2**20}


def materialised_bytes(impl: str, b: int, o: int, k: int, mode: str) -> int:
    """Rough peak of the materialising implementations: B x B x O (x K) fp32 temporaries."""
    per = b * b * o * 4 * (k if impl in ("naive", "compile") else 1)
    return per * (2 if mode == "fwd" else 4)


def fp32_rate() -> float | None:
    """Measured FP32 CUDA-core rate (FLOP/s): an 8192^3 SGEMM with TF32 off runs on the CUDA cores."""
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(8192, 8192, device="cuda")
    for _ in range(2):
        a @ a
    torch.cuda.synchronize()
    n = 5
    start = time.perf_counter()
    for _ in range(n):
        a @ a
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", nargs="+", default=list(IMPLS))
    p.add_argument(
        "--max-naive-gb",
        type=float,
        default=None,
        help="skip materialising runs above this (default: half the RAM / GPU memory)",
    )
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--one", nargs=6, metavar=("IMPL", "B", "O", "K", "MODE", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        impl, b, o, k, mode, repeats = args.one
        print(json.dumps(run_one(impl, int(b), int(o), int(k), mode, int(repeats))))
        return

    gpu = torch.cuda.is_available()
    if args.max_naive_gb is None:
        total = (
            torch.cuda.get_device_properties(0).total_memory
            if gpu
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )
        args.max_naive_gb = total / 2**30 / 2
    rate = fp32_rate()
    shapes = [(b, 128, 16) for b in args.sizes] + [(100, 100, 5)]
    rows = []
    for b, o, k in shapes:
        for mode in ("fwd", "fwd+bwd"):
            for impl in args.impls:
                row = {"B": b, "O": o, "K": k, "mode": mode, "impl": impl}
                if impl == "triton" and not gpu:
                    row["note"] = "needs a GPU"
                elif (
                    impl in ("naive", "compile", "cdist")
                    and materialised_bytes(impl, b, o, k, mode) > args.max_naive_gb * 2**30
                ):
                    row["note"] = f"skipped: materialises ~{materialised_bytes(impl, b, o, k, mode) / 2**30:.0f} GB"
                else:
                    repeats = args.repeats if b * b * o * k <= 2**31 else 1
                    cmd = [sys.executable, __file__, "--one", impl, str(b), str(o), str(k), mode, str(repeats)]
                    try:
                        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                        if r.returncode == 0:
                            row.update(json.loads(r.stdout.strip().splitlines()[-1]))
                        else:
                            row["note"] = "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:80]
                    except subprocess.TimeoutExpired:
                        row["note"] = f"timed out after {args.timeout} s"
                if rate and "ms" in row:
                    floor_ms = 1000 * 2 * b * b * o * k / rate * (1 if mode == "fwd" else 3)
                    row["x floor"] = row["ms"] / floor_ms
                rows.append(row)
                print(row, flush=True)
    notes = (
        "ms: median wall time per call; peak_extra_mb: peak memory above the inputs (GPU: allocator peak; CPU: "
        "growth of the process's peak RSS over all calls, which includes the output and, for compile, compilation). "
        + (f"x floor: time / (2*B^2*O*K FLOP at {rate / 1e12:.1f} TFLOP/s FP32; x3 for fwd+bwd). " if rate else "")
        + "The chunked fallback's memory budget is 256 MB."
    )
    columns = ["B", "O", "K", "mode", "impl", "ms", "peak_extra_mb"] + (["x floor"] if rate else []) + ["note"]
    common.write("bench_minibatch_l1", rows, columns, notes, extra={"fp32_flops": rate})


if __name__ == "__main__":
    main()
