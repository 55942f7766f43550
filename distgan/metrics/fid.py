"""FID, KID, Inception Score and improved precision/recall, on any feature set (float64 throughout).

- FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to two feature sets,
  |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); the trace of the square root from a symmetric
  eigen-decomposition (`frechet_distance` says why that equals pytorch-fid's sqrtm).
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets (100 of at most 1000 each, as
  stylegan2-ada-pytorch and torch-fidelity do).
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over 10 consecutive splits, mean and std.
- Precision and recall (Kynkaenniemi et al. 2019): each set's k-NN balls (k = 3) estimate its
  manifold; precision is the share of generated features inside the real manifold, recall the share
  of real features inside the generated one.

Features for the 16x16-style digits come from `DigitFeatures`: a one-hidden-layer MLP (128 ReLU
units) trained once on the real digits at the model's resolution and cached as plain arrays
($DISTGAN_CACHE/eval/), its held-out accuracy reported. The standard Inception-v3 features come
from distgan.metrics.inception (a local weights file); `distgan eval --features FILE` takes any
other TorchScript feature network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    pytorch-fid takes tr(scipy.linalg.sqrtm(S1 S2)) (with an eps offset when the product is singular,
    and the real part of a complex result). For covariances (symmetric, PSD) that trace equals
    tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the sum of the square roots of the eigenvalues of a symmetric
    PSD matrix, which two symmetric eigen-decompositions give. Eigenvalues below 0 are roundoff and
    count as 0, so no complex result arises. On 2048-d Inception covariances this takes ~3 s here
    where sqrtm takes ~25 s, and the two traces agree to 1e-14 relative for full-rank covariances
    (and 1e-6 for rank-deficient ones, where sqrtm itself is ill-conditioned)."""
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature statistics of different sizes: {mu1.shape} and {mu2.shape}")
    w, u = np.linalg.eigh((s1 + s1.T) / 2)
    root = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    m = root @ s2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def moments(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of a feature set (N, D), float64, the covariance with N - 1 (as np.cov)."""
    a = np.asarray(a, dtype=np.float64)
    return a.mean(0), np.cov(a, rowvar=False)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N, D)."""
    return frechet_distance(*moments(a), *moments(b))


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
        from sklearn.neural_network import MLPClassifier

        from distgan.metrics.digits import split

        x_tr, x_te, y_tr, y_te = split(resolution, seed)
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed).fit(x_tr, y_tr)
        from distgan import files

        arrays = dict(w1=clf.coefs_[0], b1=clf.intercepts_[0], w2=clf.coefs_[1], b2=clf.intercepts_[1],
                      test_accuracy=clf.score(x_te, y_te))  # fmt: skip
        files.write_atomic(path, lambda fh: np.savez(fh, **arrays))

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
