"""Mode collapse on the 2-D mixtures and stacked digits, next to the published tables.

    python benchmarks/mode_collapse.py [--seeds 5] [--first-seed 0] [--steps 5000] [--datasets ring grid]
                                       [--variants gan minibatch unrolled wgan-gp sngan pacgan2 pacgan4]
                                       [--stacked-steps 3000] [--no-stacked]

Every cell (dataset, variant, seed) is one `distgan train` of the dataset's preset with the
variant's overrides, then `distgan eval --n 2500` on its final checkpoint (26 000 samples for stacked
digits; for gan-r1 also `eval --drs`, and `eval --drs --drs-calibrate`). Each finished cell is
saved in benchmarks/results/mode_collapse/cells/ with the git revision, a hash of the code
(distgan/, kernels/) and the resolved config; when the script runs again it skips a cell made by
the same code and config, so the benchmark resumes where it stopped. A cell made by other code or
another config is recomputed (with --keep-stale: reused, and its row marked stale). The tables are
rebuilt from all cells present, stale ones marked. Stacked
digits (1000 modes) then run for the two variants with the most grid modes, and the DCGAN baseline.

Outputs: results/mode_collapse-<machine>.{json,md} (mean +/- standard error over seeds, the
published rows beside them) and results/mode_collapse-scatter.png (the first seed of each variant).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = common.RESULTS / "mode_collapse" / "cells"

VARIANTS = {
    "gan": [],
    "minibatch": ["model.d.minibatch_discrimination=true", "model.d.mbd_kernels=50"],
    "unrolled": ["variant.name=unrolled", "variant.unroll_steps=5"],
    "wgan-gp": ["variant.name=wgan-gp", "variant.loss=wasserstein", "variant.n_critic=5", "train.beta2=0.9"],
    "sngan": ["variant.name=sngan", "variant.loss=hinge"],
    "pacgan2": ["variant.pack=2"],
    "pacgan4": ["variant.pack=4"],
    "gan-r1": [],  # the ring-gan-r1 / grid-gan-r1 presets: maxout D, R1, TTUR, lr decay, no EMA
    "r3gan": [],  # grid-r3gan: the same MLPs with RpGAN + R1 + R2 (R3GAN's recipe), no DRS
    # the same recipe with the penalties that compile (distgan/penalties.py): a finite difference, or
    # exact every 16th D step in a step of its own (StyleGAN2's lazy R1)
    "r3gan-approx": ["variant.penalty_mode=approx"],
    "r3gan-lazy": ["variant.penalty_mode=lazy", "variant.penalty_every=16"],
    # stacked digits only: the R3GAN recipe of stacked-digits-r3gan on R3GAN's networks instead of the DCGAN
    "r3gan-net": [],
    # ... and with its DCGAN D without BatchNorm, exact and approx: does approx's gap come from the batch
    # statistics of the perturbed batch (docs/results.md)?
    "r3gan-nobn": ["model.d.batchnorm=false"],
    "r3gan-approx-nobn": ["variant.penalty_mode=approx", "model.d.batchnorm=false"],
}
NO_BATCHNORM = ("r3gan-nobn", "r3gan-approx-nobn")
STACKED_ONLY = ("r3gan-net", *NO_BATCHNORM)
R3GAN = ("r3gan", "r3gan-approx", "r3gan-lazy")
PRESET = {"gan-r1": "{dataset}-gan-r1", **{v: "{dataset}-r3gan" for v in R3GAN}}  # default: {dataset}-gan
# default: stacked-digits-dcgan
STACKED_PRESET = {
    "gan-r1": "stacked-digits-r1",
    **{v: "stacked-digits-r3gan" for v in R3GAN},
    "r3gan-net": "stacked-digits-r3gan-net",
    **{v: "stacked-digits-r3gan" for v in NO_BATCHNORM},
}
DRS_VARIANTS = ("gan-r1",)  # also measured with discriminator rejection sampling (eval --drs)
DRS_CALIBRATE = 6000  # ... and with D first trained this many steps against the final G (--drs-calibrate)
STACKED_N = 26_000  # samples per stacked-digits evaluation, as VEEGAN and PacGAN count the 1000 modes

# (dataset, row) -> (modes, high-quality %, reverse KL); None where the paper gives no figure.
PUBLISHED = {
    ("ring", "GAN (PacGAN Table 1)"): (6.3, 98.2, 0.45),
    ("ring", "PacGAN4 (PacGAN Table 1)"): (7.8, 95.9, 0.07),
    ("grid", "GAN (PacGAN Table 1)"): (17.3, 94.8, 0.70),
    ("grid", "PacGAN4 (PacGAN Table 1)"): (24.8, 93.6, 0.04),
    ("grid", "GAN (VEEGAN Table 1)"): (3.3, 0.5, None),
    ("grid", "Unrolled GAN (VEEGAN Table 1)"): (23.6, 16.0, None),
    ("grid", "VEEGAN (VEEGAN Table 1)"): (24.6, 40.0, None),
    ("stacked", "DCGAN (VEEGAN Table 2)"): (99, None, None),
    ("stacked", "Unrolled GAN (VEEGAN Table 2)"): (48.7, None, None),
    ("stacked", "VEEGAN (VEEGAN Table 2)"): (150, None, None),
    ("stacked", "PacDCGAN2 (PacGAN Table 2)"): (1000, None, 0.06),
}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distgan", *cmd], capture_output=True, text=True, cwd=ROOT)


def cell(dataset: str, variant: str, seed: int, steps: int, keep_stale: bool = False) -> dict:
    """One cell, from its file when that was made by this code with this config; otherwise (re)computed,
    or with `keep_stale` reused and marked stale."""
    from distgan import config

    path = CELLS / f"{dataset}-{variant}-n{steps}-s{seed}.json"
    if dataset == "stacked":  # counted on STACKED_N samples (cells counted on 2500 are not comparable)
        path = CELLS / f"{dataset}-{variant}-n{steps}-e{STACKED_N}-s{seed}.json"
    if dataset == "stacked":
        preset = STACKED_PRESET.get(variant, "stacked-digits-dcgan")
    elif variant in STACKED_ONLY:
        raise SystemExit(f"variant {variant} is measured on stacked digits only (--stacked-variants)")
    else:
        preset = PRESET.get(variant, "{dataset}-gan").format(dataset=dataset)
    overrides = [
        f"train.steps={steps}",
        f"train.seed={seed}",
        "tracking.wandb.mode=disabled",
        f"train.ckpt_every={steps}",
        f"train.sample_every={steps}",
        *VARIANTS[variant],
    ]
    resolved = config.to_dict(config.load_config(preset, overrides=overrides))
    code = common.code_hash()
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("code") == code and old.get("config") == resolved:
            return old
        if keep_stale:
            return {**old, "stale": True}
        print(
            f"{path.name}: made by other code or another config (git {old.get('git', 'unknown')}); recomputing",
            flush=True,
        )
    n_eval = STACKED_N if dataset == "stacked" else 2500
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        r = run(["train", "--preset", preset, "--out", f"{tmp}/run", *overrides])
        if r.returncode != 0:
            raise RuntimeError(f"{dataset}/{variant}/seed {seed}: train failed:\n{r.stderr[-2000:]}")
        train_s = time.perf_counter() - start

        def evaluate(n: int, *extra: str) -> dict:
            r = run(
                [
                    "eval",
                    "--ckpt",
                    f"{tmp}/run",
                    "--n",
                    str(n),
                    *extra,
                    "--json",
                    f"{tmp}/eval.json",
                    "--seed",
                    str(seed),
                ]
            )
            if r.returncode != 0:
                raise RuntimeError(
                    f"{dataset}/{variant}/seed {seed}: eval {' '.join(extra)} failed:\n{r.stderr[-2000:]}"
                )
            return json.loads(Path(f"{tmp}/eval.json").read_text())

        result = evaluate(n_eval)
        # name in the cell and in sample files -> the extra flags of `eval` / `sample`
        drs_modes = {"drs": ["--drs"], "drs_cal": ["--drs", "--drs-calibrate", str(DRS_CALIBRATE)]}
        if variant not in DRS_VARIANTS or dataset == "stacked":
            drs_modes = {}
        keys = ("modes", "high_quality_pct", "reverse_kl", "drs_accept_rate", "drs_drawn")
        for name, extra in drs_modes.items():
            got = evaluate(2500, *extra)
            result[name] = {k: got[k] for k in (*keys, *(k for k in got if k.startswith("drs_calibrate")))}
        samples = {}  # seed 0's points for the scatter: file tag -> (N, 2) list, when `sample` succeeded
        if dataset != "stacked" and seed == 0:
            for tag, extra in {"": [], **{"+" + k.replace("_", "-"): v for k, v in drs_modes.items()}}.items():
                r = run(["sample", "--ckpt", f"{tmp}/run", "--n", "2500", *extra, "--out", f"{tmp}/pts.npy"])
                if r.returncode == 0:
                    samples[tag] = np.load(f"{tmp}/pts.npy").tolist()
    out = {
        "dataset": dataset,
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "train_s": train_s,
        **result,
        "git": common.git_rev(),
        "code": code,
        "config": resolved,
    }
    out.pop("checkpoint", None)
    CELLS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n")
    for tag, points in samples.items():
        (CELLS / f"{dataset}-{variant}{tag}-n{steps}-s{seed}.samples.json").write_text(json.dumps(points))
    return out


def load_cells() -> list[dict]:
    """Every cell file, each marked stale unless this code made it (its config is checked in cell())."""
    code = common.code_hash()
    cells = [json.loads(f.read_text()) for f in sorted(CELLS.glob("*.json")) if not f.name.endswith(".samples.json")]
    return [{**c, "stale": c.get("code") != code} for c in cells]


def mean_se(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    if not all(math.isfinite(v) for v in values):  # reverse KL is inf when no sample is high quality
        return math.inf, math.nan
    m = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return m, se


def fmt(m: float, se: float, digits: int = 1) -> str:
    if math.isnan(m):
        return ""
    return f"{m:.{digits}f} ± {se:.{digits}f}" if not math.isnan(se) else f"{m:.{digits}f}"


def table(done: list[dict]) -> tuple[list[dict], str]:
    rows, lines = [], []
    for dataset in ("ring", "grid", "stacked"):
        cells = [c for c in done if c["dataset"] == dataset]
        if not cells and not any(d == dataset for d, _ in PUBLISHED):
            continue
        key_modes = "stacked_modes" if dataset == "stacked" else "modes"
        key_kl = "stacked_kl" if dataset == "stacked" else "reverse_kl"
        lines += [
            f"\n### {dataset}\n",
            "| row | seeds | steps | modes | high quality % | reverse KL |",
            "|---|---|---|---|---|---|",
        ]
        for variant, steps in [(v, n) for v in VARIANTS for n in sorted({c["steps"] for c in cells})]:
            got = [c for c in cells if c["variant"] == variant and c["steps"] == steps]
            if not got:
                continue
            modes = mean_se([c[key_modes] for c in got])
            hq = mean_se([c["high_quality_pct"] for c in got]) if dataset != "stacked" else (math.nan, math.nan)
            kl = mean_se([c[key_kl] for c in got])
            rows.append(
                {
                    "dataset": dataset,
                    "variant": variant,
                    "seeds": len(got),
                    "steps": got[0]["steps"],
                    "modes": modes,
                    "high_quality_pct": hq,
                    "reverse_kl": kl,
                }
            )
            stale = sum(bool(c.get("stale")) for c in got)
            mark = f" (stale: {stale} of {len(got)} cells made by other code)" if stale else ""
            rows[-1]["stale_cells"] = stale
            lines.append(
                f"| distgan {variant}{mark} | {len(got)} | {got[0]['steps']} | {fmt(*modes)} | {fmt(*hq)} "
                f"| {fmt(*kl, digits=3)} |"
            )
            for key, label in (("drs", "DRS"), ("drs_cal", f"DRS, D calibrated {DRS_CALIBRATE} steps")):
                drs = [c[key] for c in got if key in c]
                if not drs:
                    continue
                modes, hq, kl = (mean_se([d[k] for d in drs]) for k in ("modes", "high_quality_pct", "reverse_kl"))
                rate = mean_se([100 * d["drs_accept_rate"] for d in drs])
                rows.append(
                    {
                        "dataset": dataset,
                        "variant": f"{variant} + {label}",
                        "seeds": len(drs),
                        "steps": got[0]["steps"],
                        "modes": modes,
                        "high_quality_pct": hq,
                        "reverse_kl": kl,
                    }
                )
                lines.append(
                    f"| distgan {variant} + {label} (accepts {fmt(*rate)}%) | {len(drs)} | "
                    f"{got[0]['steps']} | {fmt(*modes)} | {fmt(*hq)} | {fmt(*kl, digits=3)} |"
                )
        for (d, name), (m, h, k) in PUBLISHED.items():
            if d == dataset:
                lines.append(f"| {name} | | | {m} | {'' if h is None else h} | {'' if k is None else k} |")
    return rows, "\n".join(lines)


def scatter_png(done: list[dict]) -> Path | None:
    from PIL import Image, ImageDraw

    from distgan import images
    from distgan.data import builtin

    tiles = []
    for dataset in ("ring", "grid"):
        centres, _ = builtin.mixture_spec(dataset)
        for variant in [*VARIANTS, *(f"{v}+drs{c}" for v in DRS_VARIANTS for c in ("", "-cal"))]:
            found = sorted(CELLS.glob(f"{dataset}-{variant}-n*-s0.samples.json"))
            if not found:
                continue
            f = found[-1]
            import torch

            pts = torch.tensor(json.loads(f.read_text()))
            tile = Image.fromarray(images.scatter(pts, centres, size=260))
            ImageDraw.Draw(tile).text((6, 4), f"{dataset} {variant}", fill=(0, 0, 0))
            tiles.append((dataset, tile))
    if not tiles:
        return None
    per_row = max(sum(1 for d, _ in tiles if d == ds) for ds in ("ring", "grid"))
    canvas = Image.new("RGB", (260 * per_row, 260 * 2), "white")
    for r, ds in enumerate(("ring", "grid")):
        for c, (_, tile) in enumerate([t for t in tiles if t[0] == ds]):
            canvas.paste(tile, (260 * c, 260 * r))
    path = common.RESULTS / "mode_collapse-scatter.png"
    canvas.save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="start at this seed (split seeds over processes)")
    p.add_argument("--steps", type=int, default=5000, help="training steps per 2-D cell")
    p.add_argument("--datasets", nargs="*", default=["ring", "grid"], help="2-D mixtures (none: only stacked)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--stacked-steps", type=int, default=3000)
    p.add_argument("--stacked-seeds", type=int, default=2)
    p.add_argument(
        "--stacked-variants",
        nargs="+",
        choices=list(VARIANTS),
        help="stacked-digits variants (default: gan and the two best paper variants on the grid)",
    )
    p.add_argument("--no-stacked", action="store_true")
    p.add_argument(
        "--keep-stale",
        action="store_true",
        help="reuse cells made by other code or another config instead of recomputing them; the tables mark them stale",
    )
    p.add_argument("--budget-min", type=float, default=None, help="stop starting new cells after this many minutes")
    args = p.parse_args()
    start = time.time()

    def out_of_time() -> bool:
        return args.budget_min is not None and time.time() - start > 60 * args.budget_min

    for seed in range(args.first_seed, args.seeds):  # seeds outermost: a partial run still covers every variant
        for dataset in args.datasets:
            for variant in args.variants:
                if out_of_time():
                    break
                c = cell(dataset, variant, seed, args.steps, args.keep_stale)
                print(
                    f"{dataset:5s} {variant:10s} seed {seed}: modes {c['modes']:2d} "
                    f"hq {c['high_quality_pct']:5.1f}% kl {c['reverse_kl']:.3f} ({c['train_s']:.0f} s)",
                    flush=True,
                )
    done = load_cells()
    if not args.no_stacked and not out_of_time():
        grid = [c for c in done if c["dataset"] == "grid"]
        ranked = sorted(
            {c["variant"] for c in grid}, key=lambda v: -statistics.mean(c["modes"] for c in grid if c["variant"] == v)
        )
        # the DCGAN baseline and the best two variants that carry over to stacked-digits-dcgan as plain
        # overrides (not unrolled or wgan-gp: too slow here; not gan-r1, whose stacked preset
        # stacked-digits-r1 and stacked-digits-r3gan train 12 000 steps: ask for them with --stacked-variants)
        paper = [v for v in ranked if v not in ("gan", "unrolled", "wgan-gp", *PRESET)]
        for variant in args.stacked_variants or ["gan", *paper[:2]]:
            for seed in range(args.first_seed, args.stacked_seeds):
                if out_of_time():
                    break
                c = cell("stacked", variant, seed, args.stacked_steps, args.keep_stale)
                print(
                    f"stacked {variant:10s} seed {seed}: modes {c['stacked_modes']} kl {c['stacked_kl']:.3f}",
                    flush=True,
                )
        done = load_cells()
    rows, md = table(done)
    png = scatter_png(done)
    print(md)
    notes = (
        "Cells accumulate over runs of this script (each is in results/mode_collapse/cells/ with its steps, seed "
        "and training time), so the command above may be only the last of several. "
        "Each distgan row: mean ± standard error over seeds of `distgan eval --n 2500` on the final "
        "generator's EMA copy (modes captured: modes with at least one high-quality sample; high quality: within "
        "3 std of the nearest centre in every coordinate; reverse KL: high-quality samples' histogram over modes "
        "against uniform). The paper-setup rows use presets ring-gan / grid-gan (G 4x400 ReLU+BN, D 3x200 "
        "LeakyReLU, Adam 1e-4, batch 100, z 2-d, EMA 0.999) with each variant's overrides (see VARIANTS in the "
        "script). The gan-r1 rows use presets ring-gan-r1 / grid-gan-r1: the same G and batch, PacGAN's maxout "
        "D, R1 0.05, lr G 5e-4 / D 2e-3 decayed linearly over the second half, no EMA (ema_beta 0: the EMA copy "
        "is the live G); on stacked digits, preset stacked-digits-r1 (the DCGAN with R1 1, lr G 2e-4 / D 4e-4 "
        "decayed linearly over the second half). The r3gan rows (R3GAN's recipe: RpGAN + R1 + R2, no DRS) use "
        "grid-r3gan (the same MLPs, R1 and R2 0.05) and stacked-digits-r3gan (stacked-digits-r1 with R2 1 and the "
        "RpGAN loss). '+ DRS' rows: the same checkpoints through `distgan eval --drs` (discriminator "
        "rejection sampling with the run's D), with the share of draws kept; 'D calibrated' rows through "
        f"`distgan eval --drs --drs-calibrate {DRS_CALIBRATE}` (a copy of D first trained {DRS_CALIBRATE} more "
        "steps against the frozen final G, logistic loss, no R1, Adam 2e-4, weight average 0.999). Stacked digits: "
        f"stacked-digits-dcgan at 16x16; modes counted on {STACKED_N} samples, as VEEGAN and PacGAN count them, "
        "by classifying each channel with the digits MLP (held-out accuracy in the cells). Published rows are "
        "copied from the papers' tables, which trained longer and on 28x28 MNIST for the stacked rows, so they "
        "compare trends, not exact settings." + (f"\n\n![samples]({png.name})" if png else "") + "\n\n" + md
    )
    flat = [
        {k: (fmt(*v, digits=3 if k == "reverse_kl" else 1) if isinstance(v, tuple) else v) for k, v in r.items()}
        for r in rows
    ]
    common.write(
        "mode_collapse",
        flat,
        ["dataset", "variant", "seeds", "steps", "modes", "high_quality_pct", "reverse_kl", "stale_cells"],
        notes,
        extra={"cells": done},
    )


if __name__ == "__main__":
    main()
