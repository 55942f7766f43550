"""Modules with the structure, attribute names and class names of R3GAN's networks (brownvc/R3GAN:
training.networks.Generator/Discriminator wrapping R3GAN.Networks' stages and blocks), written for the
tests from the architecture's description, and a snapshot pickled the way R3GAN's training loop
pickles one (a dict of G, D, G_ema, training_set_kwargs, cur_nimg and both Adam states). The classes
live under R3GAN's module names only while `snapshot` pickles them; distgan never imports them.

The forward passes resample in the textbook way (zeros inserted, then the 4x4 filter; filter, then
every second pixel), not as distgan does, so a match is a check of both.
"""

from __future__ import annotations

import contextlib
import copy
import math
import pickle
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

GAIN = math.sqrt(2 / (1 + 0.2**2))


def _kernel() -> torch.Tensor:
    t = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(t, t)
    return k / k.sum()


def _msr(layer, gain=1.0):
    fan_in = layer.weight.shape[1] * layer.weight[0][0].numel()
    layer.weight.data.normal_(0, gain / math.sqrt(fan_in))
    return layer


class Convolution(nn.Module):
    def __init__(self, c_in, c_out, k, groups=1, gain=1.0):
        super().__init__()
        self.Layer = _msr(nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2, groups=groups, bias=False), gain)

    def forward(self, x):
        return F.conv2d(x, self.Layer.weight.to(x.dtype), padding=self.Layer.padding, groups=self.Layer.groups)


