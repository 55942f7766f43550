"""Spectral norm: time per discriminator forward (training mode) and kernel launches per forward.

Workloads:
- dcgan:   the DCGAN-64 discriminator of distgan.models.dcgan without BatchNorm (5 SN layers);
- sngan:   a ResNet SNGAN-128 discriminator (the block structure of Miyato et al. 2018 at ch=48: 21.6M
           parameters, 18 SN layers);
- linear4096: one 4096x4096 linear layer.

Implementations:
- none:            the same D without spectral norm (what the layers themselves cost);
- torch:           torch.nn.utils.parametrizations.spectral_norm;
- torch+compile:   the same under torch.compile (Inductor);
- torch+cudagraph: the same captured in a CUDA graph and replayed (forward under no_grad; GPU only);
- ours-fallback:   kernels.spectral_norm(backend="torch"), two passes over W in torch ops;
- ours-fallback-out: the same with scale="output" (1/sigma on the layers' outputs, no W/sigma);
- ours-triton:     kernels.spectral_norm per layer (4 Triton launches each; GPU only);
- ours-grouped:    plus kernels.spectral_norm_all(D): 4 launches for all layers (GPU only);
- ours-grouped-out: grouped with scale="output" (GPU only);
- ours+compile-ops: ours (grouped, auto backend) under torch.compile with the kernels as custom ops;
- ours+compile-inductor: the same with the fallback's torch ops traced for Inductor to fuse.

The roofline part (--roofline-sizes) times the power iteration alone on one N x N fp32 linear layer
(a training-mode read of its weight, or of sigma for scale="output") against the bytes each variant
moves over W: the floor is two reads (t = W v, s = W^T u); scale="weight" adds a read and a write
(W/sigma); PyTorch's parametrization a third read for sigma on top. Each variant's floor is its bytes
at the measured read bandwidth; the plot (PNG) draws time against N^2 with the floors dashed.

Columns: ms per forward (median), SN ms = ms - ms(none), launches per forward (GPU: CUDA kernels
counted with torch.profiler), and for linear4096 the floor: two fp32 passes over W at the
bandwidth measured by reading a W-sized buffer.

    python benchmarks/bench_spectral_norm.py [--workloads dcgan sngan linear4096] [--repeats 20]
        [--roofline-sizes 256 512 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

IMPLS = (
    "none",
    "torch",
    "torch+compile",
    "torch+cudagraph",
    "ours-fallback",
    "ours-fallback-out",
    "ours-triton",
    "ours-grouped",
    "ours-grouped-out",
    "ours+compile-ops",
    "ours+compile-inductor",
)
GPU_ONLY = ("torch+cudagraph", "ours-triton", "ours-grouped", "ours-grouped-out")


class ResBlock(nn.Module):
    """SNGAN's discriminator block: relu-conv3-relu-conv3 (avg-pool) + 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool = False):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, 1, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.sc = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else None
        self.down, self.first = down, first

    def forward(self, x):
        h = self.c2(F.relu(self.c1(x if self.first else F.relu(x))))
        s = x
        if self.first:  # the optimized first block pools before its shortcut conv
            s = self.sc(F.avg_pool2d(s, 2))
            return F.avg_pool2d(h, 2) + s
        if self.sc is not None:
            s = self.sc(s)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class SNGANResNetD(nn.Module):
    """The ResNet discriminator of SNGAN for 128x128 images: 6 blocks, 18 conv/linear layers."""

    def __init__(self, ch: int = 48):
        super().__init__()
        widths = [ch, ch * 2, ch * 4, ch * 8, ch * 16, ch * 16]
        blocks = [ResBlock(3, widths[0], True, first=True)]
        for a, b in zip(widths, widths[1:]):
            blocks.append(ResBlock(a, b, down=b != widths[-1] or a != b))
        blocks[-1].down = False
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], 1)

    def forward(self, x):
        return self.fc(F.relu(self.blocks(x)).sum(dim=(2, 3))).squeeze(1)


