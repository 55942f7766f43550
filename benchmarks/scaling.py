"""DDP scaling: throughput and step time for 1 and 2 ranks, the all-reduce share of a step, and a
paper estimate for 8 and 64 GPUs.

    python benchmarks/scaling.py [--steps 60] [--batch 64] [--preset digits-dcgan]
    python benchmarks/scaling.py --estimate      # only the paper estimate (no training)

Measured part: `distgan train` on the embedded digits (real shards, the default DCGAN), started
with `accelerate launch` for 1 and 2 CPU ranks (gloo; on a GPU machine, 1 GPU as well), with
data.batch_size per rank fixed (weak scaling). Throughput comes from the trainer's own
perf/samples_per_sec over the steps after the first log interval (warm-up). The all-reduce share
is measured directly: 2 ranks all-reduce a flat fp32 buffer of G's and D's gradient size, as DDP
does once for D and once for G per step, and that time is divided by the 2-rank step time.

Estimate part (results/scaling-estimate.md): gradient bytes per step of DCGAN-64 and SNGAN-128
against NVLink and InfiniBand bandwidth for 8 and 64 GPUs, with the assumptions written out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, gpu: bool, threads: int) -> subprocess.CompletedProcess:
    multi = ["--multi_gpu"] if world > 1 else []
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *multi,
        "--num_processes",
        str(world),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)


def train_throughput(world: int, gpu: bool, args) -> dict:
    cores = os.cpu_count() or 1
    threads = max(cores // world, 1)
    with tempfile.TemporaryDirectory() as tmp:
        r = launch(
            [
                "-m",
                "distgan",
                "train",
                "--preset",
                args.preset,
                "--out",
                tmp,
                f"train.steps={args.steps}",
                f"train.log_every={args.steps // 3}",
                f"data.batch_size={args.batch}",
                "train.sample_every=100000",
                "train.ckpt_every=100000",
                "tracking.wandb.mode=disabled",
            ],
            world,
            gpu,
            threads,
        )
        if r.returncode != 0:
            return {"note": "failed: " + r.stderr.strip().splitlines()[-1][:100]}
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in lines if "perf/samples_per_sec" in m][1:]  # the first interval includes warm-up
    total = statistics.mean(m["perf/samples_per_sec"] for m in logged)
    step_ms = 1000 / statistics.mean(m["perf/steps_per_sec"] for m in logged)
    return {"images/s total": total, "images/s per rank": total / world, "step ms": step_ms, "threads/rank": threads}


def grad_numel(preset: str) -> int:
    from distgan import config, variants

    v = variants.get(config.load_config(preset).variant.name)(config.load_config(preset))
    return sum(p.numel() for m in v.models.values() for p in m.parameters())


def allreduce_worker(numel: int, repeats: int) -> None:
    """Run under `accelerate launch`: time all_reduce of an fp32 buffer of `numel` elements."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    buf = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(buf)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps({"ms": 1000 * statistics.median(times)}))
    dist.destroy_process_group()


# -- the paper estimate ---------------------------------------------------------------------------


