"""Image-to-image networks: pix2pix's U-Net and PatchGAN, CycleGAN's ResNet generator, SRGAN's
SRResNet and discriminator, and a VGG19 feature extractor for SRGAN's perceptual loss.

All generators map (B, C_in, H, W) images in [-1, 1] to (B, C_out, H', W') images in [-1, 1]
(SRResNet: H' = scale x H). Discriminators return logits: a map of patch logits (B, 1, h, w)
for PatchGAN, one logit per image (B,) for the SRGAN discriminator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from distgan import files
from distgan.errors import UserError

GENERATORS = ("unet", "resnet", "srresnet")
DISCRIMINATORS = ("patchgan", "srgan")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    return nn.Identity()


class _UNetBlock(nn.Module):
    """down -> [inner] -> up, with the input concatenated to the output (the skip)."""

    def __init__(
        self,
        outer: int,
        inner: int,
        in_ch: int,
        sub: nn.Module | None,
        outermost: bool,
        out_ch: int,
        norm: str,
        dropout: bool,
    ):
        super().__init__()
        down = [nn.Conv2d(in_ch, inner, 4, 2, 1, bias=norm != "batch")]
        if not outermost:
            down = [nn.LeakyReLU(0.2, True), *down]
        innermost = sub is None
        if not outermost and not innermost:
            down.append(_norm(norm, inner))
        up_in = inner if innermost else inner * 2
        up = [nn.ReLU(True), nn.ConvTranspose2d(up_in, out_ch if outermost else outer, 4, 2, 1)]
        if outermost:
            up.append(nn.Tanh())
        else:
            up.append(_norm(norm, outer))
            if dropout:
                up.append(nn.Dropout(0.5))
        self.outermost = outermost
        self.model = nn.Sequential(*down, *([sub] if sub is not None else []), *up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y if self.outermost else torch.cat([x, y], 1)


class UNet(nn.Module):
    """pix2pix's U-Net generator (Isola et al. 2017): log2(resolution) stride-2 downsamplings to
    1 x 1, mirrored by transposed convolutions, with skip connections between mirrored layers;
    widths width * (1, 2, 4, 8, 8, ...); dropout in the three innermost decoder blocks."""

    def __init__(self, in_channels: int, out_channels: int, resolution: int, width: int = 64, norm: str = "batch"):
        super().__init__()
        depth = int(math.log2(resolution))
        if 2**depth != resolution or depth < 2:
            raise UserError(f"the U-Net needs data.resolution a power of 2 (>= 4); got {resolution}")
        widths = [width * min(2**i, 8) for i in range(depth)]
        block = None
        for i in reversed(range(1, depth)):
            dropout = depth - 4 <= i <= depth - 2  # the 3 blocks around the innermost, as in pix2pix
            block = _UNetBlock(widths[i - 1], widths[i], widths[i - 1], block, False, 0, norm, dropout)
        self.net = _UNetBlock(0, widths[0], in_channels, block, True, out_channels, norm, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ResBlock(nn.Module):
    def __init__(self, ch: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            _norm(norm, ch),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(ch, ch, 3),
            _norm(norm, ch),
        )

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's generator (Zhu et al. 2017, after Johnson et al. 2016): c7s1-w, two stride-2
    downsamplings, `blocks` residual blocks, two upsamplings, c7s1-C, tanh; instance norm."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64, blocks: int = 6, norm: str = "instance"):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, width, 7), _norm(norm, width), nn.ReLU(True)]
        ch = width
        for _ in range(2):
            layers += [nn.Conv2d(ch, ch * 2, 3, 2, 1), _norm(norm, ch * 2), nn.ReLU(True)]
            ch *= 2
        layers += [_ResBlock(ch, norm) for _ in range(blocks)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1), _norm(norm, ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchGAN(nn.Module):
    """The PatchGAN discriminator of pix2pix/CycleGAN: `layers` stride-2 4x4 convs (widths
    width * 1, 2, 4, ... up to 8x), one stride-1 conv, then a 1-channel conv: a logit per
    overlapping patch (70 x 70 pixels with layers=3)."""

    def __init__(self, in_channels: int, width: int = 64, layers: int = 3, norm: str = "batch"):
        super().__init__()
        seq = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for i in range(1, layers + 1):
            nxt = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(ch, nxt, 4, stride, 1, bias=norm == "none"), _norm(norm, nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _SRBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch), nn.PReLU(ch), nn.Conv2d(ch, ch, 3, 1, 1), nn.BatchNorm2d(ch)
        )

    def forward(self, x):
        return x + self.body(x)


class SRResNet(nn.Module):
    """SRGAN's generator (Ledig et al. 2017): 9x9 conv + PReLU, `blocks` residual blocks (conv-BN-
    PReLU-conv-BN), conv-BN with a long skip, log2(scale) sub-pixel (PixelShuffle x2) upsamplings,
    a 9x9 conv to the image. Output is not squashed; samples are clamped to [-1, 1].

    One change from the paper: the network predicts the residual over bicubic upscaling of its
    input (global residual learning, as VDSR and most later SR networks), with the last conv
    starting at zero, so an untrained G already equals bicubic and training only adds detail.
    Short runs (a CPU, a few thousand steps) then beat bicubic instead of first relearning it."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 4, width: int = 64, blocks: int = 16):
        super().__init__()
        self.scale = scale
        self.residual = in_channels == out_channels
        self.head = nn.Sequential(nn.Conv2d(in_channels, width, 9, 1, 4), nn.PReLU(width))
        self.body = nn.Sequential(
            *[_SRBlock(width) for _ in range(blocks)], nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width)
        )
        up = []
        for _ in range(int(math.log2(scale))):
            up += [nn.Conv2d(width, width * 4, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(width)]
        self.tail = nn.Sequential(*up, nn.Conv2d(width, out_channels, 9, 1, 4))
        if self.residual:
            nn.init.zeros_(self.tail[-1].weight)
            nn.init.zeros_(self.tail[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        out = self.tail(h + self.body(h))
        if self.residual:
            up = nn.functional.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
            out = out + up
        return out


class SRDiscriminator(nn.Module):
    """SRGAN's discriminator: 3x3 convs with LeakyReLU, BatchNorm after the first, widths
    width * (1, 1, 2, 2, 4, 4, 8, 8), every second one stride 2; then global average pooling (so
    any crop size works), a 16*width dense layer and the logit."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        seq, ch = [], in_channels
        for i, mult in enumerate((1, 1, 2, 2, 4, 4, 8, 8)):
            seq += [nn.Conv2d(ch, width * mult, 3, 1 + i % 2, 1)]
            if i:
                seq.append(nn.BatchNorm2d(width * mult))
            seq.append(nn.LeakyReLU(0.2, True))
            ch = width * mult
        self.features = nn.Sequential(*seq)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(ch, width * 16),
            nn.LeakyReLU(0.2, True),
            nn.Linear(width * 16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).flatten()


# torchvision's vgg19().features layout: conv widths, "M" = max-pool. Layer indices match its
# state dict (features.N.weight), so a local torchvision VGG19 weights file loads as is.
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGGFeatures(nn.Module):
    """VGG19 features up to relu5_4 (SRGAN's "VGG54"), frozen, for the perceptual loss. Inputs in
    [-1, 1] are mapped to ImageNet normalisation; grayscale is repeated to RGB."""

    def __init__(self, weights_path: str):
        super().__init__()
        layers, ch = [], 3
        for v in VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU(True)]
                ch = v
        self.features = nn.Sequential(*layers[:36])  # through relu5_4
        self.load(weights_path)
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def load(self, path: str) -> None:
        state = files.read_state_dict(path, "variant.vgg_weights (a torchvision VGG19 state dict)")
        state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        own = self.features.state_dict()
        missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if missing:
            raise UserError(
                f"variant.vgg_weights: '{path}' is not a torchvision VGG19 state dict (features.{missing[0]} "
                "missing or of another shape)"
            )
        self.features.load_state_dict({k: state[k] for k in own})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() + 1) / 2
        if x.size(1) == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.features((x - self.mean) / self.std)


def build_generator(cfg, in_channels: int, out_channels: int, norm: str = "batch") -> nn.Module:
    g = cfg.model.g
    if g.arch == "unet":
        return UNet(in_channels, out_channels, cfg.data.resolution, g.width, norm)
    if g.arch == "resnet":
        return ResnetGenerator(in_channels, out_channels, g.width, g.blocks, norm)
    if g.arch == "srresnet":
        return SRResNet(in_channels, out_channels, cfg.variant.scale, g.width, g.blocks)
    raise UserError(
        f"config key 'model.g.arch' must be one of {', '.join(GENERATORS)} for variant "
        f"'{cfg.variant.name}'; got '{g.arch}'"
    )


def build_discriminator(cfg, in_channels: int, norm: str = "batch") -> nn.Module:
    d = cfg.model.d
    if d.arch == "patchgan":
        D = PatchGAN(in_channels, d.width, d.layers, "none" if d.spectral_norm else norm)
    elif d.arch == "srgan":
        D = SRDiscriminator(in_channels, d.width)
    else:
        raise UserError(
            f"config key 'model.d.arch' must be one of {', '.join(DISCRIMINATORS)} for variant "
            f"'{cfg.variant.name}'; got '{d.arch}'"
        )
    if d.spectral_norm:
        from distgan.models.layers import apply_spectral_norm

        apply_spectral_norm(D, cfg.train.sn_scale)
    return D
