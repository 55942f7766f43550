"""The Python entry points for users' own code (re-exported as `distgan.load_generator`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distgan.errors import UserError


class Generator(nn.Module):
    """A run's generator as a plain module: `G(z, labels=None)` -> images (B, C, R, R) near [-1, 1]
    (not clamped: exactly what the network returns). `z` is (B, z_dim) standard normal noise;
    `labels` int64 class indices (B,) when `num_classes` > 0, else None."""

    def __init__(self, net: nn.Module, variant, z_dim: int, num_classes: int):
        super().__init__()
        self.net, self.z_dim, self.num_classes = net, z_dim, num_classes
        self._generate = variant.generate

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be (batch, {self.z_dim}); got {tuple(z.shape)}")
        if self.num_classes:
            if labels is None:
                raise ValueError(
                    f"this generator is conditional: pass labels, int64 class indices < {self.num_classes}"
                )
            labels = torch.as_tensor(labels, dtype=torch.long, device=z.device).reshape(-1)
            if labels.shape[0] != z.shape[0] or bool(((labels < 0) | (labels >= self.num_classes)).any()):
                raise ValueError(f"labels must be {z.shape[0]} class indices in 0 .. {self.num_classes - 1}")
        elif labels is not None:
            raise ValueError("this generator is unconditional: pass labels=None")
        return self._generate(self.net, z, labels)


def load_generator(path: str | Path, ema: bool = True, device: str | torch.device | None = None) -> Generator:
    """The generator of a run directory (its latest checkpoint) or a step folder, in eval mode with no
    gradients: the EMA copy (`ema=True`, what samples and evaluations use) or the trained G. The model is
    built from the checkpoint's stored config, none of whose file or shard locations is used."""
    from distgan import checkpoint, config, trust, variants

    ckpt = checkpoint.load(path, only_models=True)
    data, _ = trust.checkpoint_config(ckpt.meta["config"], given=set(), needed=(), trust=False, where=str(ckpt.path))
    cfg = config.from_dict(data)
    variant = variants.get(cfg.variant.name)(cfg)
    if variant.image_to_image or not variant.ema:
        raise UserError(
            f"'{cfg.variant.name}' maps images to images; load_generator serves noise-driven generators "
            "(use `distgan sample --translate`)"
        )
    name = variant.ema[0]
    key = f"{name}_ema" if ema else name
    net = variant.models[name]
    checkpoint.load_model(net, ckpt.model_state(key), f"checkpoint '{ckpt.path}' model '{key}'")
    G = Generator(net, variant, cfg.model.g.z_dim, variant.num_classes)
    G.requires_grad_(False).eval()
    return G.to(device or "cpu")
