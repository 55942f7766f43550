"""Pix2Pix (Isola et al. 2017): paired image-to-image translation.

G is a U-Net from the input (KEY.input.png) to the target (KEY.target.png); D is a PatchGAN that
judges (input, image) pairs stacked as channels. D's loss is halved, as in the paper; G minimises
gan_weight * L_adv + l1_weight * |G(x) - y|_1 (lambda = 100). `variant.gan_weight=0` trains the
L1-only U-Net, the baseline the paper compares with (D is then never updated).
"""

from __future__ import annotations

import torch

from distgan import losses
from distgan.errors import UserError
from distgan.models import image2image
from distgan.variants.translation import Translation


class Pix2Pix(Translation):
    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.data.kind != "paired":
            raise UserError(
                "variant 'pix2pix' needs paired shards (KEY.input.png + KEY.target.png): set "
                "data.kind=paired (e.g. data.shards=builtin:edges2photos)"
            )
        self.in_channels = cfg.data.input_channels or cfg.data.channels
        G = image2image.build_generator(cfg, self.in_channels, cfg.data.channels, norm="batch")
        D = image2image.build_discriminator(cfg, self.in_channels + cfg.data.channels, norm="batch")
        self.models = {"G": G, "D": D}
        self.optimizers = {
            "G": self.optimizer(G.parameters(), cfg.train.lr_g),
            "D": self.optimizer(D.parameters(), cfg.train.lr_d),
        }

    def fields(self):
        return {"image": ("target.png", self.cfg.data.channels), "input": ("input.png", self.in_channels)}

    def translate(self, gens, x):
        return gens["G"](x)

    def input_channels(self) -> int:
        return self.in_channels

    def train_step(self, batches: list[dict], ctx) -> dict[str, torch.Tensor]:
        G, D = self.models["G"], self.models["D"]
        v = self.cfg.variant
        device = batches[0]["image"].device
        stats = {k: torch.zeros((), device=device) for k in ("loss/d", "loss/g", "loss/l1", "d/real", "d/fake")}
        n = len(batches)
        if v.gan_weight > 0:  # D judges (input, image) pairs; its loss is halved, as in the paper

            def pair(mb):
                x, y = mb["input"], mb["image"]
                with torch.no_grad():
                    fake = G(x)
                return torch.cat([x, y], 1), torch.cat([x, fake], 1)

            self.d_update(ctx, D, batches, pair, stats, scale=0.5)
        self.optimizers["G"].zero_grad(set_to_none=True)
        with ctx.frozen(D) as d_plain:
            for mb in ctx.micro(G, batches):
                x, y = mb["input"], mb["image"]
                fake = G(x)
                l1 = (fake.float() - y.float()).abs().mean()
                loss = v.l1_weight * l1
                if v.gan_weight > 0:
                    adv = losses.g_loss(self.loss, d_plain(torch.cat([x, fake], 1)))
                    loss = loss + v.gan_weight * adv
                    stats["loss/g"] += adv.detach() / n
                ctx.backward(loss)
                stats["loss/l1"] += l1.detach() / n
        ctx.step(self.optimizers["G"])
        return stats

    def evaluate(self, gens, heldout):
        """PSNR/SSIM against the targets, and how sharp (gradient energy relative to the targets')
        and how faithful to the drawn edges (edge F1, for 1-channel edge-map inputs) the outputs are."""
        from distgan.metrics import image as im

        out = self.run(gens, heldout["input"])
        y = heldout["image"]
        result = {
            "n": len(y),
            "psnr": float(im.psnr(out, y).mean()),
            "ssim": float(im.ssim(out, y).mean()),
            "sharpness_ratio": float(im.gradient_energy(out).mean() / im.gradient_energy(y).mean()),
        }
        if self.in_channels == 1:
            result["edge_f1"] = float(im.edge_f1(out, heldout["input"]).mean())
        return result
