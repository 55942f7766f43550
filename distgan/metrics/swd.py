"""Sliced Wasserstein distance on Laplacian-pyramid patches (SWD; Karras et al. 2018, "Progressive
Growing of GANs", Sec. 5 and App. D): a distribution distance between two image sets that needs no
pretrained network.

Why it is here: an FID is only as good as its feature network, and the standard one (Inception-v3)
cannot be had on every machine (see docs/evaluation.md). SWD compares the images' local structure
at several scales directly: at each level of a Laplacian pyramid (full resolution down to 16x16),
each image gives `per_image` random 7x7 neighbourhoods (7*7*C values each); each set's descriptors
are normalised by their own per-channel mean and standard deviation; the distance between the two
sets of descriptors is the sliced Wasserstein distance, the mean over `repeats` x `directions`
random unit directions of the 1-D Wasserstein-1 distance of the projections (for sets of the same
size: the mean absolute difference of the sorted projections). As in the paper the figures are x1e3,
per level and averaged; lower is better. The highest-resolution levels measure fine detail and the
16x16 level the overall colour and layout.

Everything random (positions, directions) comes from `seed`, so a figure is reproducible.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from distgan.errors import UserError

NHOOD = 7  # neighbourhood side
MIN_RES = 16  # the pyramid stops at this resolution (or at the image's own, if smaller)
MAX_IMAGES = 8192  # images per set (the paper: 16384); a 64 px RGB level's descriptors are then ~0.6 GB

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The 5x5 binomial (Gaussian) filter, per channel, with mirrored borders."""
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :] * gain).to(x)
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, gain=4.0)


def laplacian_pyramid(x: torch.Tensor, min_res: int = MIN_RES) -> list[torch.Tensor]:
    """[band-pass levels from the full resolution down ..., the low-pass image at min_res]: summing
    each level upsampled back (pyr_up) rebuilds x exactly."""
    levels, g = [], x
    while g.shape[-1] > min_res and g.shape[-1] % 2 == 0 and g.shape[-2] % 2 == 0:
        low = pyr_down(g)
        levels.append(g - pyr_up(low))
        g = low
    return [*levels, g]


def descriptors(level: torch.Tensor, per_image: int, gen: torch.Generator) -> torch.Tensor:
    """per_image random NHOOD x NHOOD neighbourhoods of each image, normalised per channel over the
    set (mean 0, std 1), flattened: (N * per_image, C * NHOOD**2)."""
    n, c, h, w = level.shape
    if h < NHOOD or w < NHOOD:
        raise UserError(f"SWD needs images of at least {NHOOD}x{NHOOD}; got {h}x{w}")
    top = torch.randint(h - NHOOD + 1, (n, per_image), generator=gen)
    left = torch.randint(w - NHOOD + 1, (n, per_image), generator=gen)
    offs = torch.arange(NHOOD)
    rows = (top[..., None] + offs)[..., :, None]  # (n, per, 7, 1)
    cols = (left[..., None] + offs)[..., None, :]  # (n, per, 1, 7)
    img = torch.arange(n)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[img, rows, cols]  # (n, per, 7, 7, C)
    patches = patches.reshape(-1, NHOOD * NHOOD, c)
    mean = patches.mean(dim=(0, 1))
    std = patches.std(dim=(0, 1)).clamp_min(1e-8)
    return ((patches - mean) / std).permute(0, 2, 1).reshape(len(patches), -1)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, gen: torch.Generator, repeats: int = 4, directions: int = 128
) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projections of
    the rows of a and of b (two sets of the same size)."""
    if a.shape != b.shape:
        raise ValueError(
            f"sliced_wasserstein needs two sets of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    total = 0.0
    for _ in range(repeats):
        d = torch.randn(a.shape[1], directions, generator=gen, dtype=torch.float64).to(a)
        d = d / d.norm(dim=0, keepdim=True)
        # numpy's vectorised sort is ~15x faster than torch.sort here (measured on this CPU)
        pa, pb = (np.sort((s @ d).T.contiguous().numpy(), axis=1) for s in (a, b))
        total += float(np.abs(pa - pb).mean(dtype=np.float64))
    return total / repeats


def swd(x: torch.Tensor, y: torch.Tensor, *, per_image: int = 128, seed: int = 0, batch: int = 256) -> dict:
    """SWD x1e3 between image sets x and y ((N, C, H, W), any range: descriptors are normalised),
    per pyramid level ("swd_levels", keyed by resolution) and their mean ("swd"). Both sets are cut to
    the smaller one's size (at most MAX_IMAGES; "swd_images"), so both give the same number of
    descriptors."""
    if x.ndim != 4 or y.ndim != 4 or x.shape[1:] != y.shape[1:]:
        raise UserError(f"SWD compares two image sets of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    n = min(len(x), len(y), MAX_IMAGES)
    x, y = x[:n].detach().cpu(), y[:n].detach().cpu()
    if n < 2:
        raise UserError(f"SWD needs at least 2 images in each set; got {len(x)} and {len(y)}")
    gen = torch.Generator().manual_seed(seed)
    x_levels, y_levels = (
        # each set's pyramid batch by batch, each level then concatenated over the set
        [torch.cat(parts) for parts in zip(*(laplacian_pyramid(s[i : i + batch].float()) for i in range(0, n, batch)))]
        for s in (x, y)
    )
    result = {}
    for lx, ly in zip(x_levels, y_levels):
        a, b = descriptors(lx, per_image, gen), descriptors(ly, per_image, gen)
        result[int(lx.shape[-1])] = 1e3 * sliced_wasserstein(a, b, gen)
    return {"swd": sum(result.values()) / len(result), "swd_levels": result, "swd_images": n}
