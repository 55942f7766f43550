"""Image-to-image quality: PSNR and SSIM (Wang et al. 2004), and two sharpness/fidelity measures
for translation outputs. Images are (N, C, H, W) in [-1, 1]; all measures work on [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.double() + 1) / 2).clamp(0, 1)


def _shave(x: torch.Tensor, border: int) -> torch.Tensor:
    return x[..., border:-border, border:-border] if border else x


def psnr(x: torch.Tensor, y: torch.Tensor, border: int = 0) -> torch.Tensor:
    """Per-image PSNR in dB (peak 1), over all channels, `border` pixels shaved off each side (the
    SR convention: the scale factor)."""
    mse = (_shave(_unit(x), border) - _shave(_unit(y), border)).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, border: int = 0) -> torch.Tensor:
    """Per-image SSIM: Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1,
    computed per channel over the 'valid' part of the image and averaged (as skimage's
    structural_similarity with gaussian_weights=True, use_sample_covariance=False)."""
    a, b = _shave(_unit(x), border), _shave(_unit(y), border)
    n, c = a.shape[:2]
    g = _gaussian().to(a)

    def blur(t):  # the separable Gaussian, one channel at a time
        t = t.reshape(n * c, 1, *t.shape[2:])
        t = F.conv2d(F.conv2d(t, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
        return t.view(n, c, *t.shape[2:])

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def gradient_energy(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean gradient magnitude (finite differences, channels averaged): how much fine
    detail an image has. A blurry output has less than the real photo."""
    u = _unit(x).mean(1)
    gx, gy = u[:, :, 1:] - u[:, :, :-1], u[:, 1:, :] - u[:, :-1, :]
    return (gx[:, :-1, :].square() + gy[:, :, :-1].square()).sqrt().flatten(1).mean(1)


def edge_f1(output: torch.Tensor, edge_maps: torch.Tensor, sigma: float = 1.5, tolerance: int = 1) -> torch.Tensor:
    """Per-image F1 between the Canny edges of `output` and the given edge maps (black lines on
    white, as distgan's edges2photos inputs), an edge counting as found within `tolerance` pixels.
    Measures whether a translated photo has the edges it was asked to draw."""
    from scipy.ndimage import binary_dilation
    from skimage.color import rgb2gray
    from skimage.feature import canny

    out = []
    for o, e in zip(_unit(output).cpu().numpy(), _unit(edge_maps).cpu().numpy()):
        img = o.transpose(1, 2, 0)
        gray = rgb2gray(img) if img.shape[2] == 3 else img[..., 0]
        found, truth = canny(gray, sigma=sigma), e[0] < 0.5
        grow = np.ones((2 * tolerance + 1,) * 2, bool)
        precision = (found & binary_dilation(truth, grow)).sum() / max(found.sum(), 1)
        recall = (truth & binary_dilation(found, grow)).sum() / max(truth.sum(), 1)
        out.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return torch.tensor(out, dtype=torch.float64)


def upscale_bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr.float(), scale_factor=scale, mode="bicubic", align_corners=False).clamp(-1, 1)


def downscale_bicubic(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR image of an HR one: bicubic with antialiasing (as PIL's and MATLAB's imresize)."""
    return F.interpolate(hr.float(), scale_factor=1 / scale, mode="bicubic", align_corners=False, antialias=True).clamp(
        -1, 1
    )
