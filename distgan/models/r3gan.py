"""R3GAN's networks (Huang et al. 2024, "The GAN is dead; long live the GAN!"): a modernised ResNet of
ResNeXt-style blocks with no normalisation.

Block: 1x1 conv (C -> E*C), bias + leaky ReLU 0.2, grouped 3x3 conv (E*C -> E*C, `cardinality`
groups), bias + leaky ReLU, 1x1 conv (E*C -> C) starting at zero, residual add. Convolutions have no
bias of their own; weights start as N(0, gain^2 / fan_in) (MSR), the block's two first layers with
gain sqrt(2 / (1 + 0.2^2)) * L^(-1/4) where L is the number of blocks in the network (the
variance-scaling rule L^(-1/(2m-2)) for m = 3 layers per block), so a fresh block is the identity.

G: a learned 4x4 basis times a linear function of z (concatenated with a class embedding of the
one-hot label when conditional); then per stage a transition (a 1x1 conv when the width changes,
then a x2 upsample with the [1,2,1] interpolation filter) and its blocks; a 1x1 conv to the image
channels. No tanh: images come out near [-1, 1] because training makes them so (as in R3GAN).
D mirrors it: a 1x1 conv from the image, per stage its blocks then a transition (x2 downsample, then
a 1x1 conv when the width changes); the last stage ends in a depthwise 4x4 conv (the discriminative
basis) and a linear layer to one logit, or, when conditional, to an embedding that is projected on
the class embedding of the label.

Widths, cardinalities and blocks are listed per stage from 4x4 upwards (G's order); D takes them
reversed. `fp32_stages`: that many of the lowest-resolution stages compute in fp32 even under
mixed precision (R3GAN keeps its 4x4 and 8x8 stages in fp32 and runs the others in bf16); without
mixed precision every stage is fp32. `grouped_conv` picks how the grouped 3x3 convolution runs
(`GroupedConv`). Everything is plain PyTorch that torch.compile fuses; nothing compiles at run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distgan.errors import UserError

SLOPE = 0.2
ACT_GAIN = math.sqrt(2 / (1 + SLOPE**2))
LAYERS_PER_BLOCK = 3
GROUPED_CONV = ("native", "block_diagonal", "auto")
# grouped_conv=auto: block-diagonal on CUDA at feature maps of at most this side, where a dense conv
# with zeros beats the grouped kernels (R3GAN2's authors measured it at 8x8 and 16x16)
AUTO_BLOCK_DIAGONAL_SIDE = 16


def check_resolution(resolution: int, key: str) -> None:
    if resolution < 8 or resolution & (resolution - 1):
        raise UserError(f"{key}=r3gan needs data.resolution a power of two >= 8; got {resolution}")


def stages_for(resolution: int) -> int:
    """Stages from 4x4 up to `resolution` (a power of two >= 8)."""
    check_resolution(resolution, "model.g.arch / model.d.arch")
    return int(math.log2(resolution)) - 1


def check_config(cfg) -> None:
    """model.r3gan against data.resolution and the other model keys (before anything is built)."""
    r = cfg.model.r3gan
    _check_lists(r.widths, r.cardinalities, r.blocks, cfg.data.resolution)
    for w, card in zip(r.widths, r.cardinalities):
        if (w * r.expansion) % card:
            raise UserError(
                f"model.r3gan: a stage of width {w} x expansion {r.expansion} = {w * r.expansion} channels cannot "
                f"be split into cardinality {card} groups"
            )
    if r.fp32_stages > len(r.widths):
        raise UserError(f"model.r3gan.fp32_stages={r.fp32_stages} exceeds the {len(r.widths)} stages")
    for side in ("g", "d"):
        m = getattr(cfg.model, side)
        if m.arch == "r3gan" and m.spectral_norm:
            raise UserError(f"model.{side}.spectral_norm does not apply to model.{side}.arch=r3gan (R3GAN has none)")


def msr_(weight: torch.Tensor, gain: float) -> torch.Tensor:
    """MSR (He) initialisation: N(0, gain^2 / fan_in), fan_in over a group's inputs and the kernel."""
    fan_in = weight.shape[1] * weight[0][0].numel()
    with torch.no_grad():
        return weight.normal_(0.0, gain / math.sqrt(fan_in))


