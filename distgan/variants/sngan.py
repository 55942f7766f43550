"""SNGAN (Miyato et al. 2018): the GAN with a spectrally normalised discriminator and the hinge loss.

Spectral norm (kernels.spectral_norm, grouped with kernels.spectral_norm_all) goes on every conv and
linear layer of D whatever model.d.spectral_norm says, and the DCGAN D drops BatchNorm unless
model.d.batchnorm says otherwise; `variant.loss` defaults to hinge in the presets (any loss works).
"""

from __future__ import annotations

import dataclasses

from distgan import models
from distgan.variants.gan import GAN


class SNGAN(GAN):
    supports_drs = False

    def build(self, cfg):
        d = dataclasses.replace(cfg.model.d, spectral_norm=True)
        sn_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d=d))
        return models.build_generator(cfg), models.build_discriminator(sn_cfg, channels=cfg.data.channels * self.pack)
