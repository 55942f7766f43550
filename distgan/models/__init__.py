"""Generators and discriminators, one file per family, built by name from the config.

`build_generator(cfg)` / `build_discriminator(cfg)` return ordinary `nn.Module`s:
G maps z (B, z_dim) to images (B, C, R, R) in [-1, 1]; D maps images to logits (B,).
"""

from __future__ import annotations

from torch import nn

from distgan.errors import UserError
from distgan.models import dcgan, mlp, toy
from distgan.models.layers import apply_spectral_norm  # noqa: F401  (models.apply_spectral_norm)

FAMILIES = {"dcgan": dcgan, "mlp": mlp, "toy": toy}


def _family(arch: str, key: str):
    if arch not in FAMILIES:
        raise UserError(f"config key '{key}' must be one of {', '.join(sorted(FAMILIES))}; got '{arch}'")
    return FAMILIES[arch]


def check_config(cfg) -> None:
    from distgan.models import image2image

    for key, arch in (("model.g.arch", cfg.model.g.arch), ("model.d.arch", cfg.model.d.arch)):
        if arch in image2image.GENERATORS + image2image.DISCRIMINATORS:
            continue  # the image-to-image variants build (and check) these themselves
        _family(arch, key).check_resolution(cfg.data.resolution, key)


def build_generator(cfg, z_dim: int | None = None) -> nn.Module:
    """G from the config; `z_dim` overrides model.g.z_dim (a conditional G's input is z + embedding)."""
    g = cfg.model.g
    family = _family(g.arch, "model.g.arch")
    return family.Generator(
        z_dim=z_dim or g.z_dim, channels=cfg.data.channels, resolution=cfg.data.resolution, width=g.width
    )


def build_discriminator(cfg, channels: int | None = None) -> nn.Module:
    """D from the config; `channels` overrides data.channels (packed or label-concatenated inputs)."""
    d = cfg.model.d
    family = _family(d.arch, "model.d.arch")
    mbd = (d.mbd_kernels, d.mbd_kernel_dim) if d.minibatch_discrimination else None
    batchnorm = (not d.spectral_norm) if d.batchnorm is None else d.batchnorm
    kwargs = {"batchnorm": batchnorm} if d.arch == "dcgan" else {"maxout": d.maxout} if d.arch == "toy" else {}
    D = family.Discriminator(
        channels=channels or cfg.data.channels, resolution=cfg.data.resolution, width=d.width, minibatch=mbd, **kwargs
    )
    if d.spectral_norm:
        apply_spectral_norm(D)
    return D
