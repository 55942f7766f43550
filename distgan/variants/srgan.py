"""SRGAN (Ledig et al. 2017): single-image super-resolution by `variant.scale` (x2 or x4).

The shards hold high-resolution images only. Each step takes a random `variant.crop` x crop HR
patch of every image (the whole image with crop=0) and makes its LR input on the fly by bicubic
downscaling with antialiasing (metrics/image.downscale_bicubic). G is an SRResNet.

Two phases: for `variant.pretrain_steps` steps G learns the pixel loss alone (`variant.pixel_loss`,
MSE: the SRResNet of the paper) and D is idle; then G minimises pixel + adv_weight * L_adv
(+ vgg_weight * the VGG54 feature loss when `variant.vgg_weights` names a local torchvision
VGG19 state dict; without one the run says it uses pixel + adversarial loss only) and D trains.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from distgan import losses
from distgan.errors import UserError
from distgan.metrics import image as im
from distgan.models import image2image
from distgan.variants.translation import Translation, tiled


class SRGAN(Translation):
    input_key = "lr"

    def __init__(self, cfg):
        super().__init__(cfg)
        v = cfg.variant
        if cfg.data.kind != "images":
            raise UserError(f"variant 'srgan' trains on plain images (the HR ones); data.kind={cfg.data.kind}")
        size = v.crop or cfg.data.resolution
        if size % v.scale or v.crop > cfg.data.resolution:
            raise UserError(
                f"variant.crop={v.crop} must be <= data.resolution={cfg.data.resolution} and the HR "
                f"size a multiple of variant.scale={v.scale}"
            )
        self.scale = v.scale
        c = cfg.data.channels
        G = image2image.build_generator(cfg, c, c)
        D = image2image.build_discriminator(cfg, c)
        self.models = {"G": G, "D": D}
        self.optimizers = {
            "G": self.optimizer(G.parameters(), cfg.train.lr_g),
            "D": self.optimizer(D.parameters(), cfg.train.lr_d),
        }
        self.vgg = image2image.VGGFeatures(v.vgg_weights) if v.vgg_weights else None
        self.noted = False

    def pixel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = a.float() - b.float()
        return d.abs().mean() if self.cfg.variant.pixel_loss == "l1" else d.square().mean()

    def crop(self, hr: torch.Tensor) -> torch.Tensor:
        size = self.cfg.variant.crop
        if not size or size == hr.size(-1):
            return hr
        n, _, h, w = hr.shape
        top = torch.randint(0, h - size + 1, (n,)).tolist()
        left = torch.randint(0, w - size + 1, (n,)).tolist()
        return torch.stack([hr[i, :, t : t + size, lf : lf + size] for i, (t, lf) in enumerate(zip(top, left))])

    def translate(self, gens, x):
        return gens["G"](x).clamp(-1, 1)

    def out_scale(self) -> int:
        return self.scale

    @torch.no_grad()
    def translate_image(self, gens, x, direction="ab", tile: int = 64, overlap: int = 8):
        """Upscale an image of any size in overlapping LR tiles of `tile` pixels, so memory stays
        bounded for big photos."""
        return tiled(lambda t: self.run(gens, t), x, tile, overlap, self.scale)

    def train_step(self, batches: list[dict], ctx) -> dict[str, torch.Tensor]:
        G, D = self.models["G"], self.models["D"]
        v = self.cfg.variant
        adversarial = ctx.global_step >= v.pretrain_steps
        if not self.noted and self.main and self.vgg is None and v.vgg_weight > 0:
            self.noted = True
            print(
                "srgan: no variant.vgg_weights file given, so no perceptual (VGG) loss: G learns from the "
                "pixel loss and, after pre-training, the adversarial loss",
                file=sys.stderr,
            )
        device = batches[0]["image"].device
        keys = ("loss/pixel", "loss/g", "loss/d", "loss/vgg", "d/real", "d/fake")
        stats = {k: torch.zeros((), device=device) for k in keys}
        stats["train/adversarial_phase"] = torch.full((), float(adversarial), device=device)
        n = len(batches)
        pairs = []
        for mb in batches:
            hr = self.crop(mb["image"])
            pairs.append((im.downscale_bicubic(hr, self.scale).to(hr.dtype), hr))
        if adversarial:

            def pair(lr_hr):
                with torch.no_grad():
                    sr = G(lr_hr[0])
                return lr_hr[1], sr

            self.d_update(ctx, D, pairs, pair, stats)
        self.optimizers["G"].zero_grad(set_to_none=True)
        with ctx.frozen(D) as d_plain:
            for lr, hr in ctx.micro(G, pairs):
                sr = G(lr)
                pixel = self.pixel(sr, hr)
                loss = pixel
                if adversarial:
                    adv = losses.g_loss(self.loss, d_plain(sr))
                    loss = loss + v.adv_weight * adv
                    stats["loss/g"] += adv.detach() / n
                    if self.vgg is not None:
                        self.vgg.to(sr.device)
                        feat = F.mse_loss(self.vgg(sr) / 12.75, self.vgg(hr) / 12.75)
                        loss = loss + v.vgg_weight * feat
                        stats["loss/vgg"] += feat.detach() / n
                ctx.backward(loss)
                stats["loss/pixel"] += pixel.detach() / n
        ctx.step(self.optimizers["G"])
        return stats

    def preview_rows(self, batch):
        hr = batch["image"][:8]
        return im.downscale_bicubic(hr, self.scale), hr

    def evaluate(self, gens, heldout):
        """PSNR/SSIM of G's and of bicubic upscaling's outputs against the held-out HR images,
        `scale` border pixels shaved (the SR convention), over RGB."""
        hr = heldout["image"]
        lr = im.downscale_bicubic(hr, self.scale)
        sr, bicubic = self.run(gens, lr), im.upscale_bicubic(lr, self.scale)
        b = self.scale
        result = {
            "n": len(hr),
            "psnr": float(im.psnr(sr, hr, b).mean()),
            "ssim": float(im.ssim(sr, hr, b).mean()),
            "psnr_bicubic": float(im.psnr(bicubic, hr, b).mean()),
            "ssim_bicubic": float(im.ssim(bicubic, hr, b).mean()),
        }
        result["psnr_gain_db"] = result["psnr"] - result["psnr_bicubic"]
        return result
