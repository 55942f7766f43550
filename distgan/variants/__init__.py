"""Training algorithms, one file each, behind one interface (`base.Variant`): the trainer, the CLI,
the feeds and the evaluation see a variant only through the hooks and capabilities declared there,
and never branch on its name.

A variant builds its models and optimizers from the config (`models`, `optimizers`: dicts by name),
names the models the trainer keeps an EMA copy of (`ema`), does one optimisation step with
`train_step(batches, ctx)`, and states its own config rules (`check_config`) and capabilities
(`image_to_image`, `differentiates_twice`, `data_per_step`, `num_classes`, `supports_drs`).
`GAN` (variants/gan.py) draws images from noise; `Translation` (variants/translation.py) maps images
to images (pix2pix, cyclegan, srgan) and brings `translate`, `heldout`/`evaluate` and `preview`.
"""

from __future__ import annotations

from distgan.errors import UserError

REGISTRY = {
    "gan": "distgan.variants.gan:GAN",
    "wgan": "distgan.variants.wgan:WGAN",
    "wgan-gp": "distgan.variants.wgan:WGANGP",
    "cgan": "distgan.variants.cgan:CGAN",
    "unrolled": "distgan.variants.unrolled:UnrolledGAN",
    "sngan": "distgan.variants.sngan:SNGAN",
    "pix2pix": "distgan.variants.pix2pix:Pix2Pix",
    "cyclegan": "distgan.variants.cyclegan:CycleGAN",
    "srgan": "distgan.variants.srgan:SRGAN",
}


def check_name(name: str) -> None:
    if name not in REGISTRY:
        raise UserError(f"config key 'variant.name' must be one of {', '.join(sorted(REGISTRY))}; got '{name}'")


def get(name: str):
    """The variant class registered as `name`."""
    import importlib

    check_name(name)
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
