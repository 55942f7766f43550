"""Conditional GAN (Mirza & Osindero 2014): G(z, y) and D(x, y) with the shards' class labels.

G concatenates a label embedding to z (the seed's way). D is a projection discriminator (Miyato &
Koyama 2018) by default, or takes the label as an extra input channel (`model.d.conditioning=
concat`); see distgan/models/conditional.py. Fakes get labels uniform over `model.num_classes`, or
(`variant.fake_labels=real`, GAT's way) the labels of the real micro-batch they are judged beside, so
rpgan's pairs each compare a fake and a real of one class.
Sampling: `distgan sample --class K` draws class K, `--class all` a row per class; the training
grids show the classes in order, one block of rows each.
"""

from __future__ import annotations

import torch

from distgan import models
from distgan.errors import UserError
from distgan.models import conditional
from distgan.variants.gan import GAN


class CGAN(GAN):
    supports_drs = False  # conditional samples

    def __init__(self, cfg):
        if cfg.model.num_classes < 1:
            raise UserError("variant 'cgan' needs model.num_classes >= 1 (10 for the digits)")
        if cfg.variant.pack > 1:
            raise UserError("variant 'cgan' does not combine with variant.pack > 1")
        self.num_classes = cfg.model.num_classes
        super().__init__(cfg)

    def build(self, cfg):
        g, d = cfg.model.g, cfg.model.d
        if g.arch in models.NATIVE_CONDITIONAL:  # resnet: class-conditional BatchNorm; r3gan: an embedding
            G = models.build_generator(cfg, num_classes=self.num_classes)
        else:
            G = conditional.ConditionalGenerator(
                models.build_generator(cfg, z_dim=g.z_dim + g.embed_dim), self.num_classes, g.embed_dim
            )
        if d.arch in models.NATIVE_CONDITIONAL:
            if d.conditioning != "projection":
                raise UserError(
                    f"the {d.arch} D is conditioned by projection only; set model.d.conditioning=projection"
                )
            D = models.build_discriminator(
                cfg, channels=self.d_channels(cfg), num_classes=self.num_classes, align_dim=self.align_dim
            )
        elif d.conditioning == "concat":
            base = models.build_discriminator(cfg, channels=self.d_channels(cfg) + 1)
            D = conditional.ConcatDiscriminator(base, self.num_classes, cfg.data.resolution)
        else:
            base = models.build_discriminator(cfg, channels=self.d_channels(cfg))
            head = base.head[0] if isinstance(base.head, torch.nn.Sequential) else base.head
            D = conditional.ProjectionDiscriminator(base, self.num_classes, head.in_features)
        return G, D

    def labels(self, n, device, real=None):
        if self.cfg.variant.fake_labels == "real" and real is not None:  # paired with a real of its class (GAT)
            return real
        return torch.randint(0, self.num_classes, (n,), device=device)

    def generate(self, G, z, y):
        return self.levels_of(G(z, y, levels=True)) if self.guidance else G(z, y)

    def discriminate(self, D, x, y, draws=None, noise=None, features=False):
        x = self.d_input(x, draws, noise)
        return D(x, y, features=True) if features else D(x, y)

    @torch.no_grad()
    def sample(self, G, n, generator=None, labels=None):
        device = next(G.parameters()).device
        if labels is None:  # the classes in order, in equal blocks
            labels = torch.arange(n) * self.num_classes // n
        return self.to_images(G(self.noise(n, device, generator), labels.to(device)).float())
