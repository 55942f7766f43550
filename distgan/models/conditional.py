"""Class-conditional wrappers around any generator / discriminator family.

G(z, y): the seed's label-embedding concatenation, G_base(cat(z, embed(y))).
D(x, y), two ways (`model.d.conditioning`):
- concat: the label as extra input, an embedding of y reshaped to one extra image channel,
  D_base(cat(x, plane(y))) (the seed's way, carried to images);
- projection (Miyato & Koyama 2018): logit = head(phi(x)) + <embed(y), phi(x)>, with phi the base
  discriminator's features (its `net`) and head its last layer.
"""

from __future__ import annotations

import torch
from torch import nn


class ConditionalGenerator(nn.Module):
    def __init__(self, base: nn.Module, num_classes: int, embed_dim: int):
        super().__init__()
        self.base = base
        self.embed = nn.Embedding(num_classes, embed_dim)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.base(torch.cat([z, self.embed(y).to(z.dtype)], dim=1))


class ConcatDiscriminator(nn.Module):
    """D_base built for channels + 1; the label enters as a learned (R x R) plane."""

    def __init__(self, base: nn.Module, num_classes: int, resolution: int):
        super().__init__()
        self.base = base
        self.resolution = resolution
        self.embed = nn.Embedding(num_classes, resolution * resolution)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        plane = self.embed(y).view(-1, 1, self.resolution, self.resolution).to(x.dtype)
        return self.base(torch.cat([x, plane], dim=1))


class ProjectionDiscriminator(nn.Module):
    """logit = head(phi(x)) + <embed(y), phi(x)> on the base D's flat features phi = net(x)."""

    def __init__(self, base: nn.Module, num_classes: int, features: int):
        super().__init__()
        self.base = base
        self.embed = nn.Embedding(num_classes, features)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.base.net(x).flatten(1)
        return self.base.head(h).flatten() + (self.embed(y).to(h.dtype) * h).sum(dim=1)
