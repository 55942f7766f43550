"""Generators and discriminators, one file per family, built by name from the config.

`build_generator(cfg)` / `build_discriminator(cfg)` return ordinary `nn.Module`s:
G maps z (B, z_dim) to images (B, C, R, R) in [-1, 1]; D maps images to logits (B,).
"""

from __future__ import annotations

from torch import nn

from distgan.errors import UserError
from distgan.models import dcgan, mlp, r3gan, resnet, toy, vit
from distgan.models.layers import apply_spectral_norm  # noqa: F401  (models.apply_spectral_norm)

FAMILIES = {"dcgan": dcgan, "mlp": mlp, "r3gan": r3gan, "resnet": resnet, "toy": toy, "vit": vit}
NATIVE_CONDITIONAL = ("resnet", "r3gan", "vit")  # families that take labels themselves: G(z, y), D(x, y)


def _family(arch: str, key: str):
    if arch not in FAMILIES:
        raise UserError(f"config key '{key}' must be one of {', '.join(sorted(FAMILIES))}; got '{arch}'")
    return FAMILIES[arch]


def check_config(cfg) -> None:
    """model.g/model.d of the families above (variants that build these models call it)."""
    for key, arch in (("model.g.arch", cfg.model.g.arch), ("model.d.arch", cfg.model.d.arch)):
        _family(arch, key).check_resolution(cfg.data.resolution, key)
    g, d = cfg.model.g, cfg.model.d
    for key, value, arch in (
        ("model.g.attention", g.attention, g.arch),
        ("model.d.attention", d.attention, d.arch),
        ("model.g.hierarchical", g.hierarchical, g.arch),
    ):
        if value and arch != "resnet":
            raise UserError(f"config key '{key}' applies to the resnet models; got arch '{arch}'")
    if "r3gan" in (g.arch, d.arch):
        r3gan.check_config(cfg)
    if cfg.train.lr_ref_width and "vit" not in (g.arch, d.arch):
        raise UserError(
            "train.lr_ref_width scales the learning rates of vit models by their width; neither model.g.arch "
            f"('{g.arch}') nor model.d.arch ('{d.arch}') is vit (set train.lr_ref_width=0)"
        )
    for side in ("g", "d"):
        m = getattr(cfg.model, side)
        if m.arch == "vit":
            vit.check(cfg.data.resolution, cfg.model.vit, f"model.{side}.arch")
            if m.spectral_norm:
                raise UserError(f"model.{side}.spectral_norm does not apply to model.{side}.arch=vit")


def lr_scale(cfg, side: str) -> float:
    """train.lr_ref_width / the width of model.<side> when it is a vit (GAT's width-aware learning
    rates), else 1."""
    ref = cfg.train.lr_ref_width
    if not ref or getattr(cfg.model, side).arch != "vit":
        return 1.0
    return ref / vit.shape_of(cfg.model.vit)[0]


def _r3gan_shape(cfg) -> dict:
    r = cfg.model.r3gan
    return {
        "widths": list(r.widths),
        "cardinalities": list(r.cardinalities),
        "blocks": list(r.blocks),
        "expansion": r.expansion,
        "fp32_stages": r.fp32_stages,
        "grouped_conv": cfg.model.grouped_conv,
    }


