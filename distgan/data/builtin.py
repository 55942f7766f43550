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
# Latent sets (distgan/data/latents.py): (the image set, the image size encoded, the VAE)
LATENT_BUILTINS = {"digits-latents": ("digits", 32, "builtin:tiny-vae")}
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
        raise UserError(f"unknown builtin dataset '{name}'; available: {', '.join(names())}")
    return BUILTINS[name]()


def names() -> list[str]:
    return sorted([*BUILTINS, *IMAGE2IMAGE, *LATENT_BUILTINS])


# --- image-to-image sets: (train, held-out) pairs of sample arrays -------------------------------
# Photos shipped in scikit-image. Each is split in two by a vertical cut at 75% of its width:
# training patches lie entirely left of the cut, held-out patches (PSNR/SSIM) entirely right of it,
# so no held-out pixel is ever seen in training, while both sides show the same kinds of scene.
PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "motorcycle")
HELDOUT_FRACTION = 0.25


def _photo(name: str) -> np.ndarray:
    from skimage import data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


def _patches(n: int, size: int, seed: int, heldout: bool) -> np.ndarray:
    """n random size x size RGB patches, uniformly over the photos, randomly mirrored; from the
    training part (left of each photo's cut) or the held-out part (right of it)."""
    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        img = _photo(name)
        cut = int(img.shape[1] * (1 - HELDOUT_FRACTION))
        photos.append(img[:, cut:] if heldout else img[:, :cut])
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        top, left = rng.integers(img.shape[0] - size + 1), rng.integers(img.shape[1] - size + 1)
        patch = img[top : top + size, left : left + size]
        out[i] = patch[:, ::-1] if rng.random() < 0.5 else patch
    return out


def edges(photos: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """The edge maps pix2pix learns from: Canny (skimage.feature.canny, sigma=1.5, default
    hysteresis thresholds) on the grayscale patch, drawn as black lines on white, 1 channel."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    out = np.empty((*photos.shape[:3], 1), np.uint8)
    for i, p in enumerate(photos):
        out[i, ..., 0] = np.where(canny(rgb2gray(p), sigma=sigma), 0, 255)
    return out


def edges2photos(n: int = 4000, n_heldout: int = 200, size: int = 64):
    """Paired edges -> photo: 64x64 photo patches and their Canny edge maps (held out: patches
    right of each photo's cut)."""
    train, held = _patches(n, size, 0, heldout=False), _patches(n_heldout, size, 1, heldout=True)
    return {"input": edges(train), "target": train}, {"input": edges(held), "target": held}


def photos_hr(n: int = 4000, n_heldout: int = 200, size: int = 96):
    """High-resolution 96x96 photo patches for super-resolution (LR is made while training; held
    out: patches right of each photo's cut)."""
    return _patches(n, size, 2, heldout=False), _patches(n_heldout, size, 3, heldout=True)


def _digits_32(x: np.ndarray) -> np.ndarray:
    """8x8 digits upscaled to 32x32 (bicubic), (N, 32, 32, 1) uint8."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(a[..., 0]).resize((32, 32), Image.BICUBIC)) for a in x])[..., None]


def digits_domain(thick: bool):
    """CycleGAN's two unpaired domains from the real digits, upscaled to 32x32: "thin" (as
    written) and "thick" (grey-level dilation with a disk of radius 2, skimage.morphology.dilation).
    The digits are split in two disjoint halves (even / odd index), one per domain, so no digit
    appears in both: the domains are unpaired. The last 10% of each half is held out."""
    from skimage.morphology import dilation, disk

    x, y, _ = digits()
    half = x[1::2] if thick else x[0::2]
    img = _digits_32(half)
    if thick:
        img = np.stack([dilation(a[..., 0], disk(2)) for a in img])[..., None]
    cut = int(len(img) * 0.9)
    return img[:cut], img[cut:]


IMAGE2IMAGE = {
    "edges2photos": edges2photos,
    "photos-hr": photos_hr,
    "digits-thin": lambda: digits_domain(False),
    "digits-thick": lambda: digits_domain(True),
}
