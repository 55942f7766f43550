"""Wasserstein GANs: a critic D with unbounded scores, `variant.n_critic` critic steps per G step.

- wgan (Arjovsky et al. 2017): critic weights clamped to [-clip, clip] after every critic step,
  RMSprop (the paper's: lr 5e-5, clip 0.01, n_critic 5).
- wgan-gp (Gulrajani et al. 2017): no clipping; the penalty lambda * (|grad_x D(x_hat)| - 1)^2 at
  x_hat uniformly between real and fake, differentiated through (create_graph), with Adam
  (lr 1e-4, betas (0, 0.9), n_critic 5, lambda 10). The critic must not use BatchNorm (the penalty
  is per sample); the presets turn it off.

Under DDP the critic runs three times before one backward (real, fake, x_hat), which works because
DDP runs with broadcast_buffers=False (see cluster.make_accelerator); the penalty's inner
autograd.grad is with respect to x_hat only, so DDP all-reduces once, in the outer backward.
"""

from __future__ import annotations

import torch

from distgan import penalties
from distgan.errors import UserError
from distgan.variants.gan import CAPTURABLE, GAN


class WGAN(GAN):
    supports_drs = False  # a critic's score is no log density ratio

    def __init__(self, cfg):
        if cfg.variant.loss != "wasserstein":
            raise UserError(f"variant '{cfg.variant.name}' needs variant.loss=wasserstein; got '{cfg.variant.loss}'")
        super().__init__(cfg)

    def optimizer(self, model, lr):
        return torch.optim.RMSprop(
            model.parameters(), lr=lr, weight_decay=self.cfg.train.weight_decay, capturable=CAPTURABLE
        )

    @torch.no_grad()
    def after_d_step(self, D):
        c = self.cfg.variant.clip
        torch._foreach_clamp_min_(list(D.parameters()), -c)
        torch._foreach_clamp_max_(list(D.parameters()), c)


def interpolate(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """x_hat = e real + (1 - e) fake, e ~ U(0, 1) per sample: where WGAN-GP's penalty is taken."""
    e = torch.rand(real.size(0), *([1] * (real.ndim - 1)), device=real.device, dtype=real.dtype)
    return e * real.detach() + (1 - e) * fake.detach()


class WGANGP(GAN):
    supports_drs = False

    @classmethod
    def penalties(cls, cfg) -> dict[str, str]:
        return {**super().penalties(cfg), "loss/gp": f"the WGAN-GP penalty (variant.gp_weight={cfg.variant.gp_weight})"}

    def __init__(self, cfg):
        if cfg.variant.loss != "wasserstein":
            raise UserError(f"variant 'wgan-gp' needs variant.loss=wasserstein; got '{cfg.variant.loss}'")
        super().__init__(cfg)

    def d_penalty(self, D, real, fake, ctx, mode):
        """R1/R2 if set, and the gradient penalty lambda * E (|grad D(x_hat)| - 1)^2 (penalties.exact_gp,
        or its unbiased finite-difference estimate penalties.approx_gp), with fresh augmentation draws
        for x_hat shared by its D evaluations."""
        x_hat = interpolate(real.x, fake.x)
        side = self.side(x_hat, real.y)
        critic, v = self.critic(D, side), self.cfg.variant
        if mode == "approx":
            gp = penalties.approx_gp(critic, x_hat, v.penalty_sigma, ctx.full_precision(D))
        else:
            gp = penalties.exact_gp(critic, x_hat)
        return {**super().d_penalty(D, real, fake, ctx, mode), "loss/gp": v.gp_weight * gp}
