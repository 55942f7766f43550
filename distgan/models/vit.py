"""Transformer G and D in the GAT style (Hwang et al., "Scalable GANs with Transformers", ICML 2026;
hse1032/GAT), on images or latents of any channel count: `model.g.arch=vit`, `model.d.arch=vit`.

G: the input tokens are the fixed 2-D sin-cos position embeddings of the (resolution / patch)^2 grid;
everything sample-specific enters through adaLN: w = MLP(normalised z, normalised class embedding)
(two SiLU layers with a 0.01 learning-rate multiplier, StyleGAN's mapping; model.vit.map_lr_mult), and
each block
  x += gate_a * Attention(RMSNorm(x) * (1 + scale_a)),  x += gate_m * SwiGLU(RMSNorm(x) * (1 + scale_m))
with (scale_a, gate_a, scale_m, gate_m) = Linear(SiLU(w)) (initialised at a tenth of Xavier's gain).
Attention is multi-head self-attention with RMSNorm on q and k and 2-D rotary position embeddings
(RoPE: half of each head's dimensions rotate with the row, half with the column), through
distgan.models.attention.attend (SDPA: flash where the penalty mode allows). The image is the sum of
`levels` outputs taken at evenly spaced depths (GAT's multi-level outputs, each RMSNorm, adaLN scale,
a linear layer to patches), so `forward(z, y, levels=True)` also gives the partial sums, which
multi-level guidance judges.

D: a strided conv embeds patches, sin-cos positions are added and a learned class token prepended;
blocks of RMSNorm (affine) -> attention -> layer-scale 0.1 and RMSNorm -> SwiGLU -> layer-scale 0.1;
the class token's RMSNorm + Linear to `cmap` features is projected on a class embedding (one learned
embedding when unconditional): their dot product divided by sqrt(cmap) is the logit; or, with
`class_map` (model.vit.class_map, GAT's LabelEmbedder), on the embedding mapped by two SiLU-separated
linear layers with a 0.01 learning-rate multiplier, the plain dot product (GAT's D exactly). With
model.vit.mbstd (not GAT's), StyleGAN's minibatch standard deviation of the final tokens, through a linear
layer, is added to the class token's features before the projection (`group_std`; groups within a
micro-batch). With model.align.encoder, an MLP projector maps the final tokens onto a frozen encoder's
features (distgan/align.py).

Sizes as GAT names them (`model.vit.size`): S (width 384, depth 12, 6 heads), B (768, 12, 12),
L (1024, 24, 16), XL (1152, 28, 16), or `custom` with model.vit.width/depth/heads; patch 2, 4 or 8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distgan.errors import UserError
from distgan.models import attention

SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def shape_of(v) -> tuple[int, int, int]:
    """(width, depth, heads) of a model.vit config section."""
    return SIZES[v.size] if v.size in SIZES else (v.width, v.depth, v.heads)


def check(resolution: int, v, key: str) -> None:
    width, depth, heads = shape_of(v)
    if resolution % v.patch:
        raise UserError(f"{key}=vit: data.resolution {resolution} is not a multiple of model.vit.patch {v.patch}")
    if width % heads or (width // heads) % 4:
        raise UserError(
            f"{key}=vit: width {width} / {heads} heads must give a head dimension that is a multiple of 4 (2-D RoPE)"
        )
    if depth < v.levels:
        raise UserError(f"{key}=vit: model.vit.levels {v.levels} exceeds the depth {depth}")


def check_resolution(resolution: int, key: str) -> None:
    """Any resolution: the patch size is checked against it with model.vit (`check`)."""


def sincos_2d(width: int, side: int) -> torch.Tensor:
    """(side^2, width) fixed sin-cos position embeddings: half the channels for the row, half the column."""
    quarter = width // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(side, dtype=torch.float64)
    one = torch.cat([torch.sin(pos[:, None] * freq), torch.cos(pos[:, None] * freq)], dim=1)  # (side, width/2)
    rows = one[:, None, :].expand(side, side, -1)
    cols = one[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, -1).float()


class RoPE2D(nn.Module):
    """Axial rotary position embedding for a side x side grid of tokens (the first `prefix` tokens,
    e.g. D's class token, are left as they are): the first half of a head's dimensions rotate by the
    token's row, the second half by its column, in pairs (x_2i, x_2i+1)."""

    def __init__(self, head_dim: int, side: int, prefix: int = 0, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2
        freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)  # (half / 2,)
        pos = torch.arange(side, dtype=torch.float64)
        rows = (pos[:, None, None] * freq).expand(side, side, -1)
        cols = (pos[None, :, None] * freq).expand(side, side, -1)
        angle = torch.cat([rows, cols], dim=-1).reshape(side * side, -1)  # (T, head_dim / 2)
        self.prefix = prefix
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, heads, prefix + T, head_dim)."""
        head, grid = x[..., : self.prefix, :], x[..., self.prefix :, :]
        pairs = grid.unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([head, rotated], dim=-2) if self.prefix else rotated


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, rope: RoPE2D):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.proj = nn.Linear(width, width)
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.rope(self.q_norm(q)), self.rope(self.k_norm(k))
        return self.proj(attention.attend(q, k, v).transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        hidden = int(2 / 3 * mlp_ratio * width)
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class ScaledLinear(nn.Module):
    """A linear layer whose weights are stored divided by `lr_mult` and used times it: Adam's steps on
    them are `lr_mult` times smaller (StyleGAN's mapping network)."""

    def __init__(self, c_in: int, c_out: int, lr_mult: float):
        super().__init__()
        self.lr_mult = lr_mult
        self.weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(c_out, c_in), gain=1 / lr_mult))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.lr_mult, self.bias * self.lr_mult)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


