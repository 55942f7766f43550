"""Trainer steps/s of presets with train.compile off and on (and, compiled, with the kernels as custom
ops or traced for Inductor): the last step of benchmarks/gpu_suite.sh. Each run is `distgan train`
in this process on the preset's real shards, for --steps steps; the rate is read from metrics.jsonl
(perf/steps_per_sec) after the first log interval, so compilation and warm-up are left out.

    python benchmarks/gpu_steps.py [--presets digits-dcgan digits-sngan photos-biggan-64] [--steps 300]
        [--dry-run]   (CPU, width 4, a few steps: the same code path, no meaningful figures)
    python benchmarks/gpu_steps.py --sync-check [--presets ...]
    python benchmarks/gpu_steps.py --presets digits-gat --set model.vit.size=B model.vit.patch=1 \
        data.batch_size=128 variant.n_critic=1 train.mixed_precision=bf16 --modes eager compile --name gat_b2_steps
        (--set: overrides for every run; GAT-B/2's width, its 256 tokens and one D step per G step, on the
        digits at 16 px)

--sync-check runs the presets' steps under torch.cuda.set_sync_debug_mode("error") from the end of each
step's batch draw to the start of its periodic jobs (which read the host on purpose, at log steps): a
step that makes the host wait for the GPU fails there, with its traceback in the table. It is the GPU
side of tests/test_gpu_path.py::test_steps_read_no_tensor_on_the_host_between_log_steps; without CUDA
it says so and checks nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

MODES = {
    "eager": [],
    "compile": ["train.compile=true"],
    "compile, inductor SN": ["train.compile=true", "train.compile_kernels=false"],
}


def run(preset: str, mode: str, steps: int, log_every: int, extra: list[str]) -> dict:
    from distgan import config, trainer

    cfg = config.load_config(
        preset,
        overrides=[
            f"train.steps={steps}",
            f"train.log_every={log_every}",
            "train.sample_every=1000000000",
            "train.ckpt_every=1000000000",
            "tracking.wandb.mode=disabled",
            *MODES[mode],
            *extra,
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer.train(cfg, f"{tmp}/run")
        wall = time.perf_counter() - start
        lines = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/steps_per_sec"] for r in lines if "perf/steps_per_sec" in r and r["step"] > log_every]
    rate = len(rates) * log_every / sum(log_every / r for r in rates) if rates else None
    return {
        "preset": preset,
        "mode": mode,
        "batch": cfg.data.batch_size,
        "resolution": cfg.data.resolution,
        "steps/s": rate,
        "images/s": rate * cfg.data.batch_size if rate else None,
        "wall s": wall,
    }


def sync_check(preset: str, steps: int, extra: list[str]) -> dict:
    """`steps` steps of `preset` with every synchronising CUDA call inside a step an error."""
    import traceback

    import torch

    from distgan import config, periodic, trainer
    from distgan.data import feeds

    if not torch.cuda.is_available():
        return {"preset": preset, "mode": "sync check", "note": "no CUDA: nothing checked"}
    draw, jobs = feeds.draw, periodic.periodic

    def drawing(*args, **kwargs):
        out = draw(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")  # the step proper starts
        return out

    def periodic_jobs(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)  # log, grid, checkpoint: host reads on purpose
        return jobs(*args, **kwargs)

    overrides = [
        f"train.steps={steps}",
        f"train.log_every={max(steps // 2, 1)}",
        "tracking.wandb.mode=disabled",
        "train.sample_every=1000000000",
        "train.ckpt_every=1000000000",
        *extra,
    ]
    feeds.draw, periodic.periodic = drawing, periodic_jobs
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer.train(config.load_config(preset, overrides=overrides), f"{tmp}/run")
        return {"preset": preset, "mode": "sync check", "steps/s": None, "note": None}
    except RuntimeError as exc:
        where = [
            f for f in traceback.extract_tb(exc.__traceback__) if "/distgan/" in f.filename or "/kernels/" in f.filename
        ]
        at = f" at {where[-1].filename.split('/')[-1]}:{where[-1].lineno} {where[-1].name}" if where else ""
        return {"preset": preset, "mode": "sync check", "note": f"failed: a step synchronised{at}: {exc}"[:200]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
        feeds.draw, periodic.periodic = draw, jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["digits-dcgan", "digits-sngan", "photos-biggan-64"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--name", default="gpu_steps", help="results/<name>-<machine>.{json,md} (default gpu_steps)")
    p.add_argument("--sync-check", action="store_true", help="steps under torch.cuda.set_sync_debug_mode('error')")
    args = p.parse_args(argv)
    if args.sync_check:
        rows = [sync_check(preset, 20, []) for preset in args.presets]
        for row in rows:
            print(row, flush=True)
        common.write(
            "gpu_sync",
            rows,
            ["preset", "mode", "note"],
            "20 steps each; set_sync_debug_mode('error') from each step's batch draw to its periodic jobs",
        )
        return 1 if any((r.get("note") or "").startswith("failed") for r in rows) else 0
    steps, log_every, extra = args.steps, max(args.steps // 6, 1), []
    if args.dry_run:
        steps, log_every = 4, 2
        extra = ["model.g.width=4", "model.d.width=4", "data.batch_size=4", "train.n_samples=4"]
    extra += args.set
    rows = []
    for preset in args.presets:
        for mode in args.modes:
            try:
                rows.append(run(preset, mode, steps, log_every, extra))
            except Exception as exc:  # reported in the table; the suite goes on
                rows.append({"preset": preset, "mode": mode, "note": f"failed: {type(exc).__name__}: {exc}"[:160]})
            print(rows[-1], flush=True)
    notes = (
        f"{steps} steps per run, rate over the steps after the first {log_every} (compilation excluded); "
        + (f"overrides: {' '.join(args.set)}; " if args.set else "")
        + ("DRY RUN: toy widths on the CPU, the figures mean nothing." if args.dry_run else "")
    )
    common.write(
        args.name, rows, ["preset", "mode", "batch", "resolution", "steps/s", "images/s", "wall s", "note"], notes
    )
    return 1 if any("note" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
