"""What the image-to-image variants (pix2pix, cyclegan, srgan) share: optimizers, previews
(input | output | target rows), held-out evaluation and translating users' images.

Each variant defines `translate(gens, x)` and `evaluate(gens, heldout)`. They take images, not
noise: `translate(gens, x)` maps inputs to outputs, where `gens` holds the
generators by name (the EMA copies when there are some). `sample(...)` therefore has nothing to
draw from and says so; `distgan sample --input IMG|DIR` calls `translate`.
"""

from __future__ import annotations

import os

import torch

from distgan import losses
from distgan.errors import UserError
from distgan.variants.base import Variant
from distgan.variants.gan import adam


class Translation(Variant):
    image_to_image = True
    n_critic = 1
    input_key = "input"  # the batch key of the inputs (pix2pix: the edge maps)

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        name = cfg.variant.name
        for key in ("r1_gamma", "r2_gamma", "lecam_weight", "ortho_reg"):
            if getattr(cfg.variant, key) > 0:
                raise UserError(f"config key 'variant.{key}' is not used by variant '{name}'; leave it at 0")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loss = cfg.variant.loss
        self.main = os.environ.get("RANK", "0") == "0"

    def optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        t = self.cfg.train
        return adam(params, lr, (t.beta1, t.beta2), t.weight_decay)

    def sample(self, G, n, generator=None, labels=None):
        raise UserError(
            f"variant '{self.cfg.variant.name}' translates images rather than drawing them from noise; "
            "use `distgan sample --ckpt RUN --input IMG|DIR --out OUT`"
        )

    def d_update(self, ctx, D, batches: list, pair, stats: dict, scale: float = 1.0) -> None:
        """One optimizer step of D over the micro-batches: `pair(mb)` gives D's real and fake inputs
        (the fakes made without grad); the loss (variant.loss) is multiplied by `scale`."""
        n = len(batches)
        self.optimizers["D"].zero_grad(set_to_none=True)
        for mb in ctx.micro(D, batches):
            real_in, fake_in = pair(mb)
            real_logits, fake_logits = D(real_in), D(fake_in)
            loss = scale * losses.d_loss(self.loss, real_logits, fake_logits)
            ctx.backward(loss)
            stats["loss/d"] += loss.detach() / n
            stats["d/real"] += real_logits.detach().float().mean() / n
            stats["d/fake"] += fake_logits.detach().float().mean() / n
        ctx.step(self.optimizers["D"])

    # -- shared ---------------------------------------------------------------------------
    def heldout(self) -> dict | None:
        """The held-out set (the builtin sets ship one; see data.shards' manifest), or None."""
        from distgan.data import stream

        src = stream.heldout_source(self.cfg.data.shards)
        if src is None:
            return None
        return stream.read_all(
            src,
            resolution=self.cfg.data.resolution,
            channels=self.cfg.data.channels,
            fields=self.fields(),
            options=stream.stream_options(self.cfg),
        )

    def fields(self):
        return None

    @torch.no_grad()
    def run(self, gens: dict, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """translate() over a big batch in chunks, on the generators' device; returns CPU tensors."""
        device = next(next(iter(gens.values())).parameters()).device
        was = {n: g.training for n, g in gens.items()}
        for g in gens.values():
            g.eval()
        try:
            return torch.cat(
                [self.translate(gens, x[i : i + chunk].to(device)).float().cpu() for i in range(0, len(x), chunk)]
            )
        finally:
            for n, g in gens.items():
                g.train(was[n])

    def preview_rows(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of up to 8 preview rows."""
        return batch[self.input_key][:8], batch["image"][:8]

    def preview(self, gens: dict, batch: dict) -> tuple[torch.Tensor, int]:
        """Rows of input | output | target (grayscale shown as RGB when the others are colour)."""
        x, y = self.preview_rows(batch)
        out = self.run(gens, x)
        cols = [x.cpu().float(), out, y.cpu().float()]
        c = max(t.size(1) for t in cols)
        size = max(t.size(-1) for t in cols)
        cols = [
            torch.nn.functional.interpolate(t, size=size, mode="nearest") if t.size(-1) != size else t for t in cols
        ]
        cols = [t.expand(-1, c, -1, -1) for t in cols]
        return torch.stack(cols, 1).flatten(0, 1), len(cols)

    # -- users' images (distgan sample --input) -------------------------------------------
    def input_channels(self) -> int:
        return self.cfg.data.channels

    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the U-Net's 2^depth, the ResNet's 4)."""
        return self.cfg.data.resolution if self.cfg.model.g.arch == "unet" else 4

    def generator_for(self, gens: dict, direction: str) -> dict:
        return gens

    @torch.no_grad()
    def translate_image(self, gens: dict, x: torch.Tensor, direction: str = "ab") -> torch.Tensor:
        """One (1, C, H, W) image of any size in [-1, 1]: padded (replicated edges) to a size the
        generator takes, translated, cropped back. Returns it on the CPU."""
        gens = self.generator_for(gens, direction)
        m = self.size_multiple()
        h, w = x.shape[-2:]
        ph, pw = -h % m, -w % m
        if ph or pw:
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.run(gens, x)[..., : h * self.out_scale(), : w * self.out_scale()]

    def out_scale(self) -> int:
        return 1


def tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """fn over overlapping tiles of x (1, C, H, W), each tile's border of `overlap` input pixels
    dropped from its output, so the seams see the same context as the inside; fn upscales by `scale`."""
    h, w = x.shape[-2:]
    step = tile - 2 * overlap
    out = None
    for top in range(0, h, step):
        for left in range(0, w, step):
            t0, l0 = max(top - overlap, 0), max(left - overlap, 0)
            t1, l1 = min(top + step + overlap, h), min(left + step + overlap, w)
            y = fn(x[..., t0:t1, l0:l1])
            if out is None:
                out = y.new_zeros(1, y.size(1), h * scale, w * scale)
            bh, bw = min(step, h - top), min(step, w - left)
            dt, dl = (top - t0) * scale, (left - l0) * scale
            out[..., top * scale : (top + bh) * scale, left * scale : (left + bw) * scale] = y[
                ..., dt : dt + bh * scale, dl : dl + bw * scale
            ]
    return out
