"""Representation alignment of D with a frozen encoder (GAT's REPA-style term; Yu et al. 2025, "REPA").

With `model.align.encoder=FILE` (DINOv2 weights, distgan/models/dinov2.py), a vit D gets a projector
(an MLP: width -> model.align.proj_dim -> proj_dim -> the encoder's width, SiLU between) applied to
its final class token and to each of its patch tokens, and D's loss gets, on every real micro-batch,

    model.align.weight * E[(1 - cos(proj(D's class token), encoder's class token))
                           + mean over patches (1 - cos(proj(D's patch token), encoder's patch token))]

as hse1032/GAT's `RpGANPTLoss` does (its `proj_coeff` 1.0). The encoder sees the real image D judges:
its pixels in [-1, 1] (one channel repeated to three), with the translation that DiffAugment drew for
that image (scaled to the image's size; GAT applies the same translation and flip; colour and cutout
are not applied), ImageNet-normalised and resized bicubically to model.align.resolution (224: a
16 x 16 grid of patches). Its patch grid is resized bicubically to D's token grid when the two differ.
For latent data the image is the one stored beside each latent (`distgan shards --encode ...
--keep-images`).

The encoder is frozen: built once per process from its file, in eval mode, with no gradients, never
an entry of the variant's models, so it is neither trained nor saved in checkpoints, and its path is
a file key that is never taken from a checkpoint (distgan/trust.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgan import augment, files
from distgan.models import dinov2

WHAT = "model.align.encoder (DINOv2 weights: Meta's .pth or a safetensors file)"


class Encoder(nn.Module):
    """The frozen DINOv2 and its input pipeline: images in [-1, 1] -> (class token, patch tokens)."""

    def __init__(self, path: str, resolution: int):
        super().__init__()
        self.net = dinov2.from_state_dict(files.read_state_dict(path, WHAT), resolution, WHAT)
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.net.cls_token.shape[-1]

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float() + 1) / 2
        if x.size(1) == 1:
            x = x.repeat(1, 3, 1, 1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        return self.net(x)


def translated(images: torch.Tensor, ops: tuple[str, ...], draws: augment.Draws | None, size: int) -> torch.Tensor:
    """`images` shifted by the translation DiffAugment drew for D's `size`-pixel input (scaled to the
    images' size, rounded); the other ops are not applied. The identity without a translation draw."""
    if not draws or "translation" not in ops:
        return images
    drawn = draws[ops.index("translation")]
    if drawn is None:
        return images
    keep, (dy, dx) = drawn
    factor = images.shape[-1] / size
    params = (torch.round(dy * factor).long(), torch.round(dx * factor).long())
    if factor != 1:  # shifts beyond the op's range at this size are clamped by it
        r = int(images.shape[-1] / 8 + 0.5)
        params = tuple(p.clamp(-r, r) for p in params)
    out = augment.translation(images, params)
    return out if keep is None else torch.where(keep, images, out)


def loss(d_cls: torch.Tensor, d_patches: torch.Tensor, e_cls: torch.Tensor, e_patches: torch.Tensor) -> torch.Tensor:
    """Per sample: 1 - cos of the class tokens + the mean over patches of 1 - cos of the patch tokens;
    the encoder's patch grid resized bicubically to D's when they differ."""
    side, e_side = int(d_patches.shape[1] ** 0.5), int(e_patches.shape[1] ** 0.5)
    if side != e_side:
        b, _, c = e_patches.shape
        grid = e_patches.transpose(1, 2).reshape(b, c, e_side, e_side)
        grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        e_patches = grid.reshape(b, c, side * side).transpose(1, 2)
    cls = 1 - F.cosine_similarity(d_cls.float(), e_cls.float(), dim=-1)
    patches = (1 - F.cosine_similarity(d_patches.float(), e_patches.float(), dim=-1)).mean(dim=1)
    return cls + patches
