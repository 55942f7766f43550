"""KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets (100 of at most 1000 each, as
stylegan2-ada-pytorch and torch-fidelity do), in float64.
"""

from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray, y: np.ndarray, d: int) -> np.ndarray:
    t = x @ y.T / d + 1
    return t * t * t  # (a float power is several times slower)


def kid_subsets(a: np.ndarray, b: np.ndarray, subsets: int = 100, size: int = 1000, seed: int = 0) -> np.ndarray:
    """The unbiased MMD^2 (cubic polynomial kernel) of `subsets` random subsets of min(size, N) of each."""
    rng = np.random.default_rng(seed)
    m = min(size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = a.shape[1]
    out = np.empty(subsets)
    for i in range(subsets):
        x = np.asarray(a[rng.choice(len(a), m, replace=False)], dtype=np.float64)
        y = np.asarray(b[rng.choice(len(b), m, replace=False)], dtype=np.float64)
        kxx, kyy, kxy = (_cubic(x, x, d), _cubic(y, y, d), _cubic(x, y, d))
        out[i] = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    return out


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, size: int = 1000, seed: int = 0) -> float:
    """Mean unbiased MMD^2 over the subsets of `kid_subsets`."""
    return float(kid_subsets(a, b, subsets, size, seed).mean())
