"""Does the default `distgan train` learn recognisable digits of all ten classes, and how fast?

Trains the given preset (default: the default preset) with `distgan train`, draws 1000 samples
from the EMA generator with `distgan sample`, and judges them with a classifier trained on the
real digits (distgan/metrics/digits.py). Held-out real digits give the reference row.

    python benchmarks/digits_quality.py [--preset digits-dcgan] [--run EXISTING_RUN_DIR] [--name NAME] [key=value ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from distgan.metrics import digits  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits-dcgan")
    p.add_argument("--run", help="judge this run's latest checkpoint instead of training one")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--name", default="digits_quality", help="results/<name>-<machine>.{json,md} (to keep several)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, seconds = args.run, None
        if run is None:
            run = f"{tmp}/run"
            cmd = [
                sys.executable,
                "-m",
                "distgan",
                "train",
                "--preset",
                args.preset,
                "--out",
                run,
                "tracking.wandb.mode=disabled",
                *args.overrides,
            ]
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds = time.perf_counter() - start
        subprocess.run(
            [sys.executable, "-m", "distgan", "sample", "--ckpt", run, "--n", str(args.n), "--out", f"{tmp}/s.npy"],
            check=True,
        )
        result = digits.evaluate(torch.from_numpy(np.load(f"{tmp}/s.npy")))
    rows = []
    for name, r in (("generated (EMA G)", result["generated"]), ("real held-out", result["real_heldout"])):
        rows.append(
            {
                "images": name,
                "n": r["n"],
                "confident (p>=0.9)": r["confident_fraction"],
                "mean max p": r["mean_max_prob"],
                "classes covered": r["classes_covered"],
                "smallest class share": r["min_class_fraction"],
                "class histogram": r["class_histogram"],
            }
        )
    accuracy = result["real_heldout"]["accuracy"]
    wall = f"{seconds:.0f} s" if seconds else "n/a (existing run)"
    notes = (
        f"Preset {args.preset} {' '.join(args.overrides)}; training wall time {wall}. Classifier: logistic regression on the real digits "
        f"resized to the training resolution, held-out accuracy {accuracy:.3f}. Histograms count confident predictions only."
    )
    common.write(
        args.name, rows, list(rows[0]), notes, extra={"train_seconds": seconds, "classifier_accuracy": accuracy}
    )


if __name__ == "__main__":
    main()
