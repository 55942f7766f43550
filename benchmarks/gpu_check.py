"""Every Triton kernel against its PyTorch reference in float64, forward and backward: the first step
of benchmarks/gpu_suite.sh. On a GPU the kernels run compiled on CUDA; with --dry-run they run on the
CPU under the interpreter (TRITON_INTERPRET=1, set by the suite) at toy sizes.

    python benchmarks/gpu_check.py [--dry-run]

Exits 1 if any check fails; writes results/gpu_check-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def check_minibatch(device, sizes, dtypes) -> list[dict]:
    import kernels
    from kernels.minibatch import reference

    rows = []
    for b, o, k in sizes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(b + k)
            m64 = torch.randn(b, o, k, generator=g, dtype=torch.float64) * 0.3
            grad = torch.randn(b, o, generator=g, dtype=torch.float64)
            m = m64.to(device, dtype).requires_grad_(True)
            out = kernels.minibatch_discrimination(m, backend="triton", group_size=b // 2)
            out.backward(grad.to(device, dtype))
            ref_m = m.detach().double().cpu().requires_grad_(True)
            ref = reference.minibatch_l1(ref_m, True, b // 2)
            ref.backward(grad)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            fwd, bwd = rel_err(out.detach().cpu(), ref.detach()), rel_err(m.grad.cpu(), ref_m.grad)
            rows.append(
                {
                    "check": "minibatch_l1",
                    "shape": f"{b}x{o}x{k}",
                    "dtype": str(dtype).split(".")[-1],
                    "fwd rel err": fwd,
                    "bwd rel err": bwd,
                    "tol": tol,
                    "ok": fwd < tol and bwd < tol,
                }
            )
    return rows


def check_spectral_norm(device, sizes, dtypes) -> list[dict]:
    """Triton (per layer, grouped, scale=output) against the float64 fallback from the same u, v:
    W/sigma or the layer output, u, v, and the gradients of W."""
    import kernels

    rows = []
    for rows_, cols in sizes:
        for dtype in dtypes:
            for mode in ("weight", "output", "grouped"):
                torch.manual_seed(rows_ + cols)
                base = nn.Linear(cols, rows_)
                ref = kernels.spectral_norm(copy.deepcopy(base).double(), backend="torch")
                ours = kernels.spectral_norm(
                    copy.deepcopy(base), backend="triton", scale="output" if mode == "output" else "weight"
                )
                ours.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
                ours = ours.to(device, dtype)
                if mode == "grouped":
                    ours = kernels.spectral_norm_all(nn.Sequential(ours))
                x = torch.randn(8, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                y_ref = ref(x)
                y = ours(x.to(device, dtype))
                y_ref.square().sum().backward()
                y.float().square().sum().backward()
                layer = ours[0] if mode == "grouped" else ours
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                errs = {
                    "out": rel_err(y.detach().float().cpu(), y_ref.detach()),
                    "u": rel_err(layer.parametrizations.weight[0]._u.cpu(), ref.parametrizations.weight[0]._u),
                    "v": rel_err(layer.parametrizations.weight[0]._v.cpu(), ref.parametrizations.weight[0]._v),
                    "dW": rel_err(
                        layer.parametrizations.weight.original.grad.float().cpu(),
                        ref.parametrizations.weight.original.grad,
                    ),
                }
                rows.append(
                    {
                        "check": f"spectral_norm {mode}",
                        "shape": f"{rows_}x{cols}",
                        "dtype": str(dtype).split(".")[-1],
                        "fwd rel err": max(errs["out"], errs["u"], errs["v"]),
                        "bwd rel err": errs["dW"],
                        "tol": tol,
                        "ok": max(errs.values()) < tol,
                    }
                )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU under the interpreter")
    args = p.parse_args(argv)
    if args.dry_run:
        device, mb_sizes, sn_sizes, dtypes = "cpu", [(8, 3, 5)], [(33, 20)], [torch.float32]
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_check.py needs a GPU (or --dry-run)")
        device = "cuda"
        mb_sizes, sn_sizes = [(64, 32, 5), (256, 128, 16), (1024, 64, 8)], [(513, 257), (4096, 4096), (64, 4608)]
        dtypes = [torch.float32, torch.bfloat16]
    rows = check_minibatch(device, mb_sizes, dtypes) + check_spectral_norm(device, sn_sizes, dtypes)
    notes = (
        "Each Triton kernel against the float64 PyTorch reference (kernels/*/reference.py) on the same inputs: "
        "max relative error of outputs (and u, v) and of the input gradients. "
        + ("Dry run: CPU interpreter, toy sizes." if args.dry_run else "CUDA, compiled kernels.")
    )
    common.write("gpu_check", rows, ["check", "shape", "dtype", "fwd rel err", "bwd rel err", "tol", "ok"], notes)
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAILED: {r}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