def _xavier(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class GBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, rope: RoPE2D):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(width, heads, rope)
        self.norm2 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(width, mlp_ratio)
        self.ada = nn.Linear(width, 4 * width)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale_a, gate_a, scale_m, gate_m = self.ada(F.silu(w))[:, None].chunk(4, dim=-1)
        x = x + gate_a * self.attn(self.norm1(x) * (1 + scale_a))
        return x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m))


class Output(nn.Module):
    """One level's image: RMSNorm, adaLN scale, a linear layer to the patches."""

    def __init__(self, width: int, patch: int, channels: int):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada = nn.Linear(width, width)
        self.linear = nn.Linear(width, patch * patch * channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x) * (1 + self.ada(F.silu(w))[:, None]))


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """(B, side^2, patch^2 C) -> (B, C, side patch, side patch)."""
    b, t, _ = x.shape
    side = math.isqrt(t)
    x = x.reshape(b, side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, side * patch, side * patch)


class Generator(nn.Module):
    def __init__(
        self,
        z_dim: int,
        channels: int,
        resolution: int,
        width: int,
        depth: int,
        heads: int,
        patch: int = 2,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        embed_dim: int = 64,
        levels: int = 4,
        map_lr_mult: float = 0.01,
    ):
        super().__init__()
        side = resolution // patch
        self.z_dim, self.num_classes, self.patch, self.channels = z_dim, num_classes, patch, channels
        self.register_buffer("tokens", sincos_2d(width, side)[None], persistent=False)
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.mapping = nn.Sequential(
            ScaledLinear(z_dim + (embed_dim if num_classes else 0), width, map_lr_mult),
            nn.SiLU(),
            ScaledLinear(width, width, map_lr_mult),
        )
        rope = RoPE2D(width // heads, side)
        self.blocks = nn.ModuleList(GBlock(width, heads, mlp_ratio, rope) for _ in range(depth))
        every = depth // levels
        self.taps = [(i + 1) * every - 1 for i in range(levels)]
        self.outputs = nn.ModuleList(Output(width, patch, channels) for _ in range(levels))
        _xavier(self.blocks)
        _xavier(self.outputs)
        for m in [*(b.ada for b in self.blocks), *(o.ada for o in self.outputs)]:
            nn.init.xavier_uniform_(m.weight, gain=0.1)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None, levels: bool = False):
        """Images (B, C, R, R); with `levels`, the list of partial sums (the last is the image)."""
        parts = [_normalise(z)]
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional vit G needs labels")
            parts.append(_normalise(self.embed(y)))
        w = self.mapping(torch.cat(parts, dim=1))
        x = self.tokens.to(w.dtype).expand(z.shape[0], -1, -1)
        out, image, taps = [], 0, iter(zip(self.taps, self.outputs))
        tap, head = next(taps)
        for i, block in enumerate(self.blocks):
            x = block(x, w)
            if i == tap:
                image = image + unpatchify(head(x, w), self.patch, self.channels)
                out.append(image)
                tap, head = next(taps, (-1, None))
        return out if levels else out[-1]


