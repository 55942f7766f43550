"""Does augmentation help `photos-biggan-64` on its small data set? SWD of each checkpoint against
held-out photo patches.

The preset trains on 4000 patches (96x96, resized to 64 as the stream does: PIL bilinear) from the
left three quarters of five scikit-image photos. Held-out patches come from the right quarter of the
same photos, which no training patch overlaps (distgan/data/builtin.py). For every checkpoint of each
run this draws --n samples from the EMA generator and measures:

- SWD (sliced Wasserstein distance on Laplacian-pyramid patches, x1e3; Karras et al. 2018;
  distgan/metrics/swd.py) against --n held-out patches: how well the model generalises. This is the
  figure to compare. (An FID needs the Inception weights, which are not on this machine, and an FID
  on random-weight features measures nothing; SWD needs no network. docs/evaluation.md says more.)
- SWD against --n training patches: a model that memorises scores far better here than above.
- memorisation: each sample's pixel distance to its nearest training patch, median, over the same
  for the held-out patches (1.0: as far from the training set as new real patches are; near 0: copies).

Real rows give the scale: training patches against held-out ones and against other training patches.

    python benchmarks/photos_quality.py --run ada=runs/ada --run noaug=runs/noaug [--steps 2000,4000] [--n 1000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from distgan import checkpoint  # noqa: E402
from distgan import images as images_module  # noqa: E402
from distgan.data import builtin  # noqa: E402
from distgan.metrics.swd import swd  # noqa: E402

SIZE, STORED = 64, 96  # the preset's resolution; the builtin patches' stored size


def as_stream_reads(patches: np.ndarray) -> torch.Tensor:
    """uint8 (N, 96, 96, 3) -> (N, 3, 64, 64) in [-1, 1], resized as the training stream does."""
    from PIL import Image

    small = np.stack([np.asarray(Image.fromarray(p).resize((SIZE, SIZE), Image.BILINEAR)) for p in patches])
    return torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1


def nearest(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Each row of x's L2 distance to its nearest row of bank (flattened images)."""
    x, bank = x.flatten(1).double(), bank.flatten(1).double()
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ bank.T + (bank * bank).sum(1)
    return d2.clamp_min(0).min(dim=1).values.sqrt()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a run to judge (repeatable)")
    p.add_argument("--steps", default="", help="comma-separated checkpoint steps (default: every checkpoint)")
    p.add_argument("--n", type=int, default=1000, help="samples, held-out and training patches per SWD (default 1000)")
    p.add_argument("--name", default="photos_quality")
    p.add_argument("--about", default="", help="how the runs were trained, for the notes")
    args = p.parse_args()
    runs = dict(r.split("=", 1) for r in args.run)
    train_u8, _ = builtin.photos_hr()  # the preset's 4000 training patches (builtin:photos-hr)
    train = as_stream_reads(train_u8)
    # the builtin held-out draw (seed 3), extended to n patches
    held = as_stream_reads(builtin._patches(args.n, STORED, seed=3, heldout=True))
    ref_train, probe = train[: args.n], train[args.n : 2 * args.n]
    held_nn = nearest(held, train).median().item()
    probe_nn = nearest(probe, torch.cat([ref_train, train[2 * args.n :]])).median().item()
    rows = [
        {
            "run": "real: training patches",
            "step": "",
            "SWD vs held-out": swd(probe, held),
            "SWD vs training": swd(probe, ref_train),
            "memorisation": probe_nn / held_nn,
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            log = {}
            metrics_file = Path(run) / "metrics.jsonl"
            if metrics_file.exists():
                for line in metrics_file.read_text().splitlines():
                    rec = json.loads(line)
                    if "augment/p" in rec:
                        log[rec["step"]] = rec["augment/p"]
            steps = {int(checkpoint.STEP_DIR.match(f.name).group(1)): f for f in checkpoint.list_steps(Path(run))}
            if args.steps:
                wanted = {int(w) for w in args.steps.split(",")}
                steps = {s: f for s, f in steps.items() if s in wanted}
            if not steps:
                raise SystemExit(f"no checkpoints to judge in {run}/checkpoints")
            for step, folder in steps.items():
                out = f"{tmp}/{name}-{step}.npy"
                cmd = ["sample", "--ckpt", str(folder), "--n", str(args.n), "--out", out]
                subprocess.run([sys.executable, "-m", "distgan", *cmd], check=True, capture_output=True)
                x = torch.from_numpy(np.load(out))
                row = {
                    "run": name,
                    "step": step,
                    "SWD vs held-out": swd(x, held),
                    "SWD vs training": swd(x, ref_train),
                    "memorisation": nearest(x, train).median().item() / held_nn,
                    "augment p": log.get(step, "n/a"),
                }
                rows.append(row)
                print(
                    f"{name} step {step}: SWD held-out {row['SWD vs held-out']['swd']:.1f}, "
                    f"training {row['SWD vs training']['swd']:.1f}, memorisation {row['memorisation']:.3f}",
                    flush=True,
                )
            grid = common.RESULTS / f"{args.name}-{name}-{common.machine_tag()}.png"
            images_module.save_png(grid, images_module.make_grid(x[:64], nrow=8, scale=1))
    table = []
    for r in rows:
        levels = r["SWD vs held-out"]["swd_levels"]
        table.append(
            {
                "run": r["run"],
                "step": r["step"],
                "SWD vs held-out (mean)": r["SWD vs held-out"]["swd"],
                "64 / 32 / 16": " / ".join(f"{levels[k]:.1f}" for k in sorted(levels, reverse=True)),
                "SWD vs training": r["SWD vs training"]["swd"],
                "memorisation": r["memorisation"],
                "augment p": r.get("augment p", ""),
            }
        )
    notes = (
        f"{args.about or 'Runs: ' + ', '.join(f'{k}={v}' for k, v in runs.items())}. {args.n} EMA-generator samples per "
        f"checkpoint, {args.n} held-out patches (right quarter of each photo), {args.n} training patches. SWD x1e3 "
        "(mean of the 64, 32 and 16 px pyramid levels; lower is better). Memorisation: median distance of a sample to "
        f"its nearest training patch over the same for held-out patches ({held_nn:.1f}); the real row measures training "
        "patches against the other training patches, and is low because the training patches overlap each other."
    )
    common.write(args.name, table, list(table[0]), notes, extra={"rows": rows})


if __name__ == "__main__":
    main()
