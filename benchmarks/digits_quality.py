"""Does `make demo` learn recognisable digits of all ten classes, and how fast?

Trains the given preset (default: digits-cgan, the preset of `make demo`) with `distgan train`, draws 1000 samples
from the EMA generator with `distgan sample` (a class-conditional model: `--class all`, 100 of
each class), and judges them with a classifier trained on the real digits
(distgan/metrics/digits.py). Held-out real digits give the reference row. For a conditional model
it also reports how many samples the classifier gives confidently to the class they were drawn for.

FID in the digits features (the hidden layer of distgan.metrics.digits.DigitFeatures, the feature space of
`distgan eval`): the held-out quarter of the real digits (the classifier's test split, 450) against the
other three quarters (the "training digits", 1347) is the reference; generated samples are measured against
the same 1347 in disjoint subsets of the same size as the held-out set (stratified by class for a
conditional model, as the held-out split is), so both FIDs carry the same small-sample bias. The generator
trained on all 1797 digits, held-out ones included.

    python benchmarks/digits_quality.py [--preset digits-cgan] [--run EXISTING_RUN_DIR] [--name NAME] [--standing-stats BATCHES] [key=value ...]
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

from distgan import checkpoint  # noqa: E402
from distgan import images as images_module  # noqa: E402
from distgan.metrics import digits  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits-cgan", help="default: the preset of `make demo`")
    p.add_argument("--run", help="judge this run's latest checkpoint (or this step folder) instead of training one")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--name", default="digits_quality", help="results/<name>-<machine>.{json,md} (to keep several)")
    p.add_argument("--about", default="", help="with --run: how that run was trained, for the notes")
    p.add_argument(
        "--standing-stats",
        type=int,
        default=0,
        metavar="BATCHES",
        help="sample with `distgan sample --standing-stats BATCHES` (BigGAN's standing statistics)",
    )
    p.add_argument(
        "--live", action="store_true", help="judge the trained G instead of its EMA (`distgan sample --live`)"
    )
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
        folder, meta = checkpoint.read_meta(run)
        classes = meta["config"]["model"]["num_classes"]
        per_class = ["--class", "all", "--n", str(args.n // classes)] if classes else ["--n", str(args.n)]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "distgan",
                "sample",
                "--ckpt",
                run,
                *per_class,
                "--out",
                f"{tmp}/s.npy",
                "--standing-stats",
                str(args.standing_stats),
                *(["--live"] if args.live else []),
            ],
            check=True,
        )
        images = torch.from_numpy(np.load(f"{tmp}/s.npy"))
        grid = common.RESULTS / f"{args.name}-{common.machine_tag()}.png"  # 100 of the judged samples, 4x larger
        order = torch.arange(100) if not classes else torch.arange(10)[:, None] * (args.n // 10) + torch.arange(10)
        images_module.save_png(grid, images_module.make_grid(images[order.flatten()], nrow=10, scale=4))
        result = digits.evaluate(images)
        result["fid"] = digit_fids(images, classes, args.n)
        if classes:  # `--class all` draws the classes in order, n // classes each
            wanted = np.arange(classes).repeat(args.n // classes)
            probs = digits.fit_classifier(images.shape[-1])[0].predict_proba(digits.to_features(images))
            result["generated"]["requested_class"] = float(((probs.argmax(1) == wanted) & (probs.max(1) >= 0.9)).mean())
    rows = []
    for name, r in (
        (f"generated ({'trained' if args.live else 'EMA'} G)", result["generated"]),
        ("real held-out", result["real_heldout"]),
    ):
        rows.append(
            {
                "images": name,
                "n": r["n"],
                "confident (p>=0.9)": r["confident_fraction"],
                "mean max p": r["mean_max_prob"],
                "classes covered": r["classes_covered"],
                "smallest class share": r["min_class_fraction"],
                "class histogram": r["class_histogram"],
                "confidently the requested class": r.get("requested_class", "n/a"),
            }
        )
    fids = result["fid"]
    for row, value, prec, rec in zip(
        rows,
        (fids["generated_mean"], fids["real_heldout"]),
        (fids["precision"], fids["real_precision"]),
        (fids["recall"], fids["real_recall"]),
    ):
        row["digits FID vs training digits"] = value
        row["precision / recall (k=3)"] = f"{prec:.3f} / {rec:.3f}"
    accuracy = result["real_heldout"]["accuracy"]
    wall = f"{seconds:.0f} s" if seconds else "n/a (existing run)"
    source = (
        f"Run {args.run} ({args.about or 'no description'})"
        if args.run
        else f"Preset {args.preset} {' '.join(args.overrides)}".rstrip()
    )
    notes = (
        f"{source}; checkpoint {folder.name}; training wall time {wall}; "
        f"{f'standing statistics from {args.standing_stats} batches of 64' if args.standing_stats else 'BN statistics as trained'}. Classifier: logistic regression on the real digits "
        f"resized to the training resolution, held-out accuracy {accuracy:.3f}. Histograms count confident predictions only. "
        f"Digits FID: {len(fids['generated'])} disjoint subsets of {fids['subset']} generated images "
        f"({', '.join(f'{v:.2f}' for v in fids['generated'])}; mean in the table, standard error "
        f"{fids['generated_se']:.2f}) and the {fids['subset']} held-out real "
        f"digits, each against the {fids['training_digits']} training digits; ratio generated/real "
        f"{fids['generated_mean'] / fids['real_heldout']:.2f}. Precision / recall: Kynkaenniemi et al. (2019), k=3, in the "
        f"same features and subsets against the training digits (mean over subsets): precision, how many samples lie "
        f"on the real manifold; recall, how much of it the samples cover."
    )
    common.write(
        args.name,
        rows,
        list(rows[0]),
        notes,
        extra={"train_seconds": seconds, "classifier_accuracy": accuracy, "fid": fids},
    )


def digit_fids(images: torch.Tensor, classes: int, n: int) -> dict:
    """Digits-feature FID of held-out real digits and of same-sized subsets of `images`, all against
    the training digits (see the module docstring)."""
    from distgan.metrics.digits import DigitFeatures
    from distgan.metrics.fid import fid
    from distgan.metrics.precision_recall import precision_recall

    r = images.shape[-1]
    x_train, x_test, _, y_test = digits.split(r)
    net = DigitFeatures(r)
    train_feats = net.features(torch.from_numpy(x_train).view(-1, 1, r, r))
    test_feats = net.features(torch.from_numpy(x_test).view(-1, 1, r, r))
    real = fid(test_feats, train_feats)
    size = len(x_test)
    if classes:  # `--class all`: n // classes of each class in order; take the held-out split's class counts
        per = n // classes
        counts = np.bincount(y_test, minlength=classes)
        subsets = []
        for k in range(per // counts.max()):
            subsets.append(np.concatenate([c * per + k * counts.max() + np.arange(counts[c]) for c in range(classes)]))
    else:
        subsets = [np.arange(k * size, (k + 1) * size) for k in range(len(images) // size)]
    if not subsets:
        raise SystemExit(f"--n {n} is too few for an FID subset of {size}")
    feats = [net.features(images[idx]) for idx in subsets]
    gen = [fid(f, train_feats) for f in feats]
    # Precision and recall (Kynkaenniemi et al. 2019, k=3) in the same features and subsets: which half of FID is it?
    pr = np.array([precision_recall(train_feats, f) for f in feats])
    real_pr = precision_recall(train_feats, test_feats)
    se = float(np.std(gen, ddof=1) / np.sqrt(len(gen))) if len(gen) > 1 else float("nan")
    return {
        "real_heldout": real,
        "generated": gen,
        "generated_mean": float(np.mean(gen)),
        "generated_se": se,
        "subset": size,
        "training_digits": len(x_train),
        "precision": float(pr[:, 0].mean()),
        "recall": float(pr[:, 1].mean()),
        "real_precision": real_pr[0],
        "real_recall": real_pr[1],
    }


if __name__ == "__main__":
    main()
