"""DCGAN (Radford et al. 2016): transposed-conv generator, strided-conv discriminator, BatchNorm.

The generator starts from a 4x4 map and doubles it up to the resolution; the discriminator
halves it down to 4x4 and ends in one 4x4 conv to a logit. Resolutions are powers of two >= 8.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distgan.errors import UserError
from distgan.models.layers import discriminator_head


def check_resolution(resolution: int, key: str) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise UserError(f"{key}=dcgan needs data.resolution to be a power of two >= 8; got {resolution}")


def init_weights(module: nn.Module) -> None:
    """The DCGAN paper's init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, z_dim: int, channels: int, resolution: int, width: int = 64):
        super().__init__()
        check_resolution(resolution, "model.g.arch")
        self.z_dim = z_dim
        ups = int(math.log2(resolution)) - 2
        c = width * 2 ** (ups - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.size(0), self.z_dim, 1, 1))


class Discriminator(nn.Module):
    """Strided convs down to a 4x4 map, flattened into the logit layer (the same function as the
    paper's final 4x4 conv), after minibatch discrimination when asked."""

    def __init__(
        self,
        channels: int,
        resolution: int,
        width: int = 64,
        minibatch: tuple[int, int] | None = None,
        batchnorm: bool = True,
    ):
        super().__init__()
        check_resolution(resolution, "model.d.arch")
        downs = int(math.log2(resolution)) - 2
        c = width
        layers: list[nn.Module] = [nn.Conv2d(channels, c, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for _ in range(downs - 1):
            norm = [nn.BatchNorm2d(c * 2)] if batchnorm else []
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1, bias=not batchnorm), *norm, nn.LeakyReLU(0.2, True)]
            c *= 2
        self.net = nn.Sequential(*layers)
        self.head = discriminator_head(c * 16, minibatch)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).flatten(1)).flatten()
