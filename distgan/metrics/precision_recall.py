"""Improved precision and recall (Kynkaanniemi et al. 2019): each set's k-NN balls (k = 3) estimate
its manifold; precision is the share of generated features inside the real manifold, recall the
share of real features inside the generated one. float64, in batches.
"""

from __future__ import annotations

import numpy as np


def _sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
    return np.maximum(d, 0.0)


def _knn_radii(x: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row."""
    out = np.empty(len(x))
    for i in range(0, len(x), batch):
        d = _sq_distances(x[i : i + batch], x)
        out[i : i + batch] = np.partition(d, k, axis=1)[:, k]  # index 0 is the row itself (distance 0)
    return out


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int) -> np.ndarray:
    """For each point: within the radius of at least one centre."""
    out = np.empty(len(points), dtype=bool)
    for i in range(0, len(points), batch):
        out[i : i + batch] = (_sq_distances(points[i : i + batch], centres) <= radii[None, :]).any(1)
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN manifolds."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    precision = _inside(fake, real, _knn_radii(real, k, batch), batch).mean()
    recall = _inside(real, fake, _knn_radii(fake, k, batch), batch).mean()
    return float(precision), float(recall)
