"""Image grids for sample previews."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distgan.data.shards import IMAGE_SUFFIXES  # noqa: F401  (re-exported for the CLI)


def load_image(path: str | Path, channels: int) -> torch.Tensor:
    """An image file as a (1, C, H, W) float tensor in [-1, 1] (grayscale or RGB as asked)."""
    from distgan.errors import UserError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except Exception as exc:
        raise UserError(f"image '{path}' cannot be decoded: {exc}") from None
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(
    images: torch.Tensor, nrow: int | None = None, pad: int = 1, min_width: int = 320, scale: int | None = None
) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (H', W', C) uint8 image, upscaled (nearest)
    by an integer factor so that tiny images (8x8, 16x16) stay visible: `scale`, or the smallest
    that makes the grid at least `min_width` pixels wide."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = x[i]
    scale = scale or max(1, -(-min_width // grid.shape[1]))  # ceil
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write atomically, so a viewer never sees half a file."""
    from distgan import files

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    files.write_atomic(path, lambda fh: img.save(fh, format="PNG"))


def scatter(points: torch.Tensor, centres=None, size: int = 400) -> np.ndarray:
    """2-D samples (N, 2) as an (size, size, 3) uint8 scatter plot: blue dots, with the true
    centres (K, 2) as red rings when given. The view covers the centres (or the points) plus a margin."""
    from PIL import Image, ImageDraw

    p = points.detach().float().cpu().numpy()[:, :2]
    ref = np.asarray(centres, dtype=np.float64) if centres is not None else p
    finite = ref[np.isfinite(ref).all(1)]
    half = float(np.abs(finite).max()) * 1.25 + 1e-3 if len(finite) else 1.0
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def px(xy):
        return (xy[..., 0] + half) / (2 * half) * (size - 1), (half - xy[..., 1]) / (2 * half) * (size - 1)

    draw.line([(0, size // 2), (size, size // 2)], fill=(225, 225, 225))
    draw.line([(size // 2, 0), (size // 2, size)], fill=(225, 225, 225))
    xs, ys = px(p[np.isfinite(p).all(1)])
    for x, y in zip(xs, ys):
        draw.point((float(x), float(y)), fill=(30, 80, 200))
    if centres is not None:
        cx, cy = px(ref)
        for x, y in zip(cx, cy):
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), outline=(220, 30, 30), width=2)
    return np.asarray(img)


def render(samples: torch.Tensor, centres=None) -> np.ndarray:
    """A picture of a batch of samples: a grid of images, or a scatter plot of 2-D points."""
    return scatter(samples, centres) if samples.ndim == 2 else make_grid(samples)
