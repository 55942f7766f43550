"""The seed article's MLP GAN, sized to the configured image instead of a fixed 28x28.

G: z -> 256 -> 512 -> 1024 -> C*R*R with ReLU and a Tanh output.
D: C*R*R -> 1024 -> 512 -> 256 -> 1 with LeakyReLU(0.2). D returns a logit: the seed's final
Sigmoid is folded into the BCE-with-logits loss, which is the same function, computed stably.
"""

from __future__ import annotations

import torch
from torch import nn

from distgan.models.layers import discriminator_head


def check_resolution(resolution: int, key: str) -> None:
    """Any resolution works for an MLP."""


class Generator(nn.Module):
    def __init__(self, z_dim: int, channels: int, resolution: int, width: int = 64):
        super().__init__()
        self.z_dim = z_dim
        self.shape = (channels, resolution, resolution)
        self.net = nn.Sequential(
            nn.Linear(z_dim, 256),
            nn.ReLU(True),
            nn.Linear(256, 512),
            nn.ReLU(True),
            nn.Linear(512, 1024),
            nn.ReLU(True),
            nn.Linear(1024, channels * resolution * resolution),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.size(0), *self.shape)


class Discriminator(nn.Module):
    def __init__(self, channels: int, resolution: int, width: int = 64, minibatch: tuple[int, int] | None = None):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * resolution * resolution, 1024),
            nn.LeakyReLU(0.2, True),
            nn.Linear(1024, 512),
            nn.LeakyReLU(0.2, True),
            nn.Linear(512, 256),
            nn.LeakyReLU(0.2, True),
        )
        self.head = discriminator_head(256, minibatch)  # minibatch discrimination goes before the logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)).flatten()
