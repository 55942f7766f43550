"""Training algorithms, one file each. The trainer never branches on a variant's name.

A variant
- builds its models and optimizers from the config (`models`, `optimizers`: dicts by name),
- names the models the trainer keeps an EMA copy of (`ema`, e.g. ("G",)),
- does one optimisation step with `train_step(batches, ctx)`, where `batches` holds
  `train.grad_accum * data_per_step` micro-batches (`data_per_step`, default 1, is e.g. n_critic
  for variants whose D steps each take fresh data), and returns a dict of scalar tensors to log,
- draws images in [-1, 1] with `sample(model, n, generator)`.

Optional hooks, used by the image-to-image variants (pix2pix, cyclegan, srgan; variants/translation.py):
- `data_streams(cfg)` (static): the shard streams a step draws from, {name: (config key, spec)};
  the default is one unnamed stream of data.shards; cyclegan streams "a" and "b" (batch keys image_a,
  image_b), each with its own resume bookkeeping;
- `rank_state()` / `load_rank_state(state)`: per-rank tensors saved in checkpoints (one row per rank),
  e.g. cyclegan's image-history buffers;
- `preview(gens, batch)`: the sample grid (images, row length) from a batch of inputs, instead of
  `sample`; `heldout()` and `evaluate(gens, heldout)`: measures on held-out inputs, for
  `distgan eval` and train.eval_every.
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
