"""Embedded real datasets that ship inside PyPI packages, as uint8 arrays.

Every loader returns `(images, labels, class_names)` with images of shape (N, H, W, C), uint8.
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


BUILTINS = {"digits": digits, "faces": faces}


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from distgan.errors import UserError

    if name not in BUILTINS:
        raise UserError(f"unknown builtin dataset '{name}'; available: {', '.join(sorted(BUILTINS))}")
    return BUILTINS[name]()
