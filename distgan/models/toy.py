"""The small MLPs of the 2-D mode-collapse experiments (PacGAN, VEEGAN, Unrolled GAN), on points.

G: z -> 4 x (Linear(width), BatchNorm, ReLU) -> Linear(channels): a point, no squashing (the grid
   spans [-4, 4]). D: points -> 3 x (Linear(width), LeakyReLU(0.2)) -> [minibatch discrimination]
   -> logit. PacGAN's D used maxout units; LeakyReLU is the simpler stand-in here. `resolution` is
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


class Discriminator(nn.Module):
    def __init__(self, channels: int, resolution: int, width: int = 200, minibatch: tuple[int, int] | None = None, **_):
        super().__init__()
        layers: list[nn.Module] = []
        n = channels
        for _ in range(3):
            layers += [nn.Linear(n, width), nn.LeakyReLU(0.2, True)]
            n = width
        self.net = nn.Sequential(*layers)
        self.head = discriminator_head(width, minibatch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x.flatten(1))).flatten()
