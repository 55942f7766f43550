"""Step cost of the gradient-penalty modes (variant.penalty_mode), eager and compiled, on this machine.

For each preset, five runs of `distgan train`: exact eager, approx eager, approx compiled, lazy
eager, lazy compiled (train.compile=true with exact is refused: torch.compile has no double
backward). The runs are interleaved, round by round (`--rounds`), so a machine that slows down
slows every mode alike. Steps/s is the mean of perf/steps_per_sec over the log intervals after
the first (which holds the compile); log intervals are a multiple of variant.penalty_every, so
every interval holds the same share of lazy regularisation steps. Each run is a process of its own
(`--cell`): peak memory is its peak RSS on the CPU (Python and PyTorch included, about 0.4 GB) and
torch.cuda.max_memory_allocated on a GPU. Each figure is also given as a ratio to exact eager of
the same round. `r3gan-256` (the cluster template, on the built-in photos at 256 px) is for a GPU
(benchmarks/gpu_suite.sh runs it).

    python benchmarks/penalty_cost.py [--presets digits-r3gan photos-biggan-64] [--rounds 2] [--intervals 4]
    python benchmarks/penalty_cost.py --presets r3gan-cifar --modes "exact eager" "approx eager" \
        "approx compiled" --rounds 1 --intervals 1 --name r3gan_cost     (R3GAN's networks, small)

Writes results/<--name, default penalty_cost>-<machine>.{json,md}. Run it with nothing else on the machine, or with
OMP_NUM_THREADS set, for ratios that mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's distgan, whatever is installed
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVERY = 16  # variant.penalty_every (StyleGAN2's)
MODES = {
    "exact eager": ["variant.penalty_mode=exact"],
    "approx eager": ["variant.penalty_mode=approx"],
    "approx compiled": ["variant.penalty_mode=approx", "train.compile=true"],
    "lazy eager": ["variant.penalty_mode=lazy"],
    "lazy compiled": ["variant.penalty_mode=lazy", "train.compile=true"],
}
# small widths; photos-biggan-64 with R1 (its preset has none) and SAGAN attention in D at 32 px
PRESETS = {
    "digits-r3gan": ["model.g.width=8", "model.d.width=8"],
    "photos-biggan-64": ["model.g.width=8", "model.d.width=8", "variant.r1_gamma=1", "model.d.attention=32"],
    "r3gan-256": ["data.shards=builtin:photos-hr", "data.num_workers=4"],
    "grid-r3gan": ["data.batch_size=32", "model.g.width=16", "model.d.width=16"],  # (gpu_suite.sh --dry-run)
    # R3GAN's CIFAR-10 networks at 1/12 of their width (64 per stage, 8 groups), unconditional, on the
    # built-in photo patches at 32 px, with StyleGAN2-ADA's augmentation: the architecture's step on a CPU
    "r3gan-cifar": [
        "data.shards=builtin:photos-hr",
        "model.num_classes=0",
        "variant.name=gan",
        "model.r3gan.widths=[64,64,64,64]",
        "model.r3gan.cardinalities=[8,8,8,8]",
        "data.batch_size=16",
        "data.num_workers=0",
        "train.mixed_precision=no",
    ],
}
CPU_PRESETS = ["digits-r3gan", "photos-biggan-64"]


def cell(preset: str, mode: str, intervals: int, out: Path) -> dict:
    """One run, in this process: steps/s after the first log interval, and peak memory (MB)."""
    import resource

    import torch

    from distgan import config, trainer

    steps = EVERY * (intervals + 1)
    overrides = [*PRESETS[preset], *MODES[mode], f"variant.penalty_every={EVERY}", f"train.steps={steps}"]
    overrides += [f"train.log_every={EVERY}", f"train.sample_every={steps * 10}", f"train.ckpt_every={steps * 10}"]
    overrides += ["tracking.wandb.mode=disabled", "train.ema_beta=0"]
    if trainer.train(config.load_config(preset, overrides=overrides), out) != 0:
        raise SystemExit(f"{preset} {mode}: the run stopped early")
    rates = [
        m["perf/steps_per_sec"]
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "perf/steps_per_sec" in m
    ]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"steps_per_sec": statistics.mean(rates[1:]), "peak_mb": peak}


def run(preset: str, mode: str, intervals: int, out: Path) -> dict:
    """`cell` in a process of its own (so its peak memory is its own)."""
    cmd = [sys.executable, __file__, "--cell", preset, mode, "--intervals", str(intervals), "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=CPU_PRESETS, choices=list(PRESETS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--intervals", type=int, default=4, help="timed log intervals of 16 steps after the first")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--name", default="penalty_cost", help="results file name (results/NAME-<machine>.*)")
    p.add_argument("--cell", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(cell(*args.cell, args.intervals, args.out)))
        return
    cells: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for preset in args.presets:
                modes = ["exact eager", *(m for m in args.modes if m != "exact eager")]  # the ratios' base
                order = modes if r % 2 == 0 else modes[::-1]
                for mode in order:
                    res = run(preset, mode, args.intervals, Path(tmp) / f"{preset}-{mode}-{r}".replace(" ", "-"))
                    cells.setdefault((preset, mode), []).append(res)
                    print(f"round {r} {preset:18s} {mode:16s} {res['steps_per_sec']:7.2f} steps/s", flush=True)
    rows = []
    for preset in args.presets:
        base = cells[(preset, "exact eager")]
        for mode in [m for m in MODES if (preset, m) in cells]:
            got = cells[(preset, mode)]
            speed = [g["steps_per_sec"] / b["steps_per_sec"] for g, b in zip(got, base)]
            mem = [g["peak_mb"] / b["peak_mb"] for g, b in zip(got, base)]
            rows.append(
                {
                    "preset": preset,
                    "mode": mode,
                    "steps_per_sec": statistics.mean(g["steps_per_sec"] for g in got),
                    "speed_vs_exact_eager": statistics.mean(speed),
                    "peak_mb": statistics.mean(g["peak_mb"] for g in got),
                    "memory_vs_exact_eager": statistics.mean(mem),
                    "rounds": len(got),
                }
            )
    command = "python benchmarks/penalty_cost.py " + " ".join(sys.argv[1:])
    widths = "; ".join(f"{k}: {' '.join(v)}" for k, v in PRESETS.items())
    notes = (
        f"Command: `{command}` (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}). Each row: "
        f"`distgan train` of the preset at small width ({widths}), "
        f"{EVERY * (args.intervals + 1)} steps, variant.penalty_every={EVERY}; steps/s over the log intervals after "
        "the first (compile excluded), ratios to exact eager taken round by round and averaged. Peak memory: "
        "the training process's peak RSS on the CPU (Python and PyTorch included), "
        "torch.cuda.max_memory_allocated on a GPU."
    )
    cols = ["preset", "mode", "steps_per_sec", "speed_vs_exact_eager", "peak_mb", "memory_vs_exact_eager", "rounds"]
    common.write(args.name, rows, cols, notes, {"command": command})


if __name__ == "__main__":
    main()
