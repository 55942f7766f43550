"""R3GAN's block (distgan/models/r3gan.py) with its grouped 3x3 conv run natively or as a block-diagonal
dense conv (model.grouped_conv): forward, backward, and the R1 double backward, per stage shape.

The shapes are the stages of the `r3gan-cifar` template (width 768, 96 groups of 16 expanded channels,
at 4x4 .. 32x32) and the high-resolution stages of `r3gan-ffhq-256` (384 / 48 groups at 64x64, 192 / 24
at 128x128, 96 / 12 at 256x256), one block each. Per cell, in a process of its own: the median over
`--repeats` of forward (D(x)), backward (forward + D(x).sum().backward()), and the R1 step (forward,
the input gradient with create_graph, |grad|^2 backward: the double backward); peak memory is the
process's peak RSS growth over the cell on the CPU (torch.cuda.max_memory_allocated on a GPU). Both
forms hold the same parameters and give the same values (tests/test_r3gan.py); the block-diagonal
form does `groups` times the grouped conv's FLOPs in dense kernels.

    python benchmarks/grouped_conv.py [--batch 2] [--repeats 3] [--shapes cifar-4 ... ffhq-256]

Writes results/grouped_conv-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's distgan, whatever is installed
import common  # noqa: E402

# name -> (width C, cardinality, side): the block is C -> 2C (1x1), grouped 3x3 on 2C, 2C -> C
SHAPES = {
    "cifar-4": (768, 96, 4),
    "cifar-8": (768, 96, 8),
    "cifar-16": (768, 96, 16),
    "cifar-32": (768, 96, 32),
    "ffhq-64": (384, 48, 64),
    "ffhq-128": (192, 24, 128),
    "ffhq-256": (96, 12, 256),
}
FORMS = ("native", "block_diagonal")


def cell(shape: str, form: str, batch: int, repeats: int) -> dict:
    """One (shape, form) in this process: median seconds of fwd, fwd+bwd, R1 step; peak memory (MB)."""
    import resource

    import torch

    from distgan.models import r3gan

    width, card, side = SHAPES[shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    block = r3gan.Block(width, card, 2, total_blocks=8, grouped_conv=form).to(device)
    with torch.no_grad():
        block.conv3.weight.normal_(0, 0.01)  # not the zero init: the branch's backward does real work
    x = torch.randn(batch, width, side, side, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            block(x)

    def bwd():
        block(x).sum().backward()

    def r1():
        xi = x.detach().requires_grad_(True)
        y = block(xi)
        (g,) = torch.autograd.grad(y.sum(), xi, create_graph=True)
        g.square().sum().backward()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"shape": shape, "form": form, "batch": batch, "width": width, "groups": card, "side": side}
    for name, fn in (("fwd_ms", fwd), ("bwd_ms", bwd), ("r1_ms", r1)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        block.zero_grad(set_to_none=True)
        out[name] = statistics.median(times)
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    # FLOPs of the grouped conv's forward, analytically (multiply-adds x 2)
    wide = 2 * width
    out["conv_gflop"] = 2 * batch * side * side * wide * (wide // card) * 9 / 1e9
    out["dense_gflop"] = out["conv_gflop"] * card
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--cell", nargs=2, metavar=("SHAPE", "FORM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(cell(*args.cell, args.batch, args.repeats)))
        return
    rows = []
    for shape in args.shapes:
        by_form = {}
        for form in args.forms:
            cmd = [sys.executable, __file__, "--cell", shape, form, "--batch", str(args.batch)]
            res = subprocess.run([*cmd, "--repeats", str(args.repeats)], capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"cell {shape} {form} failed")
            by_form[form] = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(by_form[form]), file=sys.stderr)
        native = by_form.get("native")
        for form, r in by_form.items():
            if native is not None and form != "native":
                for k in ("fwd_ms", "bwd_ms", "r1_ms"):
                    r[f"{k[:-3]}_speedup"] = native[k] / r[k]
            rows.append(r)
    columns = ["shape", "form", "batch", "width", "groups", "side", "fwd_ms", "bwd_ms", "r1_ms"]
    columns += ["fwd_speedup", "bwd_speedup", "r1_speedup", "peak_mb", "conv_gflop", "dense_gflop"]
    notes = (
        "One R3GAN block (1x1 conv C -> 2C, grouped 3x3 on 2C channels, 1x1 back) per row; `*_speedup` is "
        "native's time over block_diagonal's (> 1: the dense form is faster). fwd: no-grad forward; bwd: "
        "forward + backward; r1: forward, input gradient with create_graph, backward of its squared norm "
        "(the exact R1 penalty's double backward). peak_mb: peak RSS growth of the cell's process on the "
        "CPU, torch.cuda.max_memory_allocated on a GPU. conv_gflop: the grouped conv's forward FLOPs; "
        "dense_gflop: the block-diagonal form's (x groups)."
    )
    common.write("grouped_conv", rows, columns, notes)


if __name__ == "__main__":
    main()
