"""What a training step of the residual G + D costs at 32-256 px, and what spectral norm costs in it.

For each resolution and width: an unconditional BigGAN-style G and D (distgan/models/resnet.py)
with spectral norm on every conv and linear layer of both, trained with the hinge loss and Adam
(one D step on real + fake, one G step, as the sngan variant does), timed per step. Three ways to
normalise: none, distgan's (`kernels.spectral_norm` grouped by `kernels.spectral_norm_all`: the
fused Triton kernels on CUDA, the PyTorch fallback elsewhere) and PyTorch's parametrization
(`torch.nn.utils.parametrizations.spectral_norm`). The kinds are interleaved over the repeats and
the median step time is reported, so a drifting machine affects them alike. "SN share" is
(t_ours - t_none) / t_ours. Peak memory: CUDA's max allocated; on a CPU the process's max RSS so far
(monotonic over the table, so only its growth says something).

    python benchmarks/scale.py [--resolutions 32 64 128 256] [--widths 4 8] [--batch 4] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import kernels  # noqa: E402
from distgan.models import layers, resnet  # noqa: E402

KINDS = ("none", "distgan", "torch")


def build(resolution: int, width: int, kind: str, device):
    torch.manual_seed(0)
    G = resnet.Generator(128, 3, resolution, width=width).to(device)
    D = resnet.Discriminator(3, resolution, width=width).to(device)
    for model in (G, D):
        if kind == "distgan":
            layers.apply_spectral_norm(model)
        elif kind == "torch":
            for m in list(model.modules()):
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.utils.parametrizations.spectral_norm(m)
    opt_g = torch.optim.Adam(G.parameters(), 1e-4, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 4e-4, betas=(0.0, 0.999))
    return G, D, opt_g, opt_d


def step(G, D, opt_g, opt_d, real: torch.Tensor) -> None:
    z = torch.randn(real.size(0), 128, device=real.device)
    opt_d.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = G(z)
    (F.relu(1 - D(real)).mean() + F.relu(1 + D(fake)).mean()).backward()
    opt_d.step()
    opt_g.zero_grad(set_to_none=True)
    for p in D.parameters():
        p.requires_grad_(False)
    (-D(G(z)).mean()).backward()
    for p in D.parameters():
        p.requires_grad_(True)
    opt_g.step()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--widths", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for resolution in args.resolutions:
        for width in args.widths:
            real = torch.rand(args.batch, 3, resolution, resolution, device=device) * 2 - 1
            built = {k: build(resolution, width, k, device) for k in KINDS}
            times: dict[str, list[float]] = {k: [] for k in KINDS}
            peaks = {}
            for _ in range(args.repeats):
                for kind in KINDS:  # interleaved
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    step(*built[kind], real)  # warm-up
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step(*built[kind], real)
                    sync(device)
                    times[kind].append((time.perf_counter() - start) / args.steps)
                    peaks[kind] = peak_mib(device)
            t = {k: statistics.median(v) for k, v in times.items()}
            params = sum(q.numel() for q in built["none"][0].parameters()) + sum(
                q.numel() for q in built["none"][1].parameters()
            )
            rows.append(
                {
                    "resolution": resolution,
                    "width": width,
                    "params (M)": params / 1e6,
                    "images/s, no SN": args.batch / t["none"],
                    "images/s, distgan SN": args.batch / t["distgan"],
                    "images/s, torch SN": args.batch / t["torch"],
                    "SN share (distgan)": (t["distgan"] - t["none"]) / t["distgan"],
                    "torch SN / distgan SN step": t["torch"] / t["distgan"],
                    "peak MiB (distgan)": peaks["distgan"],
                }
            )
            print(rows[-1], flush=True)
            del built
    backend = kernels._backend.auto(device)
    notes = (
        f"Batch {args.batch} per step, median of {args.repeats} repeats of {args.steps} steps, kinds interleaved; "
        f"device {device}, distgan's SN backend: {backend}. Peak memory: "
        + ("torch.cuda.max_memory_allocated." if device.type == "cuda" else "the process's max RSS so far (monotonic).")
    )
    common.write("scale", rows, list(rows[0]), notes)


if __name__ == "__main__":
    main()
