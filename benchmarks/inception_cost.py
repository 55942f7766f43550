"""What the standard metrics cost here: Inception-v3 images/s (the network of distgan.metrics.inception,
pytorch-fid's architecture; cost does not depend on the weights, so random ones are used), and the
time of each score on 2048-d features at fid50k sizes.

    python benchmarks/inception_cost.py [--images 100] [--batch 50]

The fid50k row extrapolates from the measured rate. That is arithmetic, not a measurement: the
table says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from distgan.metrics import fid, inception, kid, standard  # noqa: E402
from distgan.metrics.inception_score import inception_score  # noqa: E402
from distgan.metrics.precision_recall import precision_recall  # noqa: E402


def network_rate(device: str, images: int, batch: int, size: int) -> float:
    net = inception.FIDInception3().to(device).eval()
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    with torch.no_grad():
        net(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start, done = time.perf_counter(), 0
        while done < images:
            net(x)
            done += batch
        if device == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100, help="images through the network per row")
    p.add_argument("--batch", type=int, default=50)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    rates = {}
    for size in (32, 64, 256):  # generator outputs, resized to 299 inside
        rate = network_rate(device, args.images, args.batch, size)
        rates[size] = rate
        rows.append(
            {
                "what": f"Inception-v3 features, {size}px input",
                "n": args.images,
                "images_per_s": rate,
                "seconds": args.images / rate,
            }
        )
        print(rows[-1], flush=True)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50_000, 2048)).astype(np.float32)
    b = rng.standard_normal((50_000, 2048)).astype(np.float32) + 0.1
    ref = standard.RefStats.of(b, {})
    rows.append(
        {
            "what": "moments (mean, covariance) of 50k features",
            "n": 50_000,
            "seconds": timed(lambda: fid.moments(a.astype(np.float64))),
        }
    )
    mu, sigma = fid.moments(a.astype(np.float64))
    rows.append(
        {
            "what": "FID (2048-d, two symmetric eigen-decompositions)",
            "n": 50_000,
            "seconds": timed(lambda: fid.frechet_distance(mu, sigma, ref.mu, ref.sigma)),
        }
    )
    rows.append(
        {"what": "KID, 100 subsets of 1000", "n": 50_000, "seconds": timed(lambda: kid.kid_subsets(a, b, 100, 1000))}
    )
    rows.append(
        {
            "what": "precision/recall, k=3",
            "n": standard.PR_MAX,
            "seconds": timed(lambda: precision_recall(b[: standard.PR_MAX], a[: standard.PR_MAX])),
        }
    )
    rows.append(
        {
            "what": "IS, 10 splits",
            "n": 50_000,
            "seconds": timed(lambda: inception_score(rng.standard_normal((50_000, 1008)))),
        }
    )
    for r in rows[:3]:
        print(r)
    scoring = sum(r["seconds"] for r in rows[3:])
    rows.append(
        {
            "what": "fid50k at 64px: 50 000 images / measured rate + the scores (extrapolated, not run)",
            "n": 50_000,
            "seconds": 50_000 / rates[64] + scoring,
        }
    )
    common.write(
        "inception_cost",
        rows,
        ["what", "n", "images_per_s", "seconds"],
        f"Device {device}, {torch.get_num_threads()} torch threads, batch {args.batch}. The network rows push "
        f"{args.images} images through pytorch-fid's architecture (random weights: the cost is the same). "
        "The score rows time distgan.metrics.fid, kid, inception_score and precision_recall on random 2048-d features. The last row is arithmetic "
        "from the rows above, not a run. It excludes the generator and the reference set's features, "
        "which cost one more network pass per real image when they are not cached.",
    )


if __name__ == "__main__":
    main()
