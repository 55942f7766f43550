"""Every image mode PIL opens, brought to grayscale (L) or RGB with its full range mapped to 0-255.

PIL's own `convert("L")` clips wider modes instead of scaling them: a 16-bit PNG (mode I;16)
becomes almost all white. Here:

- I;16, I;16L, I;16B, I;16N (16-bit unsigned): 0..65535 -> 0..255;
- I (32-bit signed): its full range -2^31..2^31-1 -> 0..255, except in a PNG, whose integer
  samples have at most 16 bits (older Pillow opens 16-bit PNGs as I): 0..65535 -> 0..255;
- F (32-bit float): 0..1 -> 0..255 (the convention of float images), clipped; NaN -> 0;
- LAB: CIE L*a*b* to sRGB through PIL's colour management (ImageCms);
- La, RGBa (premultiplied alpha): un-premultiplied first;
- every other mode (1, L, LA, P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, HSV): PIL's conversion, which
  maps their full range already; alpha is dropped.

Both the training stream and `distgan shards` use `convert`, so shards and stream agree.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# The defaults of data.max_member_bytes and data.max_image_pixels (config.py says why).
MAX_MEMBER_BYTES = 64_000_000
MAX_IMAGE_PIXELS = 50_000_000


def _scaled(values: np.ndarray, lo: float, hi: float) -> Image.Image:
    """An L image of `values` mapped linearly from [lo, hi] to [0, 255], rounded, clipped."""
    x = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L")


def _wide_to_l(img: Image.Image) -> Image.Image | None:
    """An L image of a 16/32-bit integer or float image (their full range), else None."""
    if img.mode in SIXTEEN_BIT or img.mode == "I" and img.format == "PNG":
        return _scaled(np.asarray(img), 0.0, 65535.0)
    if img.mode == "I":
        return _scaled(np.asarray(img), -(2.0**31), 2.0**31 - 1)
    if img.mode == "F":
        return _scaled(np.asarray(img), 0.0, 1.0)
    return None


def convert(img: Image.Image, mode: str) -> Image.Image:
    """`img` as `mode` ("L" or "RGB"), its full range mapped to 0..255."""
    if img.mode == mode:
        return img
    wide = _wide_to_l(img)
    if wide is not None:
        return wide if mode == "L" else wide.convert("RGB")
    if img.mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        img = ImageCms.applyTransform(img, transform)
        return img if mode == "RGB" else img.convert(mode)
    if img.mode in ("La", "RGBa"):
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    return img.convert(mode)
