"""The sliced Wasserstein distance on Laplacian-pyramid patches (distgan/metrics/swd.py) against its
definition, and its order on real photo patches."""

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from distgan.data import builtin
from distgan.errors import UserError
from distgan.metrics import swd


def test_the_laplacian_pyramid_rebuilds_the_image_and_stops_at_16():
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    levels = swd.laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + swd.pyr_up(rebuilt)
    assert torch.allclose(rebuilt, x, atol=1e-12)
    # a constant image has no band-pass detail, and its low-pass level keeps the constant
    flat = torch.full((1, 1, 32, 32), 0.3, dtype=torch.float64)
    levels = swd.laplacian_pyramid(flat)
    assert levels[0].abs().max() < 1e-12 and torch.allclose(
        levels[-1], torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    )


def test_descriptors_are_the_drawn_neighbourhoods_normalised_per_channel():
    x = torch.randn(4, 3, 20, 20) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 2
    d = swd.descriptors(x, 10, torch.Generator().manual_seed(7))
    assert d.shape == (40, 3 * 49)
    per_channel = d.view(40, 3, 49)
    assert torch.allclose(per_channel.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(dim=(0, 2)), torch.ones(3), atol=1e-3)
    # the first descriptor is the 7x7 neighbourhood at the first drawn position, normalised
    gen = torch.Generator().manual_seed(7)
    top, left = torch.randint(14, (4, 10), generator=gen), torch.randint(14, (4, 10), generator=gen)
    t, lft = int(top[0, 0]), int(left[0, 0])
    patch = x[0, :, t : t + 7, lft : lft + 7].reshape(3, 49)
    raw = torch.stack(
        [
            x[i, :, int(top[i, j]) : int(top[i, j]) + 7, int(left[i, j]) : int(left[i, j]) + 7]
            for i in range(4)
            for j in range(10)
        ]
    )
    mean, std = raw.mean(dim=(0, 2, 3)), raw.std(dim=(0, 2, 3))
    assert torch.allclose(per_channel[0], (patch - mean[:, None]) / std[:, None], atol=1e-4)


def test_sliced_wasserstein_of_one_dimensional_sets_is_their_wasserstein_distance():
    """In one dimension every direction is +-1, and W1 of the projections is W1 of the sets."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(5000), rng.exponential(2.0, 5000)
    got = swd.sliced_wasserstein(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None], torch.Generator())
    assert got == pytest.approx(wasserstein_distance(a, b), rel=1e-9)
    # in d dimensions: a shift by s along a random direction u averages |<u, s>| = |s| E|u_1|
    a = torch.randn(10000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    shifted = swd.sliced_wasserstein(a, a + s, torch.Generator().manual_seed(2), repeats=20)
    expected = 3.0 * 4 / (3 * np.pi)  # E|u_1| for u uniform on the 4-D sphere: Gamma(2) / (sqrt(pi) Gamma(5/2))
    assert shifted == pytest.approx(expected, rel=0.03)
    with pytest.raises(ValueError, match="same shape"):
        swd.sliced_wasserstein(a, a[:10], torch.Generator())


def test_swd_orders_photo_patches_alike_blurred_and_noise():
    """Two disjoint sets of the same photo patches are closer than blurred patches, which are
    closer than noise; blurring shows most at the finest level."""
    import torch.nn.functional as F

    x = torch.from_numpy(builtin._patches(600, 32, seed=0, heldout=False)).permute(0, 3, 1, 2).float() / 127.5 - 1
    same = swd.swd(x[:300], x[300:])
    blurred = swd.swd(x[:300], F.avg_pool2d(F.interpolate(x[300:], scale_factor=2, mode="bilinear"), 4, 2, 1))
    noise = swd.swd(x[:300], torch.rand_like(x[300:]) * 2 - 1)
    assert set(same["swd_levels"]) == {32, 16}
    assert same["swd"] < blurred["swd"] < noise["swd"], (same, blurred, noise)
    assert blurred["swd_levels"][32] > 3 * same["swd_levels"][32]
    assert swd.swd(x[:300], x[300:], seed=0) == same  # the same seed, the same figures


def test_swd_refuses_sets_it_cannot_compare():
    with pytest.raises(UserError, match="same shape"):
        swd.swd(torch.zeros(4, 3, 16, 16), torch.zeros(4, 1, 16, 16))
    with pytest.raises(UserError, match="at least 7x7"):
        swd.swd(torch.zeros(4, 1, 4, 4), torch.zeros(4, 1, 4, 4))
    with pytest.raises(UserError, match="at least 2 images"):
        swd.swd(torch.zeros(1, 1, 16, 16), torch.zeros(4, 1, 16, 16))
