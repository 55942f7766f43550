"""The small MLPs of the 2-D mode-collapse experiments (PacGAN, VEEGAN, Unrolled GAN), on points.

G: z -> 4 x (Linear(width), BatchNorm, ReLU) -> Linear(channels): a point, no squashing (the grid
   spans [-4, 4]). D: points -> 3 x (Linear(width), LeakyReLU(0.2)) -> [minibatch discrimination]
   -> logit; with model.d.maxout=k (PacGAN's D: k=5) each hidden layer is a maxout of k pieces. `resolution` is
   ignored: samples are (B, channels) vectors (data.kind=points).
"""

from __future__ import annotations

import torch
from torch import nn

from distgan.models.layers import discriminator_head


def check_resolution(resolution: int, key: str) -> None:
    """Points have no resolution."""


class Generator(nn.Module):
    def __init__(self, z_dim: int, channels: int, resolution: int, width: int = 400):
        super().__init__()
        layers: list[nn.Module] = []
        n = z_dim
        for _ in range(4):
            layers += [nn.Linear(n, width), nn.BatchNorm1d(width), nn.ReLU(True)]
            n = width
        self.net = nn.Sequential(*layers, nn.Linear(width, channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Maxout(nn.Module):
    """A linear layer of `pieces` x out units, the max over each unit's pieces (Goodfellow et al. 2013)."""

    def __init__(self, in_features: int, out_features: int, pieces: int):
        super().__init__()
        self.out_features, self.pieces = out_features, pieces
        self.linear = nn.Linear(in_features, out_features * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(x.size(0), self.out_features, self.pieces).amax(-1)


class Discriminator(nn.Module):
    def __init__(
        self,
        channels: int,
        resolution: int,
        width: int = 200,
        minibatch: tuple[int, int] | None = None,
        maxout: int = 0,
        **_,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        n = channels
        for _ in range(3):
            layers += [Maxout(n, width, maxout)] if maxout > 1 else [nn.Linear(n, width), nn.LeakyReLU(0.2, True)]
            n = width
        self.net = nn.Sequential(*layers)
        self.head = discriminator_head(width, minibatch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x.flatten(1))).flatten()