def workload(name: str, gpu: bool):
    """(plain D, input) for a workload; CPU batches are smaller."""
    torch.manual_seed(0)
    if name == "dcgan":
        from distgan.models.dcgan import Discriminator

        return Discriminator(channels=3, resolution=64, width=64, batchnorm=False), (64 if gpu else 16, 3, 64, 64)
    if name == "sngan":
        return SNGANResNetD(), (64 if gpu else 4, 3, 128, 128)
    if name == "linear4096":
        return nn.Linear(4096, 4096), (64, 4096)
    raise ValueError(name)


def sn_layers(D: nn.Module):
    return [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def build(impl: str, base: nn.Module, x: torch.Tensor):
    """A callable running one training-mode forward of D with `impl`'s spectral norm."""
    import kernels
    from kernels import _backend

    D = copy.deepcopy(base)
    if impl != "none":
        for m in sn_layers(D):
            if impl.startswith("torch"):
                nn.utils.parametrizations.spectral_norm(m, dim=1 if isinstance(m, nn.ConvTranspose2d) else None)
            else:
                backend = {"ours-fallback": "torch", "ours-fallback-out": "torch"}.get(impl.split("+")[0])
                backend = backend or (None if "+compile" in impl else "triton")
                out = impl.endswith("-out") and not isinstance(m, nn.ConvTranspose2d)
                kernels.spectral_norm(m, backend=backend, scale="output" if out else "weight")
        if impl.startswith("ours-grouped") or impl.startswith("ours+compile"):
            kernels.spectral_norm_all(D)
    D = D.to(x.device).train()
    if "+compile" in impl:
        _backend.compile_ops = impl.endswith("-ops")
        D = torch.compile(D)
    if impl == "torch+cudagraph":
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(3):
                D(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            D(static_x)
        return graph.replay
    return lambda: D(x)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def launches(fn, n: int = 5) -> float | None:
    """CUDA kernels per call, counted by torch.profiler (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels) / n


def read_bandwidth(numel: int, device: str) -> float:
    """Bytes/s reading an fp32 buffer of `numel` elements (a sum over it)."""
    buf = torch.randn(numel, device=device)
    ms = time_ms(lambda: buf.sum(), 20)
    return numel * 4 / (ms / 1000)


# passes over W (reads + writes of N^2 elements) per training-mode power iteration
PASSES = {"floor (2 reads)": 2, "ours scale=output": 2, "ours scale=weight": 4, "torch parametrization": 5}


def roofline(sizes: list[int], repeats: int, bandwidth: float, device: str) -> list[dict]:
    """The power iteration alone on N x N fp32 linear layers: measured ms against bytes / bandwidth."""
    import kernels
    from kernels.spectral import triton as power_iteration

    rows = []
    for n in sizes:
        torch.manual_seed(0)
        base = nn.Linear(n, n).to(device)
        w_bytes = n * n * 4
        layers = {
            "ours scale=weight": kernels.spectral_norm(copy.deepcopy(base)),
            "ours scale=output": kernels.spectral_norm(copy.deepcopy(base), scale="output"),
            "torch parametrization": nn.utils.parametrizations.spectral_norm(copy.deepcopy(base)),
        }
        geo = power_iteration.layer_geometry(n, n)
        for name, layer in layers.items():
            plist = layer.parametrizations.weight
            if name == "ours scale=output":
                fn = lambda p=plist: p[0].sigma(p.original)  # noqa: E731
            else:
                fn = lambda m=layer: m.weight  # noqa: E731
            with torch.no_grad():
                ms = time_ms(fn, repeats)
            floor = 1000 * PASSES[name] * w_bytes / bandwidth
            rows.append(
                {
                    "N": n,
                    "variant": name,
                    "MB moved": PASSES[name] * w_bytes / 1e6,
                    "ms": ms,
                    "model ms": floor,
                    "ms / model": ms / floor,
                    "floor ms (2 reads)": 1000 * 2 * w_bytes / bandwidth,
                    "programs pass1/2/3/4": "/".join(str(geo[k]) for k in ("pass1", "pass2", "pass3", "pass4")),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=["dcgan", "sngan", "linear4096"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--roofline-sizes",
        nargs="*",
        type=int,
        default=None,
        help="N of the N x N layers of the roofline part (default: 256..4096, 256..16384 on a GPU)",
    )
    p.add_argument("--name", default="bench_spectral_norm")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    bandwidth = read_bandwidth(4096 * 4096, device)
    rows = []
    for name in args.workloads:
        base, shape = workload(name, gpu)
        x = torch.randn(*shape, device=device)
        params = sum(p.numel() for p in base.parameters())
        n_sn = len(sn_layers(base))
        none_ms = None
        for impl in args.impls:
            row = {"workload": name, "params (M)": params / 1e6, "SN layers": n_sn, "batch": shape[0], "impl": impl}
            if impl in GPU_ONLY and not gpu:
                row["note"] = "needs a GPU"
                rows.append(row)
                continue
            try:
                fn = build(impl, base, x)
                row["ms"] = time_ms(fn, args.repeats)
                row["launches"] = launches(fn)
            except Exception as exc:  # a failing implementation is reported, not fatal
                traceback.print_exc()
                row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                rows.append(row)
                continue
            if impl == "none":
                none_ms = row["ms"]
            elif none_ms is not None:
                row["SN ms"] = row["ms"] - none_ms
            if name == "linear4096" and impl != "none":
                row["floor ms"] = 1000 * 2 * 4096 * 4096 * 4 / bandwidth
                if "SN ms" in row:
                    row["SN / floor"] = row["SN ms"] / row["floor ms"]
            rows.append(row)
            print(row, flush=True)
    notes = (
        f"ms: median wall time of one training-mode forward of D ({args.repeats} repeats after 3 warm-ups; "
        "torch+cudagraph replays a no_grad forward). SN ms: ms minus the same D without spectral norm. "
        "launches: CUDA kernels per forward (torch.profiler), GPU only. floor ms: two fp32 passes over the "
        f"4096x4096 W at the measured read bandwidth ({bandwidth / 1e9:.1f} GB/s). Our parametrization also "
        "writes W/sigma (a read and a write of W), which the two-pass floor leaves out."
    )
    columns = ["workload", "params (M)", "SN layers", "batch", "impl", "ms", "SN ms", "launches"]
    columns += ["floor ms", "SN / floor", "note"]
    common.write(args.name, rows, columns, notes, extra={"read_bandwidth_Bps": bandwidth})
    sizes = args.roofline_sizes
    if sizes is None:
        sizes = [256, 512, 1024, 2048, 4096] + ([8192, 16384] if gpu else [])
    if not sizes:
        return
    roof = roofline(sizes, args.repeats, bandwidth, device)
    backend = "Triton kernels" if gpu else "the PyTorch fallback (no GPU)"
    roof_notes = (
        f"The power iteration alone (one training-mode forward of the parametrization) on an N x N fp32 linear "
        f"layer, ours through {backend}. model ms: the variant's passes over W (reads + writes, {PASSES}) at the "
        f"measured read bandwidth ({bandwidth / 1e9:.1f} GB/s); ms / model near 1 means bandwidth-bound. "
        "programs: the Triton launch grid of each of our 4 passes for this layer (an H100/H200 has 132 SMs)."
    )
    roof_columns = [
        "N",
        "variant",
        "MB moved",
        "ms",
        "model ms",
        "ms / model",
        "floor ms (2 reads)",
        "programs pass1/2/3/4",
    ]
    common.write(args.name + "_roofline", roof, roof_columns, roof_notes, extra={"read_bandwidth_Bps": bandwidth})
    series = {}
    for r in roof:
        series.setdefault(r["variant"] + " (measured)", []).append((r["N"] ** 2, r["ms"]))
        series.setdefault(r["variant"] + " model floor", []).append((r["N"] ** 2, r["model ms"]))
    png = common.RESULTS / f"{args.name}_roofline-{common.machine_tag()}.png"
    common.loglog_png(
        png,
        series,
        "elements of W (N^2)",
        "ms per power iteration",
        f"spectral norm vs its roofline on {common.machine()['device']}",
    )
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