def group_std(h: torch.Tensor, group: int) -> torch.Tensor:
    """Minibatch standard deviation of tokens h (B, T, W): over groups of `group` consecutive samples (the
    largest divisor of B not above it), each channel's std of the RMS-normalised tokens, averaged over the
    tokens; (B, W), every sample given its group's."""
    b, t, w = h.shape
    g = max(d for d in range(1, min(group, b) + 1) if b % d == 0)
    x = F.rms_norm(h.float(), (w,), eps=1e-6).reshape(b // g, g, t, w)
    std = (x.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=1)  # (B / g, W)
    return std.repeat_interleave(g, dim=0).to(h.dtype)


class DBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, rope: RoPE2D):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.attn = SelfAttention(width, heads, rope)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.mlp = SwiGLU(width, mlp_ratio)
        self.scale_a = nn.Parameter(torch.full((width,), 0.1))
        self.scale_m = nn.Parameter(torch.full((width,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.scale_a
        return x + self.mlp(self.norm2(x)) * self.scale_m


class Discriminator(nn.Module):
    def __init__(
        self,
        channels: int,
        resolution: int,
        width: int,
        depth: int,
        heads: int,
        patch: int = 2,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        cmap: int = 256,
        class_map: bool = False,
        mbstd: int = 0,
        align_dim: int = 0,
        proj_dim: int = 2048,
    ):
        super().__init__()
        side = resolution // patch
        self.num_classes = num_classes
        self.patchify = nn.Conv2d(channels, width, patch, stride=patch)
        self.register_buffer("positions", sincos_2d(width, side)[None], persistent=False)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        rope = RoPE2D(width // heads, side, prefix=1)
        self.blocks = nn.ModuleList(DBlock(width, heads, mlp_ratio, rope) for _ in range(depth))
        self.head = nn.Sequential(nn.RMSNorm(width, eps=1e-6), nn.Linear(width, cmap))
        self.embed = nn.Embedding(max(num_classes, 1), cmap)
        self.mbstd = mbstd
        self.mbstd_map = nn.Linear(width, cmap, bias=False) if mbstd else None  # model.vit.mbstd
        self.embed_map = (
            nn.Sequential(ScaledLinear(cmap, cmap, 0.01), nn.SiLU(), ScaledLinear(cmap, cmap, 0.01))
            if class_map
            else None
        )
        # model.align.encoder (distgan/align.py): GAT's projector of the final tokens onto the encoder's features
        self.proj = (
            nn.Sequential(
                nn.Linear(width, proj_dim),
                nn.SiLU(),
                nn.Linear(proj_dim, proj_dim),
                nn.SiLU(),
                nn.Linear(proj_dim, align_dim),
            )
            if align_dim
            else None
        )
        _xavier(self)  # (ScaledLinear keeps its own initialisation: it is no nn.Linear)
        # GAT's 0.02; without the mapping, a projection of norm about 1 after the 1 / sqrt(cmap)
        nn.init.normal_(self.embed.weight, std=0.02 if class_map else 0.02 * math.sqrt(cmap))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, features: bool = False):
        """Logits (B,); with `features` also the projected final tokens (class (B, A), patches (B, T, A))."""
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.positions.to(x.dtype)
        h = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        if self.num_classes and y is None:
            raise ValueError("a conditional vit D needs labels")
        e = self.embed(y if self.num_classes else torch.zeros_like(x[:, 0, 0, 0], dtype=torch.long))
        feat = self.head(h[:, 0])
        if self.mbstd_map is not None:
            feat = feat + self.mbstd_map(group_std(h, self.mbstd))
        if self.embed_map is None:
            logits = (feat * e.to(feat.dtype)).sum(dim=1).float() / math.sqrt(feat.shape[1])
        else:
            logits = (feat * self.embed_map(e).to(feat.dtype)).sum(dim=1).float()
        if not features:
            return logits
        if self.proj is None:
            raise ValueError("this vit D was built without a projector (model.align.encoder)")
        return logits, (self.proj(h[:, 0]), self.proj(h[:, 1:]))