class BiasedActivation(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.Bias = nn.Parameter(torch.randn(n) * 0.1)  # random: the test checks where biases land

    def forward(self, x):
        return F.leaky_relu(x + self.Bias.to(x.dtype).view(1, -1, 1, 1), 0.2)


class ResidualBlock(nn.Module):
    def __init__(self, c, card, expansion, total):
        super().__init__()
        gain = GAIN * total ** (-1 / 4)
        self.LinearLayer1 = Convolution(c, c * expansion, 1, gain=gain)
        self.LinearLayer2 = Convolution(c * expansion, c * expansion, 3, groups=card, gain=gain)
        self.LinearLayer3 = Convolution(c * expansion, c, 1, gain=1.0)  # random, not zero: a real check
        self.NonLinearity1 = BiasedActivation(c * expansion)
        self.NonLinearity2 = BiasedActivation(c * expansion)

    def forward(self, x):
        y = self.NonLinearity1(self.LinearLayer1(x))
        y = self.NonLinearity2(self.LinearLayer2(y))
        return x + self.LinearLayer3(y)


class InterpolativeUpsamplerCUDA(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("Kernel", _kernel())

    def forward(self, x):
        n, c, h, w = x.shape
        up = torch.zeros(n, c, 2 * h, 2 * w, dtype=x.dtype)
        up[:, :, ::2, ::2] = x
        up = F.pad(up, (2, 1, 2, 1))
        k = (4 * self.Kernel).to(x.dtype).expand(c, 1, 4, 4)
        return F.conv2d(up, k, groups=c)


class InterpolativeDownsamplerCUDA(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("Kernel", _kernel())

    def forward(self, x):
        c = x.shape[1]
        y = F.conv2d(F.pad(x, (1, 2, 1, 2)), self.Kernel.to(x.dtype).expand(c, 1, 4, 4), groups=c)
        return y[:, :, ::2, ::2]


class UpsampleLayer(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.Resampler = InterpolativeUpsamplerCUDA()
        if c_in != c_out:
            self.LinearLayer = Convolution(c_in, c_out, 1)

    def forward(self, x):
        return self.Resampler(self.LinearLayer(x) if hasattr(self, "LinearLayer") else x)


class DownsampleLayer(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.Resampler = InterpolativeDownsamplerCUDA()
        if c_in != c_out:
            self.LinearLayer = Convolution(c_in, c_out, 1)

    def forward(self, x):
        x = self.Resampler(x)
        return self.LinearLayer(x) if hasattr(self, "LinearLayer") else x


class GenerativeBasis(nn.Module):
    def __init__(self, n_in, c):
        super().__init__()
        self.Basis = nn.Parameter(torch.randn(c, 4, 4))
        self.LinearLayer = _msr(nn.Linear(n_in, c, bias=False))

    def forward(self, x):
        return self.Basis.view(1, -1, 4, 4) * self.LinearLayer(x).view(x.shape[0], -1, 1, 1)


class DiscriminativeBasis(nn.Module):
    def __init__(self, c, out):
        super().__init__()
        self.Basis = _msr(nn.Conv2d(c, c, 4, groups=c, bias=False))
        self.LinearLayer = _msr(nn.Linear(c, out, bias=False))

    def forward(self, x):
        return self.LinearLayer(self.Basis(x).view(x.shape[0], -1))


class GeneratorStage(nn.Module):
    def __init__(self, transition, blocks, dtype=torch.float32):
        super().__init__()
        self.Layers = nn.ModuleList([transition, *blocks])
        self.DataType = dtype

    def forward(self, x):
        x = x.to(self.DataType)
        for layer in self.Layers:
            x = layer(x)
        return x


class DiscriminatorStage(GeneratorStage):
    def __init__(self, blocks, transition, dtype=torch.float32):
        nn.Module.__init__(self)
        self.Layers = nn.ModuleList([*blocks, transition])
        self.DataType = dtype


class NetworksGenerator(nn.Module):
    def __init__(self, z_dim, widths, cards, blocks, expansion, c_dim=0, embed=0, bf16=()):
        super().__init__()
        total = sum(blocks)
        stages = []
        for s, (w, card, b) in enumerate(zip(widths, cards, blocks)):
            transition = GenerativeBasis(z_dim + embed, w) if s == 0 else UpsampleLayer(widths[s - 1], w)
            body = [ResidualBlock(w, card, expansion, total) for _ in range(b)]
            stages.append(GeneratorStage(transition, body, torch.bfloat16 if s in bf16 else torch.float32))
        self.MainLayers = nn.ModuleList(stages)
        self.AggregationLayer = Convolution(widths[-1], 3, 1)
        if c_dim:
            self.EmbeddingLayer = _msr(nn.Linear(c_dim, embed, bias=False))

    def forward(self, x, y=None):
        if hasattr(self, "EmbeddingLayer"):
            x = torch.cat([x, self.EmbeddingLayer(y)], dim=1)
        for layer in self.MainLayers:
            x = layer(x)
        return self.AggregationLayer(x)


class NetworksDiscriminator(nn.Module):
    def __init__(self, widths, cards, blocks, expansion, c_dim=0, embed=0, bf16=()):
        """`widths` etc. in D's order (highest resolution first), as R3GAN's train.py passes them."""
        super().__init__()
        total = sum(blocks)
        stages = []
        for s, (w, card, b) in enumerate(zip(widths, cards, blocks)):
            body = [ResidualBlock(w, card, expansion, total) for _ in range(b)]
            last = s == len(widths) - 1
            transition = DiscriminativeBasis(w, embed if c_dim else 1) if last else DownsampleLayer(w, widths[s + 1])
            stages.append(DiscriminatorStage(body, transition, torch.bfloat16 if s in bf16 else torch.float32))
        self.ExtractionLayer = Convolution(3, widths[0], 1)
        self.MainLayers = nn.ModuleList(stages)
        if c_dim:
            self.EmbeddingLayer = _msr(nn.Linear(c_dim, embed, bias=False), 1 / math.sqrt(embed))

    def forward(self, x, y=None):
        x = self.ExtractionLayer(x.to(self.MainLayers[0].DataType))
        for layer in self.MainLayers:
            x = layer(x)
        if hasattr(self, "EmbeddingLayer"):
            x = (x * self.EmbeddingLayer(y)).sum(dim=1, keepdim=True)
        return x.view(x.shape[0])


class Generator(nn.Module):  # training.networks.Generator
    def __init__(self, z_dim, widths, cards, blocks, expansion, c_dim, resolution, bf16=()):
        super().__init__()
        self.Model = NetworksGenerator(z_dim, widths, cards, blocks, expansion, c_dim, z_dim if c_dim else 0, bf16)
        self.z_dim, self.c_dim, self.img_resolution = z_dim, c_dim, resolution

    def forward(self, x, c):
        return self.Model(x, c)


class Discriminator(nn.Module):  # training.networks.Discriminator
    def __init__(self, widths, cards, blocks, expansion, c_dim, bf16=()):
        super().__init__()
        self.Model = NetworksDiscriminator(widths, cards, blocks, expansion, c_dim, widths[-1] if c_dim else 0, bf16)

    def forward(self, x, c):
        return self.Model(x, c)


MODULES = {
    "training.networks": (Generator, Discriminator),
    "R3GAN.Networks": (
        Convolution,
        ResidualBlock,
        UpsampleLayer,
        DownsampleLayer,
        GenerativeBasis,
        DiscriminativeBasis,
        GeneratorStage,
        DiscriminatorStage,
    ),
    "R3GAN.Resamplers": (InterpolativeUpsamplerCUDA, InterpolativeDownsamplerCUDA),
    "R3GAN.FusedOperators": (BiasedActivation,),
}
NAMES = {NetworksGenerator: "Generator", NetworksDiscriminator: "Discriminator"}
MODULES["R3GAN.Networks"] += (NetworksGenerator, NetworksDiscriminator)


def networks(z_dim=8, widths=(6, 9, 3), cards=(3, 3, 1), blocks=(1, 2, 1), expansion=3, c_dim=0, bf16=(), seed=0):
    """G and D of R3GAN's structure, G's lists in G's order (4x4 first), as its train.py builds them."""
    torch.manual_seed(seed)
    resolution = 4 * 2 ** (len(widths) - 1)
    G = Generator(z_dim, list(widths), list(cards), list(blocks), expansion, c_dim, resolution, bf16)
    d_bf16 = tuple(len(widths) - 1 - s for s in bf16)
    D = Discriminator(list(widths)[::-1], list(cards)[::-1], list(blocks)[::-1], expansion, c_dim, d_bf16)
    return G, D


def _adam_state(module: nn.Module) -> dict:
    opt = torch.optim.Adam(module.parameters(), lr=2e-4, betas=(0.0, 0.99))
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in module.parameters():
        p.grad = None
    return copy.deepcopy(opt.state_dict())


@contextlib.contextmanager
def registered():
    """The classes above under R3GAN's module and class names (training.networks.Generator, ...), as
    importable modules, for the length of the block: what pickle needs to write or read them."""
    names = sorted({".".join(m.split(".")[: i + 1]) for m in MODULES for i in range(m.count(".") + 1)})
    saved_modules = {name: sys.modules.get(name) for name in names}
    saved_names = {cls: (cls.__module__, cls.__qualname__) for classes in MODULES.values() for cls in classes}
    try:
        for name in names:  # parents first: training, then training.networks
            sys.modules[name] = types.ModuleType(name)
            if "." in name:
                parent, child = name.rsplit(".", 1)
                setattr(sys.modules[parent], child, sys.modules[name])
        for module, classes in MODULES.items():
            for cls in classes:
                cls.__module__, cls.__qualname__ = module, NAMES.get(cls, cls.__name__)
                setattr(sys.modules[module], cls.__qualname__, cls)
        yield
    finally:
        for name, old in saved_modules.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
        for cls, (module, name) in saved_names.items():
            cls.__module__, cls.__qualname__ = module, name


def snapshot(path, G, D, cur_nimg=123_000, with_optimizers=True) -> None:
    """Pickle {G, D, G_ema, training_set_kwargs, cur_nimg, G_opt_state, D_opt_state} as R3GAN's training
    loop does (plain pickle.dump of the modules), under R3GAN's module and class names."""
    G_ema = copy.deepcopy(G).eval()
    with torch.no_grad():
        for p in G_ema.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differs from G, so the test sees which one it got
    data = {"G": G, "D": D, "G_ema": G_ema, "training_set_kwargs": {"path": "x.zip", "resolution": 16}}
    data["cur_nimg"] = cur_nimg
    if with_optimizers:
        data["G_opt_state"], data["D_opt_state"] = _adam_state(G), _adam_state(D)
    with registered(), open(path, "wb") as f:
        pickle.dump(data, f)


def load_as_r3gan(path):
    """The snapshot's modules as R3GAN's own code would load them: plain pickle.load, the classes
    registered under R3GAN's names for this load only."""
    with registered(), open(path, "rb") as f:
        return pickle.load(f)