class GBlock(nn.Module):
    """SNGAN's generator block: BN-ReLU-up-conv3-BN-ReLU-conv3 + up-conv1 shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.b1, self.b2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.c1, self.c2, self.sc = (
            nn.Conv2d(cin, cout, 3, 1, 1),
            nn.Conv2d(cout, cout, 3, 1, 1),
            nn.Conv2d(cin, cout, 1),
        )

    def forward(self, x):
        h = F.interpolate(F.relu(self.b1(x)), scale_factor=2)
        h = self.c2(F.relu(self.b2(self.c1(h))))
        return h + self.sc(F.interpolate(x, scale_factor=2))


def sngan128_generator(ch: int = 64, z: int = 128) -> nn.Module:
    widths = [16 * ch, 16 * ch, 8 * ch, 4 * ch, 2 * ch, ch]
    return nn.Sequential(
        nn.Linear(z, 4 * 4 * widths[0]),
        nn.Unflatten(1, (widths[0], 4, 4)),
        *[GBlock(a, b) for a, b in zip(widths, widths[1:])],
        nn.BatchNorm2d(ch),
        nn.ReLU(),
        nn.Conv2d(ch, 3, 3, 1, 1),
        nn.Tanh(),
    )


def estimate() -> str:
    from bench_spectral_norm import SNGANResNetD

    from distgan.models import dcgan

    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    models = {
        "DCGAN-64": (n(dcgan.Generator(100, 3, 64, 64)), n(dcgan.Discriminator(3, 64, 64))),
        "SNGAN-128 (ch=64)": (n(sngan128_generator()), n(SNGANResNetD(ch=64))),
    }
    # Bus bandwidths NCCL typically reaches (busBW of all_reduce_perf), per GPU and direction:
    links = {
        "8 GPUs, one node (NVLink/NVSwitch, H100/H200)": (8, 360e9),
        "64 GPUs, 8 nodes (8x 400 Gb/s InfiniBand NDR per node, one NIC per GPU)": (64, 40e9),
    }
    lines = [
        "# Scaling estimate (on paper)\n",
        "What one training step all-reduces, and how long that takes at the bandwidth of the links, for",
        "8 GPUs in one node and 64 GPUs over 8 nodes. distgan all-reduces D's gradients once (D step) and",
        "G's once (G step) per step, in fp32 (DDP buckets of 25 MB), whatever the per-GPU batch; gradient",
        "accumulation micro-batches add nothing (no_sync; counted in the tests).\n",
        "Ring all-reduce time = 2 (N-1)/N x bytes / busBW. Assumed busBW (what NCCL's all_reduce_perf",
        "usually reports, not measured here): 360 GB/s on NVLink4/NVSwitch, 40 GB/s per GPU across nodes",
        "on 400 Gb/s NDR (NCCL's hierarchical rings then cross the network once per GPU's share).\n",
        "| model | G params | D params | bytes all-reduced per step | link | N | all-reduce ms per step |",
        "|---|---|---|---|---|---|---|",
    ]
    ms = {}
    for name, (g, d) in models.items():
        nbytes = 4 * (g + d)
        for link, (world, bw) in links.items():
            ms[name, world] = 1000 * 2 * (world - 1) / world * nbytes / bw
            lines.append(
                f"| {name} | {g / 1e6:.1f}M | {d / 1e6:.1f}M | {nbytes / 1e6:.0f} MB | {link} | {world} "
                f"| {ms[name, world]:.2f} |"
            )
    dc, sn = "DCGAN-64", "SNGAN-128 (ch=64)"
    lines += [
        "",
        "Reading it: DDP overlaps the all-reduce with the backward, so it costs step time only where it",
        "outlasts the backward. A DCGAN-64 step at batch 64 per GPU is a few ms of compute on an H100",
        f"(not measured here: no GPU was lent to this project), so on NVLink its {ms[dc, 8]:.2f} ms of",
        "communication is hidden and 8 GPUs should scale almost linearly; across 8 nodes its",
        f"{ms[dc, 64]:.2f} ms is of the order of the backward, so expect visibly less than linear scaling",
        f"unless the per-GPU batch grows. SNGAN-128 ({sum(models[sn]) / 1e6:.0f}M parameters) needs",
        f"{ms[sn, 8]:.1f} ms on NVLink, hidden behind a backward of tens of ms at batch 64, and",
        f"{ms[sn, 64]:.1f} ms across nodes, which calls for bf16 gradient compression (DDP's",
        "bf16_compress_hook halves the bytes) or larger per-GPU batches.",
        "",
        "Measured for comparison on this project's CPU machine: benchmarks/results/scaling-cpu2.md.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--preset", default="digits-dcgan")
    p.add_argument("--estimate", action="store_true", help="write only the paper estimate")
    p.add_argument("--allreduce-worker", nargs=2, type=int, metavar=("NUMEL", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allreduce_worker:
        allreduce_worker(*args.allreduce_worker)
        return
    common.RESULTS.mkdir(exist_ok=True)
    text = estimate()
    command = " ".join([sys.executable.split("/")[-1], *sys.argv])
    text += f"\nWritten at git {common.git_rev()} by `{command}`. Nothing on this page was measured.\n"
    (common.RESULTS / "scaling-estimate.md").write_text(text)
    print(text)
    if args.estimate:
        return

    gpu = torch.cuda.is_available()
    rows = []
    configs = [("cpu", 1), ("cpu", 2)] + ([("gpu", 1)] if gpu else [])
    for device, world in configs:
        row = {"device": device, "ranks": world, "batch/rank": args.batch}
        row.update(train_throughput(world, device == "gpu", args))
        rows.append(row)
        print(row, flush=True)
    numel = grad_numel(args.preset)
    r = launch([__file__, "--allreduce-worker", str(numel), "20"], 2, False, max((os.cpu_count() or 2) // 2, 1))
    ar_ms = json.loads(r.stdout.strip().splitlines()[-1])["ms"] if r.returncode == 0 else None
    two = next(r for r in rows if r["device"] == "cpu" and r["ranks"] == 2)
    one = next(r for r in rows if r["device"] == "cpu" and r["ranks"] == 1)
    if ar_ms is not None and "step ms" in two:
        two["all-reduce ms/step"] = ar_ms  # G's and D's gradients: the same bytes as one flat buffer
        two["all-reduce share"] = ar_ms / two["step ms"]
    if "images/s total" in one and "images/s total" in two:
        two["scaling efficiency"] = two["images/s total"] / (2 * one["images/s total"])
    notes = (
        f"`{args.preset}` on the embedded digits (real shards), {args.steps} steps, batch {args.batch} per rank, "
        f"W&B off; the first log interval is left out as warm-up. All-reduce: {numel * 4 / 1e6:.1f} MB of fp32 "
        "gradients (G and D) over gloo on 2 ranks, median of 20. Ranks share this machine's cores "
        "(threads/rank), so 2 CPU ranks also halve each rank's compute: CPU scaling here measures the "
        "overheads of DDP, not the speed-up a second machine would bring."
    )
    cols = [
        "device",
        "ranks",
        "batch/rank",
        "threads/rank",
        "images/s total",
        "images/s per rank",
        "step ms",
        "all-reduce ms/step",
        "all-reduce share",
        "scaling efficiency",
        "note",
    ]
    common.write("scaling", rows, cols, notes, extra={"grad_numel": numel})


if __name__ == "__main__":
    main()