def lowpass(taps: tuple[int, ...]) -> torch.Tensor:
    """The 2-D interpolation filter of a resampling by 2: `taps` convolved with [1, 1], outer product, sum 1."""
    t = torch.tensor(taps, dtype=torch.float64)
    t = F.conv1d(t.view(1, 1, -1), torch.ones(1, 1, 2, dtype=torch.float64), padding=1).flatten()
    k = torch.outer(t, t)
    return (k / k.sum()).float()


class Resample(nn.Module):
    """x2 up (a transposed conv with 4 x the filter, stride 2) or down (a strided conv) by a
    depthwise low-pass filter; the filter is a buffer, not a parameter."""

    def __init__(self, up: bool, taps: tuple[int, ...] = (1, 2, 1)):
        super().__init__()
        self.up, self.pad = up, len(taps) // 2
        self.register_buffer("kernel", lowpass(taps), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.kernel.to(x.dtype)[None, None]
        x = x.reshape(n * c, 1, h, w)
        if self.up:
            y = F.conv_transpose2d(x, 4 * k, stride=2, padding=self.pad)
        else:
            y = F.conv2d(x, k, stride=2, padding=self.pad)
        return y.reshape(n, c, y.shape[2], y.shape[3])


class Conv(nn.Module):
    """A bias-free conv whose weight follows the input's dtype (bf16 stages), MSR-initialised."""

    def __init__(self, c_in: int, c_out: int, kernel: int, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(msr_(torch.empty(c_out, c_in, kernel, kernel), gain))
        self.pad = (kernel - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.pad)


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight (C_out, C_in/g, k, k) as the dense (C_out, C_in, k, k) weight that is zero
    outside the g diagonal blocks: conv2d with it equals conv2d with `weight` and `groups`. Linear in
    `weight`, so its derivatives of every order are those of the grouped conv."""
    c_out, c_in_g, kh, kw = weight.shape
    blocks = weight.reshape(groups, c_out // groups, c_in_g, kh, kw)
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
    return torch.einsum("goikl,gh->gohikl", blocks, eye).reshape(c_out, groups * c_in_g, kh, kw)


class GroupedConv(nn.Module):
    """The block's grouped 3x3 conv. `mode` (model.grouped_conv): native (conv2d with groups),
    block_diagonal (a dense conv with the block-diagonal weight: more FLOPs, but the dense kernels are
    several times faster than the grouped ones for narrow groups at small feature maps on GPUs), or
    auto (block_diagonal on CUDA for maps of side <= AUTO_BLOCK_DIAGONAL_SIDE, else native). The
    same parameters, values and derivatives either way."""

    def __init__(self, channels: int, groups: int, kernel: int, gain: float, mode: str = "native"):
        super().__init__()
        if mode not in GROUPED_CONV:
            raise UserError(f"model.grouped_conv must be one of {', '.join(GROUPED_CONV)}; got '{mode}'")
        self.groups, self.mode, self.pad = groups, mode, (kernel - 1) // 2
        self.weight = nn.Parameter(msr_(torch.empty(channels, channels // groups, kernel, kernel), gain))

    def dense(self, x: torch.Tensor) -> bool:
        if self.mode == "auto":
            return x.is_cuda and x.shape[-1] <= AUTO_BLOCK_DIAGONAL_SIDE and self.groups > 1
        return self.mode == "block_diagonal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if self.dense(x):
            return F.conv2d(x, block_diagonal(w, self.groups), padding=self.pad)
        return F.conv2d(x, w, padding=self.pad, groups=self.groups)


def biased_lrelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x + bias.to(x.dtype).view(1, -1, 1, 1), SLOPE)


class Block(nn.Module):
    """The ResNeXt-style inverted bottleneck (see the module docstring)."""

    def __init__(self, channels: int, cardinality: int, expansion: int, total_blocks: int, grouped_conv: str):
        super().__init__()
        wide = channels * expansion
        if wide % cardinality:
            raise UserError(
                f"r3gan: a block of width {channels} x expansion {expansion} = {wide} channels cannot be split "
                f"into cardinality {cardinality} groups"
            )
        gain = ACT_GAIN * total_blocks ** (-1 / (2 * LAYERS_PER_BLOCK - 2))
        self.conv1 = Conv(channels, wide, 1, gain)
        self.bias1 = nn.Parameter(torch.zeros(wide))
        self.conv2 = GroupedConv(wide, cardinality, 3, gain, grouped_conv)
        self.bias2 = nn.Parameter(torch.zeros(wide))
        self.conv3 = Conv(wide, channels, 1, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = biased_lrelu(self.conv1(x), self.bias1)
        y = biased_lrelu(self.conv2(y), self.bias2)
        return x + self.conv3(y)


class Stage(nn.Module):
    """A transition and blocks; in fp32 regardless of autocast unless `low_precision`."""

    def __init__(self, transition: nn.Module, blocks: list[Block], transition_first: bool, low_precision: bool):
        super().__init__()
        self.transition, self.blocks = transition, nn.ModuleList(blocks)
        self.transition_first, self.low_precision = transition_first, low_precision

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.transition_first:
            x = self.transition(x)
        for block in self.blocks:
            x = block(x)
        return x if self.transition_first else self.transition(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_precision or x.is_meta or not torch.is_autocast_enabled(x.device.type):
            return self.run(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.run(x.float())


class GenerativeBasis(nn.Module):
    """G's first transition: a learned 4x4 basis per channel, scaled by a linear function of the input."""

    def __init__(self, features: int, channels: int):
        super().__init__()
        self.basis = nn.Parameter(torch.randn(channels, 4, 4))
        self.linear = nn.Linear(features, channels, bias=False)
        msr_(self.linear.weight, 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.basis.to(z.dtype)[None] * self.linear(z)[:, :, None, None]


class DiscriminativeBasis(nn.Module):
    """D's last transition: a depthwise 4x4 conv to one value per channel, then a linear layer."""

    def __init__(self, channels: int, out: int):
        super().__init__()
        self.basis = nn.Conv2d(channels, channels, 4, groups=channels, bias=False)
        msr_(self.basis.weight, 1.0)
        self.linear = nn.Linear(channels, out, bias=False)
        msr_(self.linear.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.conv2d(x, self.basis.weight.to(x.dtype), groups=x.shape[1]).flatten(1))


class Transition(nn.Module):
    """x2 resampling and a 1x1 conv when the width changes (G: conv then up; D: down then conv)."""

    def __init__(self, c_in: int, c_out: int, up: bool, taps: tuple[int, ...]):
        super().__init__()
        self.up = up
        self.resample = Resample(up, taps)
        self.conv = Conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.resample(self.conv(x) if self.conv is not None else x)
        x = self.resample(x)
        return self.conv(x) if self.conv is not None else x


def _widen(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 activations (mixed precision) out as fp32; fp32 and fp64 as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _check_lists(widths, cardinalities, blocks, resolution: int) -> None:
    n = stages_for(resolution)
    for key, value in (("widths", widths), ("cardinalities", cardinalities), ("blocks", blocks)):
        if len(value) != n:
            raise UserError(
                f"model.r3gan.{key} needs one entry per stage from 4x4 to {resolution}x{resolution} ({n}); "
                f"got {len(value)}: {list(value)}"
            )
        if any(v < 1 for v in value):
            raise UserError(f"model.r3gan.{key} entries must be >= 1; got {list(value)}")


class Generator(nn.Module):
    def __init__(
        self,
        z_dim: int,
        channels: int,
        resolution: int,
        widths: list[int],
        cardinalities: list[int],
        blocks: list[int],
        expansion: int = 2,
        num_classes: int = 0,
        embed_dim: int = 0,
        fp32_stages: int = 0,
        grouped_conv: str = "native",
        taps: tuple[int, ...] = (1, 2, 1),
    ):
        super().__init__()
        _check_lists(widths, cardinalities, blocks, resolution)
        self.z_dim, self.num_classes = z_dim, num_classes
        total = sum(blocks)
        embed_dim = embed_dim or z_dim
        self.embed = None
        if num_classes:
            self.embed = nn.Linear(num_classes, embed_dim, bias=False)
            msr_(self.embed.weight, 1.0)
        stages = []
        for s, (w, card, b) in enumerate(zip(widths, cardinalities, blocks)):
            if s == 0:
                transition = GenerativeBasis(z_dim + (embed_dim if num_classes else 0), w)
            else:
                transition = Transition(widths[s - 1], w, up=True, taps=taps)
            body = [Block(w, card, expansion, total, grouped_conv) for _ in range(b)]
            stages.append(Stage(transition, body, transition_first=True, low_precision=s >= fp32_stages))
        self.stages = nn.ModuleList(stages)
        self.to_image = Conv(widths[-1], channels, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional r3gan G needs labels")
            z = torch.cat([z, self.embed(F.one_hot(y, self.num_classes).to(z.dtype))], dim=1)
        x = z
        for stage in self.stages:
            x = stage(x)
        return _widen(self.to_image(x))


class Discriminator(nn.Module):
    def __init__(
        self,
        channels: int,
        resolution: int,
        widths: list[int],
        cardinalities: list[int],
        blocks: list[int],
        expansion: int = 2,
        num_classes: int = 0,
        embed_dim: int = 0,
        fp32_stages: int = 0,
        grouped_conv: str = "native",
        taps: tuple[int, ...] = (1, 2, 1),
    ):
        """`widths`, `cardinalities`, `blocks` in G's order (4x4 first); D runs them reversed."""
        super().__init__()
        _check_lists(widths, cardinalities, blocks, resolution)
        widths, cardinalities, blocks = widths[::-1], cardinalities[::-1], blocks[::-1]
        self.num_classes = num_classes
        total, n = sum(blocks), len(widths)
        embed_dim = embed_dim or widths[-1]
        self.from_image = Conv(channels, widths[0], 1)
        stages = []
        for s, (w, card, b) in enumerate(zip(widths, cardinalities, blocks)):
            body = [Block(w, card, expansion, total, grouped_conv) for _ in range(b)]
            if s < n - 1:
                transition = Transition(w, widths[s + 1], up=False, taps=taps)
            else:
                transition = DiscriminativeBasis(w, embed_dim if num_classes else 1)
            stages.append(Stage(transition, body, transition_first=False, low_precision=s < n - fp32_stages))
        self.stages = nn.ModuleList(stages)
        self.embed = None
        if num_classes:
            self.embed = nn.Linear(num_classes, embed_dim, bias=False)
            msr_(self.embed.weight, 1.0 / math.sqrt(embed_dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.from_image(x)
        for stage in self.stages:
            x = stage(x)
        x = _widen(x)
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional r3gan D needs labels")
            x = (x * self.embed(F.one_hot(y, self.num_classes).to(x.dtype))).sum(dim=1, keepdim=True)
        return x.flatten()


def forward_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Floating-point operations (a multiply-add is 2) of one forward of `model` on `inputs`, counted from
    the shapes each layer sees: convs 2 x output elements x (inputs per group x kernel area), linear
    layers 2 x in x out per row, resampling 2 x output elements x filter taps (per channel). Bias,
    activations and residual adds are left out. Runs on the meta device as well (no arithmetic done)."""
    total = 0

    def conv(weight: torch.Tensor, out: torch.Tensor) -> int:
        return 2 * out.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]

    def hook(module, args, out):
        nonlocal total
        if isinstance(module, (Conv, GroupedConv)):
            total += conv(module.weight, out)
        elif isinstance(module, DiscriminativeBasis):
            total += 2 * args[0].shape[0] * module.basis.weight.shape[0] * 16
        elif isinstance(module, nn.Linear):
            total += 2 * out.numel() * module.in_features
        elif isinstance(module, Resample):
            total += 2 * out.numel() * (module.kernel.numel() // (1 if not module.up else 4))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total // inputs[0].shape[0]
