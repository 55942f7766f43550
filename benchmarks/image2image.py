"""Pix2Pix, SRGAN and CycleGAN on the embedded photo and digit sets, measured on held-out data.

    python benchmarks/image2image.py [--sr-steps 2500] [--sr-pretrain 2000] [--pix2pix-steps 1500]
                                     [--cyclegan-steps 1000] [--only sr pix2pix cyclegan]

Each experiment is `distgan train --preset ...` (the shipped presets, fewer steps), then
`distgan eval` on its checkpoints (held-out photos / digits never seen in training):
- sr: photos-srgan-x4, measured after the pixel-loss phase (step = --sr-pretrain) and at the end
  of the adversarial phase, against bicubic upscaling;
- pix2pix: edges2photos-pix2pix, against the L1-only U-Net (the same run with variant.gan_weight=0);
- cyclegan: cyclegan-digits-thin2thick: cycle error and a domain classifier's verdicts.
Runs live in benchmarks/results/image2image/runs/ (not committed) and a finished run is not
trained again, so the script resumes. Writes results/image2image-<machine>.{json,md} and one
preview grid per run (input | output | target rows) as results/image2image-<run>.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = common.RESULTS / "image2image" / "runs"


def cli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "distgan", *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"distgan {' '.join(args[:3])} failed:\n{r.stderr[-3000:]}")


def train(name: str, preset: str, steps: int, *overrides: str) -> tuple[Path, float]:
    run = WORK / name
    done = run / "done.json"
    if done.is_file():
        return run, json.loads(done.read_text())["train_s"]
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    cli(
        "train",
        "--preset",
        preset,
        "--out",
        str(run),
        f"train.steps={steps}",
        "tracking.wandb.mode=disabled",
        "train.keep_last=100",
        "train.eval_every=0",
        *overrides,
    )
    train_s = time.perf_counter() - start
    done.write_text(json.dumps({"train_s": train_s}))
    return run, train_s


def evaluate(run: Path, step: int) -> dict:
    out = run / f"eval-{step}.json"
    if not out.is_file():
        cli("eval", "--ckpt", str(run / "checkpoints" / f"step-{step:08d}"), "--json", str(out), "--device", "cpu")
    return json.loads(out.read_text())


def grid(run: Path, name: str) -> None:
    shutil.copy(run / "samples" / "latest.png", common.RESULTS / f"image2image-{name}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sr-steps", type=int, default=2500)
    p.add_argument("--sr-pretrain", type=int, default=2000)
    p.add_argument("--pix2pix-steps", type=int, default=1500)
    p.add_argument("--cyclegan-steps", type=int, default=1000)
    p.add_argument("--only", nargs="+", choices=("sr", "pix2pix", "cyclegan"), default=("sr", "pix2pix", "cyclegan"))
    args = p.parse_args()
    rows = []
    if "sr" in args.only:
        run, train_s = train(
            "srgan",
            "photos-srgan-x4",
            args.sr_steps,
            f"variant.pretrain_steps={args.sr_pretrain}",
            f"train.ckpt_every={args.sr_pretrain}",
            f"train.sample_every={args.sr_steps}",
        )
        for step, phase in (
            (args.sr_pretrain, "after pixel-loss phase (SRResNet)"),
            (args.sr_steps, "after adversarial phase (SRGAN)"),
        ):
            e = evaluate(run, step)
            rows.append(
                {
                    "experiment": "SR x4 (photos-srgan-x4)",
                    "model": phase,
                    "step": step,
                    "PSNR dB": e["psnr"],
                    "SSIM": e["ssim"],
                    "baseline": "bicubic",
                    "baseline PSNR dB": e["psnr_bicubic"],
                    "baseline SSIM": e["ssim_bicubic"],
                    "gain dB": e["psnr_gain_db"],
                    "train s": train_s,
                }
            )
        grid(run, "srgan")
    if "pix2pix" in args.only:
        n = args.pix2pix_steps
        for name, label, extra in (
            ("pix2pix", "pix2pix (cGAN + 100 L1)", []),
            ("l1-unet", "L1-only U-Net", ["variant.gan_weight=0"]),
        ):
            run, train_s = train(
                name, "edges2photos-pix2pix", n, f"train.ckpt_every={n}", f"train.sample_every={n}", *extra
            )
            e = evaluate(run, n)
            rows.append(
                {
                    "experiment": "edges -> photos (edges2photos-pix2pix)",
                    "model": label,
                    "step": n,
                    "PSNR dB": e["psnr"],
                    "SSIM": e["ssim"],
                    "edge F1": e["edge_f1"],
                    "sharpness ratio": e["sharpness_ratio"],
                    "train s": train_s,
                }
            )
            grid(run, name)
    if "cyclegan" in args.only:
        n = args.cyclegan_steps
        run, train_s = train(
            "cyclegan", "cyclegan-digits-thin2thick", n, f"train.ckpt_every={n}", f"train.sample_every={n}"
        )
        e = evaluate(run, n)
        rows.append(
            {
                "experiment": "digits thin <-> thick (cyclegan-digits-thin2thick)",
                "model": "CycleGAN",
                "step": n,
                "cycle error A": e["cycle_error_a"],
                "cycle error B": e["cycle_error_b"],
                "A->B judged B": e["ab_classified_b"],
                "B->A judged A": e["ba_classified_a"],
                "classifier held-out acc": e["classifier_heldout_accuracy"],
                "train s": train_s,
            }
        )
        grid(run, "cyclegan")
    columns = [
        "experiment",
        "model",
        "step",
        "PSNR dB",
        "SSIM",
        "baseline",
        "baseline PSNR dB",
        "baseline SSIM",
        "gain dB",
        "edge F1",
        "sharpness ratio",
        "cycle error A",
        "cycle error B",
        "A->B judged B",
        "B->A judged A",
        "classifier held-out acc",
        "train s",
    ]
    notes = (
        "All figures on held-out data: 200 patches from the right quarter of each photo, which no training patch "
        "overlaps, for SR and pix2pix; the held-out 10% of each digit domain for CycleGAN. PSNR/SSIM on RGB in [0, 1]; SR shaves 4 "
        "border pixels. Edge F1: Canny edges of the output against the drawn edge map (1 px tolerance). "
        "Sharpness ratio: mean gradient magnitude of the outputs over that of the real targets (1 = as detailed as "
        "the photos; a blurry regression is below 1). Cycle error: mean |x - G(F(x))| in [0, 1] units. "
        "Grids: results/image2image-<run>.png (input | output | target rows; CycleGAN: x | G(x) | F(G(x))). "
        "train s is wall time; the SR run and the pix2pix/CycleGAN runs were trained side by side on the 2 cores "
        "(`--only sr` and `--only pix2pix cyclegan`), then this command collected them."
    )
    common.write("image2image", rows, [c for c in columns if any(c in r for r in rows)], notes)


if __name__ == "__main__":
    main()
