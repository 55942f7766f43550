"""Multi-level noise-perturbed guidance (GAT: Hwang et al., "Scalable GANs with Transformers", ICML
2026; `variant.multilevel`).

G's L partial outputs x_0 .. x_{L-1} (models/vit.py: each the sum of the outputs taken so far; x_{L-1}
is the image) are judged together: D sees them stacked as channels, each noised at its own level

    y_i = (1 - t_i) x_i + n_i,    t_i = 1 - m^(1 - i / (L - 1)) + 0.01    (m = variant.multilevel_min_info)

so the earliest, coarsest output is mostly noise (GAT's m = 0.125, L = 4: t = 0.885, 0.76, 0.51, 0.01)
and the image itself nearly clean. A real image is repeated L times and noised the same way, so D
compares like with like at every level and G's early blocks get a gradient of their own.

The noises are cumulative, as GAT makes them: walking from the last level to the first,
n_i = n_{i+1} (1 - t_i) / (1 - t_{i+1}) + sqrt(v_i) e_i with e_i ~ N(0, I) and
v_i = t_i^2 - t_{i+1}^2 ((1 - t_i) / (1 - t_{i+1}))^2 (t_L = 0), which makes each n_i exactly
N(0, t_i^2) and the levels' noises correlated (a coarser level's noise contains the finer one's). In
closed form n_i = (1 - t_i) sum_{j >= i} sqrt(v_j) e_j / (1 - t_j): one (L, L) matrix applied to the
L draws (`Guidance.mixing`).
"""

from __future__ import annotations

import math

import torch

FLOOR = 0.01  # the noise level of the final image (GAT's + 1e-2)


def noise_levels(levels: int, min_info: float) -> list[float]:
    """t_0 .. t_{L-1}: 1 - m^(1 - i / (L - 1)) + 0.01 (one level: 0.01)."""
    if levels == 1:
        return [FLOOR]
    return [1.0 - min_info ** (1.0 - i / (levels - 1)) + FLOOR for i in range(levels)]


def mixing_matrix(t: list[float]) -> torch.Tensor:
    """(L, L) float64 M with n_i = sum_j M_ij e_j: the cumulative noises of the docstring."""
    L = len(t)
    nxt = [*t[1:], 0.0]
    v = [t[j] ** 2 - nxt[j] ** 2 * ((1 - t[j]) / (1 - nxt[j])) ** 2 for j in range(L)]
    m = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i, L):
            m[i, j] = (1 - t[i]) * math.sqrt(max(v[j], 0.0)) / (1 - t[j])
    return m


class Guidance:
    """What D judges under multi-level guidance, for `levels` levels of `min_info`."""

    def __init__(self, levels: int, min_info: float):
        self.levels = levels
        self.t = noise_levels(levels, min_info)
        self.mixing = mixing_matrix(self.t).float()  # float64 while built
        self.keep = torch.tensor([1.0 - t for t in self.t]).view(1, -1, 1, 1, 1)  # each level's 1 - t_i

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        """The noise draws e (B, L, C, H, W) for a batch x (B, C, H, W) or (B, L, C, H, W): kept with a
        judged side so its penalties replay them."""
        b, (c, h, w) = x.shape[0], x.shape[-3:]
        return torch.randn(b, self.levels, c, h, w, device=x.device, dtype=torch.float32)

    def stack(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """D's input (B, L C, H, W): x (B, L, C, H, W) G's levels, or (B, C, H, W) one image repeated to
        every level; level i is (1 - t_i) x_i + n_i from the draws `eps` (fresh when None), stacked as
        channels with the earliest level first (GAT's order)."""
        if x.ndim == 4:
            x = x[:, None].expand(-1, self.levels, -1, -1, -1)
        if eps is None:
            eps = self.draw(x)
        if self.mixing.device != x.device:  # moved once, not on every call
            self.mixing, self.keep = self.mixing.to(x.device), self.keep.to(x.device)
        noise = torch.einsum("ij,bjchw->bichw", self.mixing, eps.float())
        return (self.keep.to(x.dtype) * x + noise.to(x.dtype)).flatten(1, 2)
