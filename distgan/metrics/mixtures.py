"""Mode-collapse metrics on the 2-D mixtures, as PacGAN (Lin et al. 2018, Table 1) and VEEGAN define them.

For samples x_i and the true centres c_k with standard deviation s:
- a sample is *high quality* when it lies within 3 s of its nearest centre in every coordinate;
- a mode is *captured* when at least one high-quality sample is nearest to it;
- *reverse KL* is KL(p || u) between p, the share of high-quality samples at each mode, and the
  uniform distribution u over the K modes: sum_k p_k log(p_k K) (0 log 0 = 0; K log K... if no
  sample is high quality, reported as inf).
"""

from __future__ import annotations

import numpy as np


def mode_metrics(points: np.ndarray, centres, std: float) -> dict:
    x = np.asarray(points, dtype=np.float64)[:, :2]
    c = np.asarray(centres, dtype=np.float64)
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    ok = np.isfinite(x).all(1)
    high = ok & (np.abs(x - c[nearest]) <= 3 * std).all(1)
    counts = np.bincount(nearest[high], minlength=len(c))
    total = counts.sum()
    if total:
        p = counts / total
        kl = float(np.sum(p[p > 0] * np.log(p[p > 0] * len(c))))
    else:
        kl = float("inf")
    return {
        "modes": int((counts > 0).sum()),
        "modes_total": len(c),
        "high_quality_pct": 100.0 * float(high.mean()),
        "reverse_kl": kl,
        "samples": len(x),
    }
