"""The GAN of Goodfellow et al. (2014), as in the seed: one D step then one G step per batch.

D step: D is called on real and on (detached) fake images, loss L_D, Adam step.
G step: fresh z, L_G through D; D's parameters are frozen and D is called unwrapped from DDP,
so its gradients are neither computed nor all-reduced during the G step.
"""

from __future__ import annotations

import torch

from distgan import losses, models
from distgan.errors import UserError


class GAN:
    ema = ("G",)

    def __init__(self, cfg):
        if cfg.variant.loss not in losses.LOSSES:
            raise UserError(
                f"config key 'variant.loss' must be one of {', '.join(losses.LOSSES)}; got '{cfg.variant.loss}'"
            )
        self.cfg = cfg
        self.loss = cfg.variant.loss
        self.z_dim = cfg.model.g.z_dim
        t = cfg.train
        G, D = models.build_generator(cfg), models.build_discriminator(cfg)
        self.models = {"G": G, "D": D}
        self.optimizers = {
            "G": torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2)),
            "D": torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2)),
        }

    def noise(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:  # a fixed generator (sample grids) lives on its own device
            return torch.randn(n, self.z_dim, generator=generator, device=generator.device).to(device)
        return torch.randn(n, self.z_dim, device=device)

    def train_step(self, batches: list[dict], ctx) -> dict[str, torch.Tensor]:
        G, D = self.models["G"], self.models["D"]
        opt_g, opt_d = self.optimizers["G"], self.optimizers["D"]
        device = batches[0]["image"].device
        stats = {k: torch.zeros((), device=device) for k in ("loss/d", "loss/g", "d/real", "d/fake")}

        opt_d.zero_grad(set_to_none=True)
        for mb in ctx.micro(D, batches):
            real = mb["image"]
            with torch.no_grad():
                fake = G(self.noise(real.size(0), device))
            real_logits, fake_logits = D(real), D(fake)
            loss = losses.d_loss(self.loss, real_logits, fake_logits)
            ctx.backward(loss)
            stats["loss/d"] += loss.detach() / len(batches)
            stats["d/real"] += real_logits.detach().float().mean() / len(batches)
            stats["d/fake"] += fake_logits.detach().float().mean() / len(batches)
        ctx.step(opt_d)

        opt_g.zero_grad(set_to_none=True)
        with ctx.frozen(D) as d_plain:
            for mb in ctx.micro(G, batches):
                fake = G(self.noise(mb["image"].size(0), device))
                loss = losses.g_loss(self.loss, d_plain(fake))
                ctx.backward(loss)
                stats["loss/g"] += loss.detach() / len(batches)
        ctx.step(opt_g)
        return stats

    @torch.no_grad()
    def sample(self, G: torch.nn.Module, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(G.parameters()).device
        return G(self.noise(n, device, generator)).float().clamp(-1, 1)
