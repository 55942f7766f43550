"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over 10 consecutive splits,
mean and std, from class probabilities or logits.
"""

from __future__ import annotations

import numpy as np


def inception_score(p_or_logits: np.ndarray, splits: int = 10, logits: bool = True) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive splits of exp(mean_x KL(p(y|x) || p(y))); from logits
    (softmax taken here) or, with logits=False, from class probabilities."""
    x = np.asarray(p_or_logits, dtype=np.float64)
    if logits:
        e = np.exp(x - x.max(1, keepdims=True))
        x = e / e.sum(1, keepdims=True)
    n = len(x)
    if n < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} samples; got {n}")
    scores = []
    for i in range(splits):
        part = x[i * n // splits : (i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
