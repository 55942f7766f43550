"""What the image-to-image variants (pix2pix, cyclegan, srgan) share: optimizers, previews
(input | output | target rows), held-out evaluation and translating users' images.

They take images, not noise: `translate(gens, x)` maps inputs to outputs, where `gens` holds the
generators by name (the EMA copies when there are some). `sample(...)` therefore has nothing to
draw from and says so; `distgan sample --input IMG|DIR` calls `translate`.
"""

from __future__ import annotations

import os

import torch

from distgan.errors import UserError


class Translation:
    ema: tuple[str, ...] = ("G",)
    data_per_step = 1
    n_critic = 1
    input_key = "input"  # the batch key of the inputs (pix2pix: the edge maps)

    def __init__(self, cfg):
        self.cfg = cfg
        self.loss = cfg.variant.loss
        self.main = os.environ.get("RANK", "0") == "0"

    @staticmethod
    def data_streams(cfg) -> dict[str, tuple[str, str]]:
        return {"": ("data.shards", cfg.data.shards)}

    def optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.Adam(params, lr=lr, betas=(t.beta1, t.beta2))

    def sample(self, G, n, generator=None, labels=None):
        raise UserError(
            f"variant '{self.cfg.variant.name}' translates images rather than drawing them from noise; "
            "use `distgan sample --ckpt RUN --input IMG|DIR --out OUT`"
        )

    # -- to be provided by each variant ---------------------------------------------------
    def translate(self, gens: dict, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, gens: dict, heldout: dict) -> dict:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def heldout(self) -> dict | None:
        """The held-out set (the builtin sets ship one; see data.shards' manifest), or None."""
        from distgan.data import stream

        src = stream.heldout_source(self.cfg.data.shards)
        if src is None:
            return None
        return stream.read_all(src, resolution=self.cfg.data.resolution, channels=self.cfg.data.channels,
                               fields=self.fields())  # fmt: skip

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
            return torch.cat([self.translate(gens, x[i : i + chunk].to(device)).float().cpu()
                              for i in range(0, len(x), chunk)])  # fmt: skip
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
