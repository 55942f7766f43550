"""FID and KID, in the feature space of a digits classifier (or of a user's feature network).

- Frechet distance (Heusel et al. 2017) between Gaussians fitted to two feature sets:
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets.

Features for the 16x16-style digits come from `DigitFeatures`: a one-hidden-layer MLP (128 ReLU
units) trained once on the real digits at the model's resolution and cached as plain arrays
($DISTGAN_CACHE/eval/), its held-out accuracy reported. Inception-based FID needs the standard
Inception weights, which cannot be downloaded here: `distgan eval --features FILE` takes any
TorchScript feature network (e.g. an Inception exported with torch.jit.save) instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def frechet_distance(mu1, s1, mu2, s2) -> float:
    from scipy import linalg

    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, s1, s2))
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: nudge, as the reference FID code does
        eps = 1e-6 * np.eye(len(s1))
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N, D)."""
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 10, size: int = 1000, seed: int = 0) -> float:
    """Mean unbiased MMD^2 (cubic polynomial kernel) over `subsets` random subsets of `size`."""
    rng = np.random.default_rng(seed)
    m = min(size, len(a), len(b))
    d = a.shape[1]
    total = 0.0
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)].astype(np.float64)
        y = b[rng.choice(len(b), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        total += (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    return float(total / subsets)


class DigitFeatures:
    """A small MLP classifier of the real digits at one resolution; its hidden layer is the feature space."""

    def __init__(self, resolution: int, seed: int = 0):
        from distgan.data.shards import cache_root

        path = cache_root() / "eval" / f"digits-mlp-r{resolution}-s{seed}.npz"
        if not path.is_file():
            self._train(resolution, seed, path)
        z = np.load(path)
        self.w1, self.b1, self.w2, self.b2 = z["w1"], z["b1"], z["w2"], z["b2"]
        self.test_accuracy = float(z["test_accuracy"])
        self.resolution = resolution

    @staticmethod
    def _train(resolution: int, seed: int, path: Path) -> None:
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        from distgan.metrics.digits import real_digits

        x, y = real_digits(resolution)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed).fit(x_tr, y_tr)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, w1=clf.coefs_[0], b1=clf.intercepts_[0], w2=clf.coefs_[1], b2=clf.intercepts_[1],
                 test_accuracy=clf.score(x_te, y_te))  # fmt: skip
        tmp.replace(path)

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, 1, R, R) in [-1, 1] -> (N, 128)."""
        x = images.float().clamp(-1, 1).reshape(len(images), -1).numpy().astype(np.float64)
        return np.maximum(x @ self.w1 + self.b1, 0.0)

    def probs(self, images: torch.Tensor) -> np.ndarray:
        logits = self.features(images) @ self.w2 + self.b2
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def torchscript_features(path: str, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Features from a user's TorchScript network: images (N, C, H, W) in [-1, 1] -> (N, D)."""
    from distgan.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"feature network '{path}' does not exist")
    try:
        net = torch.jit.load(path, map_location="cpu").eval()
    except Exception as exc:
        raise UserError(f"'{path}' is not a TorchScript file (save one with torch.jit.save): {exc}") from None
    with torch.no_grad():
        out = [net(images[i : i + batch].float()).flatten(1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy().astype(np.float64)