def build_generator(cfg, z_dim: int | None = None, num_classes: int = 0) -> nn.Module:
    """G from the config; `z_dim` overrides model.g.z_dim (a conditional G's input is z + embedding).
    `num_classes` > 0 (resnet, r3gan): G(z, y) (resnet: class-conditional BatchNorm; r3gan: an embedding
    of the one-hot label concatenated to z)."""
    g = cfg.model.g
    family = _family(g.arch, "model.g.arch")
    kwargs = {}
    if g.arch == "resnet":
        kwargs = {
            "num_classes": num_classes,
            "embed_dim": g.embed_dim,
            "hierarchical": g.hierarchical,
            "attention": g.attention,
            "normalize": g.batchnorm,
        }
    if g.arch == "vit":
        v = cfg.model.vit
        width, depth, heads = vit.shape_of(v)
        G = vit.Generator(
            z_dim=z_dim or g.z_dim,
            channels=cfg.data.channels,
            resolution=cfg.data.resolution,
            width=width,
            depth=depth,
            heads=heads,
            patch=v.patch,
            mlp_ratio=v.mlp_ratio,
            num_classes=num_classes,
            embed_dim=g.embed_dim,
            levels=v.levels,
            map_lr_mult=v.map_lr_mult,
        )
    elif g.arch == "r3gan":
        G = r3gan.Generator(
            z_dim=z_dim or g.z_dim,
            channels=cfg.data.channels,
            resolution=cfg.data.resolution,
            num_classes=num_classes,
            embed_dim=cfg.model.r3gan.embed_dim,
            **_r3gan_shape(cfg),
        )
    else:
        G = family.Generator(
            z_dim=z_dim or g.z_dim, channels=cfg.data.channels, resolution=cfg.data.resolution, width=g.width, **kwargs
        )
    if g.spectral_norm:
        apply_spectral_norm(G, cfg.train.sn_scale)
    return G


def build_discriminator(cfg, channels: int | None = None, num_classes: int = 0, align_dim: int = 0) -> nn.Module:
    """D from the config; `channels` overrides data.channels (packed or label-concatenated inputs).
    `num_classes` > 0 (resnet, r3gan): D(x, y) with its projection term. `align_dim` > 0 (vit): a
    projector of D's final tokens onto a frozen encoder's features of that width (model.align)."""
    d = cfg.model.d
    family = _family(d.arch, "model.d.arch")
    mbd = (d.mbd_kernels, d.mbd_kernel_dim) if d.minibatch_discrimination else None
    batchnorm = (not d.spectral_norm) if d.batchnorm is None else d.batchnorm
    kwargs = {"batchnorm": batchnorm} if d.arch == "dcgan" else {"maxout": d.maxout} if d.arch == "toy" else {}
    if d.arch == "resnet":
        kwargs = {"num_classes": num_classes, "attention": d.attention}
    if d.arch == "vit":
        if mbd:
            raise UserError("model.d.minibatch_discrimination does not apply to model.d.arch=vit")
        v = cfg.model.vit
        width, depth, heads = vit.shape_of(v)
        D = vit.Discriminator(
            channels=channels or cfg.data.channels,
            resolution=cfg.data.resolution,
            width=width,
            depth=depth,
            heads=heads,
            patch=v.patch,
            mlp_ratio=v.mlp_ratio,
            num_classes=num_classes,
            cmap=v.cmap,
            class_map=v.class_map,
            mbstd=v.mbstd,
            align_dim=align_dim,
            proj_dim=cfg.model.align.proj_dim,
        )
    elif d.arch == "r3gan":
        if mbd:
            raise UserError("model.d.minibatch_discrimination does not apply to model.d.arch=r3gan")
        D = r3gan.Discriminator(
            channels=channels or cfg.data.channels,
            resolution=cfg.data.resolution,
            num_classes=num_classes,
            **_r3gan_shape(cfg),
        )
    else:
        D = family.Discriminator(
            channels=channels or cfg.data.channels,
            resolution=cfg.data.resolution,
            width=d.width,
            minibatch=mbd,
            **kwargs,
        )
    if d.spectral_norm:
        apply_spectral_norm(D, cfg.train.sn_scale)
    return D


def standing_stats(G: nn.Module, draw, batches: int) -> int:
    """BigGAN's "standing statistics": every BatchNorm of G gets running statistics recomputed from
    `batches` calls of `draw()` (which runs G on a batch of its own noise): the plain average of the
    per-batch means and variances (train-mode BN with momentum None), with the rest of G in eval mode,
    so spectral norm's vectors and every weight stay as they are. The EMA generator's copied
    statistics belong to the live G's weights; these belong to its own. G is left in eval mode.
    Returns how many BatchNorm layers were recomputed (0: G has none, and nothing changed)."""
    import torch

    bns = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    if batches < 1:
        raise UserError(f"standing statistics need at least 1 batch; got {batches}")
    G.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    try:
        with torch.no_grad():
            for _ in range(batches):
                draw()
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
            m.eval()
    return len(bns)
