"""Trainer steps/s of presets with train.compile off and on (and, compiled, with the kernels as custom
ops or traced for Inductor): the last step of benchmarks/gpu_suite.sh. Each run is `distgan train`
in this process on the preset's real shards, for --steps steps; the rate is read from metrics.jsonl
(perf/steps_per_sec) after the first log interval, so compilation and warm-up are left out.

    python benchmarks/gpu_steps.py [--presets digits-dcgan digits-sngan photos-biggan-64] [--steps 300]
        [--dry-run]   (CPU, width 4, a few steps: the same code path, no meaningful figures)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["digits-dcgan", "digits-sngan", "photos-biggan-64"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    steps, log_every, extra = args.steps, max(args.steps // 6, 1), []
    if args.dry_run:
        steps, log_every = 4, 2
        extra = ["model.g.width=4", "model.d.width=4", "data.batch_size=4", "train.n_samples=4"]
    rows = []
    for preset in args.presets:
        for mode in args.modes:
            try:
                rows.append(run(preset, mode, steps, log_every, extra))
            except Exception as exc:  # reported in the table; the suite goes on
                rows.append({"preset": preset, "mode": mode, "note": f"failed: {type(exc).__name__}: {exc}"[:160]})
            print(rows[-1], flush=True)
    notes = f"{steps} steps per run, rate over the steps after the first {log_every} (compilation excluded); " + (
        "DRY RUN: toy widths on the CPU, the figures mean nothing." if args.dry_run else ""
    )
    common.write(
        "gpu_steps", rows, ["preset", "mode", "batch", "resolution", "steps/s", "images/s", "wall s", "note"], notes
    )
    return 1 if any("note" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
