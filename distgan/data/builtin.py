"""Embedded datasets: real images that ship inside PyPI packages, and the 2-D mixtures of the
mode-collapse literature.

Every loader returns `(samples, labels, class_names)`: images of shape (N, H, W, C) uint8, or for
the mixtures points of shape (N, 2) float32 with their mode as the label.
"""

from __future__ import annotations

import numpy as np


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's `load_digits`: 1797 real 8x8 handwritten digits (values 0..16), 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64), [str(i) for i in range(10)]


def faces() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-image's `lfw_subset`: 200 real 25x25 grayscale crops, 100 faces then 100 non-faces."""
    from skimage.data import lfw_subset

    x = lfw_subset()
    images = np.round(x * 255.0).astype(np.uint8)[..., None]
    labels = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return images, labels, ["face", "non-face"]


def stacked_digits(n: int = 60_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stacked digits (the Stacked MNIST of VEEGAN/PacGAN, on sklearn's real 8x8 digits): three
    digits drawn independently and uniformly, stacked as the R, G and B channels; the label
    100 a + 10 b + c is one of 1000 modes."""
    x, y, _ = digits()
    rng = np.random.default_rng(seed)
    idx = rng.integers(len(x), size=(n, 3))
    images = np.concatenate([x[idx[:, c]] for c in range(3)], axis=-1)
    labels = y[idx[:, 0]] * 100 + y[idx[:, 1]] * 10 + y[idx[:, 2]]
    return images, labels.astype(np.int64), [f"{i:03d}" for i in range(1000)]


def mixture_spec(name: str) -> tuple[np.ndarray, float]:
    """(centres (K, 2), std) of PacGAN's 2-D mixtures (Lin et al. 2018, after VEEGAN's):
    ring: 8 centres (cos 2 pi k/8, sin 2 pi k/8), std 0.01; grid: 25 centres {-4,-2,0,2,4}^2, std 0.05."""
    if name == "ring":
        k = np.arange(8)
        return np.stack([np.cos(2 * np.pi * k / 8), np.sin(2 * np.pi * k / 8)], 1), 0.01
    if name == "grid":
        g = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
        return np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2), 0.05
    raise ValueError(name)


def mixture(name: str, n: int = 100_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n points of mixture `name`, modes drawn uniformly."""
    centres, std = mixture_spec(name)
    rng = np.random.default_rng(seed)
    mode = rng.integers(len(centres), size=n)
    x = centres[mode] + std * rng.standard_normal((n, 2))
    return x.astype(np.float32), mode.astype(np.int64), [f"mode {i}" for i in range(len(centres))]


MIXTURES = ("ring", "grid")
BUILTINS = {
    "digits": digits,
    "faces": faces,
    "stacked-digits": stacked_digits,
    "ring": lambda: mixture("ring"),
    "grid": lambda: mixture("grid"),
}


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from distgan.errors import UserError

    if name not in BUILTINS:
        raise UserError(f"unknown builtin dataset '{name}'; available: {', '.join(sorted(BUILTINS))}")
    return BUILTINS[name]()
