"""BigGAN-style residual G and D (Miyato et al. 2018, SNGAN-ResNet; Brock et al. 2019, BigGAN).

G: z -> linear -> 4x4 map -> up-blocks -> BN -> ReLU -> conv3 -> tanh. An up-block is
BN -> ReLU -> nearest x2 -> conv3 -> BN -> ReLU -> conv3, plus a shortcut nearest x2 -> conv1.
`normalize=False` drops the BatchNorm statistics (R3GAN's G has no normalisation) and starts
every block's last conv at zero, so each block starts as its shortcut (Fixup-style init).
With `num_classes > 0` every BN is class-conditional: its gain (1 + g) and bias b are linear
functions of a class embedding shared by all blocks (BigGAN's shared embedding); with
`hierarchical` z is split into one chunk for the linear layer and one per block, each block's
chunk concatenated to the embedding (BigGAN's hierarchical latent). Unconditional: plain BN.

D: down-blocks (ReLU -> conv3 -> ReLU -> conv3 -> avg-pool 2, shortcut conv1 -> avg-pool 2; the
first block starts without the ReLU and pools before its shortcut conv, as in the papers), ReLU,
a sum over the positions h, a linear logit, and with `num_classes > 0` the projection term
<embed(y), h> (Miyato & Koyama 2018). With `minibatch=(kernels, dim)` the logit's linear layer
sees h and its minibatch-discrimination features (Salimans et al. 2016, kernels/ on the pairwise
L1), so D can tell a batch of near-duplicates from a varied one; the projection term keeps h.

Channel widths are `width` times BigGAN's multipliers for the resolution (32: the SNGAN/BigGAN
CIFAR layout, 4 x width throughout, D's last two blocks without pooling; 64-256: the ImageNet
layouts). `attention` is the resolution (0: none) after whose block a SAGAN self-attention layer
runs (Zhang et al. 2019). Spectral norm is not applied here: models.build_* apply it to every
conv and linear layer through kernels.spectral_norm_all when asked (model.g/d.spectral_norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgan.errors import UserError
from distgan.models import attention
from distgan.models.layers import MinibatchDiscrimination

# resolution -> (G's per-block output multipliers from 4x4 up, D's per-block output multipliers,
# D's per-block downsampling). G's first map has the first multiplier's width as well.
LAYOUTS = {
    32: ((4, 4, 4), (4, 4, 4, 4), (True, True, False, False)),
    64: ((16, 8, 4, 2), (1, 2, 4, 8, 16), (True, True, True, True, False)),
    128: ((16, 8, 4, 2, 1), (1, 2, 4, 8, 16, 16), (True, True, True, True, True, False)),
    256: ((16, 8, 8, 4, 2, 1), (1, 2, 4, 8, 8, 16, 16), (True, True, True, True, True, True, False)),
}
G_START = {32: 4, 64: 16, 128: 16, 256: 16}  # multiplier of the 4x4 map


def check_resolution(resolution: int, key: str) -> None:
    if resolution not in LAYOUTS:
        raise UserError(f"{key}=resnet supports data.resolution {', '.join(map(str, LAYOUTS))}; got {resolution}")


def init_weights(module: nn.Module) -> None:
    """Orthogonal init of every conv and linear weight (BigGAN's choice), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SelfAttention(nn.Module):
    """SAGAN's non-local block: theta, phi (pooled) with C/8 channels, g (pooled) with C/2,
    softmax attention over the pooled positions, a conv1 back to C, scaled by gamma (starts at 0)."""

    def __init__(self, channels: int):
        super().__init__()
        key, value = max(1, channels // 8), max(1, channels // 2)
        self.theta = nn.Conv2d(channels, key, 1, bias=False)
        self.phi = nn.Conv2d(channels, key, 1, bias=False)
        self.g = nn.Conv2d(channels, value, 1, bias=False)
        self.out = nn.Conv2d(value, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        theta = self.theta(x).flatten(2)  # (n, c/8, hw)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # (n, c/8, hw/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # (n, c/2, hw/4)
        # softmax(theta^T phi) over the pooled positions, unscaled as in SAGAN: (n, hw, c/2)
        o = attention.attend(theta.transpose(1, 2), phi.transpose(1, 2), g.transpose(1, 2), scale=1.0)
        o = o.transpose(1, 2).reshape(n, g.size(1), h, w)
        return x + self.gamma * self.out(o)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; gain 1 + W_g c and bias W_b c from a conditioning vector
    c (the class embedding, with hierarchical z its block's chunk too); plain affine BN without c.
    With `normalize=False` no statistics are taken (R3GAN's normalisation-free G); the class gain
    and bias stay."""

    def __init__(self, channels: int, cond_dim: int, normalize: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=cond_dim == 0) if normalize else nn.Identity()
        if cond_dim:
            self.gain = nn.Linear(cond_dim, channels, bias=False)
            self.bias = nn.Linear(cond_dim, channels, bias=False)
        self.cond_dim = cond_dim

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        out = self.bn(x)
        if not self.cond_dim:
            return out
        gain = 1 + self.gain(c).to(out.dtype)[:, :, None, None]
        return out * gain + self.bias(c).to(out.dtype)[:, :, None, None]


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cond_dim: int, normalize: bool = True):
        super().__init__()
        self.bn1 = ConditionalBatchNorm(cin, cond_dim, normalize)
        self.bn2 = ConditionalBatchNorm(cout, cond_dim, normalize)
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.normalize = normalize

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, c)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), c)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    def __init__(
        self,
        z_dim: int,
        channels: int,
        resolution: int,
        width: int = 64,
        num_classes: int = 0,
        embed_dim: int = 128,
        hierarchical: bool = False,
        attention: int = 0,
        normalize: bool = True,
    ):
        super().__init__()
        check_resolution(resolution, "model.g.arch")
        mults = LAYOUTS[resolution][0]
        self.z_dim, self.num_classes, self.hierarchical = z_dim, num_classes, hierarchical
        blocks = len(mults)
        if hierarchical:
            if z_dim % (blocks + 1):
                raise UserError(
                    f"model.g.hierarchical splits z into {blocks + 1} equal chunks at resolution {resolution}: "
                    f"model.g.z_dim={z_dim} is not a multiple of {blocks + 1}"
                )
            self.chunk = z_dim // (blocks + 1)
        else:
            self.chunk = 0
        cond_dim = (embed_dim + self.chunk) if num_classes else self.chunk
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        c0 = G_START[resolution] * width
        self.linear = nn.Linear(self.chunk or z_dim, c0 * 16)
        self.c0 = c0
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        cin, size = c0, 4
        for m in mults:
            self.blocks.append(UpBlock(cin, m * width, cond_dim, normalize))
            cin, size = m * width, size * 2
            if size == attention:
                self.attn[str(len(self.blocks) - 1)] = SelfAttention(cin)
        if attention and not len(self.attn):
            raise UserError(f"model.g.attention={attention} is not a block resolution of this G (8..{resolution})")
        self.out_bn = nn.BatchNorm2d(cin) if normalize else nn.Identity()
        self.out_conv = nn.Conv2d(cin, channels, 3, padding=1)
        init_weights(self)
        if (
            not normalize
        ):  # Fixup-style, as R3GAN: every residual branch starts at zero, each block the identity + shortcut
            for block in self.blocks:
                nn.init.zeros_(block.conv2.weight)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.hierarchical:
            chunks = z.split(self.chunk, dim=1)
            z, per_block = chunks[0], chunks[1:]
        else:
            per_block = [None] * len(self.blocks)
        e = self.embed(y).to(z.dtype) if self.embed is not None else None
        h = self.linear(z).view(z.size(0), self.c0, 4, 4)
        for i, block in enumerate(self.blocks):
            parts = [t for t in (e, per_block[i]) if t is not None]
            h = block(h, torch.cat(parts, dim=1) if parts else None)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, down: bool, first: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else None
        self.down, self.first = down, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # the optimized first block: pool, then the 1x1 conv
            s = self.shortcut(F.avg_pool2d(s, 2) if self.down else s)
        else:
            if self.shortcut is not None:
                s = self.shortcut(s)
            if self.down:
                s = F.avg_pool2d(s, 2)
        return h + s


class Discriminator(nn.Module):
    def __init__(
        self, channels: int, resolution: int, width: int = 64, minibatch=None, num_classes: int = 0, attention: int = 0
    ):
        super().__init__()
        check_resolution(resolution, "model.d.arch")
        _, mults, downs = LAYOUTS[resolution]
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        cin, size = channels, resolution
        for i, (m, down) in enumerate(zip(mults, downs)):
            self.blocks.append(DownBlock(cin, m * width, down, first=i == 0))
            cin, size = m * width, size // 2 if down else size
            if size == attention and not len(self.attn):
                self.attn[str(i)] = SelfAttention(cin)
        if attention and not len(self.attn):
            raise UserError(f"model.d.attention={attention} is not a block resolution of this D")
        self.features = cin
        # minibatch discrimination (num_kernels, kernel_dim) on the pooled features, before the logit; the
        # projection term keeps the pooled features alone
        self.mbd = MinibatchDiscrimination(cin, *minibatch) if minibatch else None
        self.linear = nn.Linear(self.mbd.out_features if self.mbd else cin, 1)
        self.embed = nn.Embedding(num_classes, cin) if num_classes else None
        init_weights(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        h = F.relu(h).sum(dim=(2, 3))
        out = self.linear(self.mbd(h) if self.mbd is not None else h).flatten()
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional resnet D needs the labels y")
            out = out + (self.embed(y).to(h.dtype) * h).sum(dim=1)
        return out


def orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """BigGAN's off-diagonal orthogonal regularisation: sum over every conv and linear weight W
    (flattened to rows = output channels) of ||W W^T * (1 - I)||_F^2 (Brock et al. 2019, eq. 3;
    the caller multiplies by beta). Under spectral norm it is the raw (unnormalised) weight."""
    total = None
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = _raw_weight(m).flatten(1)
            gram = w @ w.t()
            term = (gram * (1 - torch.eye(gram.size(0), device=w.device, dtype=w.dtype))).square().sum()
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def _raw_weight(m: nn.Module) -> torch.Tensor:
    p = getattr(m, "parametrizations", None)
    if p is not None and "weight" in p:
        return p["weight"].original
    return m.weight
