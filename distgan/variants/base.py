"""The one interface between a training algorithm and the rest of distgan.

The trainer, the CLI, the data feeds and the evaluation see a variant only through `Variant`: every
hook is declared here with its type and default, and every capability is a class attribute or a
class method, so no module outside `variants/` asks a variant what it has (`hasattr`) or what it is
called. A new variant subclasses `GAN` (noise to images, variants/gan.py) or `Translation` (images to
images, variants/translation.py), overrides what differs, and is registered in `variants.REGISTRY`.
"""

from __future__ import annotations

import torch

from distgan.errors import UserError


class Variant:
    # -- capabilities: what the rest of distgan may rely on, read from the class ---------------------
    ema: tuple[str, ...] = ("G",)  # models the trainer keeps an EMA copy of (samples come from it)
    # real micro-batches one step consumes per train.grad_accum: n_critic for variants whose D steps each
    # take fresh data
    data_per_step: int = 1
    num_classes: int = 0  # > 0: every training sample needs a label in 0 .. num_classes - 1
    # images to images: `translate`, `heldout`/`evaluate` (its own measures, no FID) and `preview` apply,
    # `sample` from noise does not
    image_to_image: bool = False
    # discriminator rejection sampling (`distgan sample/eval --drs`) applies: D's logit estimates
    # log p_data / p_G for unconditional samples (also needs a logistic loss and no packing)
    supports_drs: bool = False

    # keys of `rank_state` that are partial sums over ranks: on a resume with another number of
    # processes their total moves to rank 0 (checkpoint.resume_point); other keys go by rank mod old world
    additive_rank_state: tuple[str, ...] = ()

    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    def __init__(self, cfg):
        self.cfg = cfg

    # -- the config ----------------------------------------------------------------------------------
    @staticmethod
    def data_streams(cfg) -> dict[str, tuple[str, str]]:
        """The shard streams a step draws from: name -> (config key, shard spec). One, unnamed (batch
        keys as they are); unpaired variants stream one per domain (batch keys suffixed by its name)."""
        return {"": ("data.shards", cfg.data.shards)}

    @classmethod
    def check_config(cls, cfg) -> None:
        """This variant's rules on the config, raised as UserError (config.validate calls it; the rules
        between keys that hold for every variant live in config.validate). Subclasses call it too."""
        if cfg.data.augment and (cls.image_to_image or cfg.data.kind not in ("images", "latents")):
            raise UserError(
                "config key 'data.augment' applies to image GANs (gan, wgan, wgan-gp, sngan, cgan, "
                f"unrolled); leave it empty for variant '{cfg.variant.name}' on data.kind={cfg.data.kind}"
            )
        if cfg.variant.fake_labels != "uniform" and cfg.variant.name != "cgan":
            raise UserError(
                f"variant.fake_labels={cfg.variant.fake_labels} gives fakes the real images' labels: it needs the "
                f"conditional variant (variant.name=cgan), not '{cfg.variant.name}'"
            )

    @classmethod
    def differentiates_twice(cls, cfg) -> str:
        """What in a step differentiates D's gradients again (exact gradient penalties, unrolled D
        steps), said for an error message; "" for nothing. torch.compile cannot, so train.compile
        is refused when it is not empty."""
        return ""

    @classmethod
    def compile_hint(cls, cfg) -> str:
        """What to change so that train.compile can train this config (said after the refusal)."""
        return "Set train.compile=false"

    # -- training ------------------------------------------------------------------------------------
    def train_step(self, batches: list[dict], ctx) -> dict[str, torch.Tensor]:
        """One optimisation step on `train.grad_accum * data_per_step` micro-batches; the scalars to log."""
        raise NotImplementedError

    def set_schedule(self, scheduled) -> None:
        """The step's scheduled values (step.Scheduled: penalty weight and augmentation multipliers),
        before its train_step; variants without such terms ignore them."""

    def rank_state(self) -> dict[str, torch.Tensor]:
        """Per-rank tensors saved in checkpoints (one row per rank), e.g. cyclegan's image pools."""
        return {}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what `rank_state` gave (this rank's row of each tensor)."""

    # -- images --------------------------------------------------------------------------------------
    def sample(self, model: torch.nn.Module, n: int, generator=None, labels=None) -> torch.Tensor:
        """n images in [-1, 1] from `model` (G or its EMA copy)."""
        raise NotImplementedError

    def fields(self) -> tuple[str, ...] | None:
        """The image members of a sample when there are several (paired data: input, target)."""
        return None

    def preview(self, gens: dict, batch: dict) -> tuple[torch.Tensor, int]:
        """image_to_image: the sample grid (images, row length) made from a batch of inputs (the other
        variants' grids come from `sample`)."""
        raise NotImplementedError

    def heldout(self) -> dict | None:
        """Held-out inputs named by the run's shards, for `evaluate`; None when there are none."""
        return None

    def evaluate(self, gens: dict, heldout: dict) -> dict:
        """image_to_image: this variant's own measures on held-out inputs (`distgan eval`, train.eval_every)."""
        raise NotImplementedError

    def translate(self, gens: dict, x: torch.Tensor) -> torch.Tensor:
        """image_to_image: outputs for inputs x, by the generators in `gens` (`distgan sample --input`)."""
        raise NotImplementedError
