"""A classifier of two real image domains (cyclegan's A and B), to judge translated images.

A small CNN (two conv layers, global pooling, a linear layer) is trained once on the real
training images of both domains (at most 5000 each, the shards of data.shards_a and
data.shards_b) and cached as a safetensors file under $DISTGAN_CACHE/eval, keyed by the two
shard sources. Its accuracy on the held-out real images is reported next to its verdicts.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def _net(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    )


class DomainClassifier:
    def __init__(self, net: nn.Module):
        self.net = net.eval()

    @classmethod
    def for_config(cls, cfg, epochs: int = 15) -> DomainClassifier:
        from safetensors.torch import load_file, save_file

        from distgan.data import stream
        from distgan.files import cache_root

        sources = [
            stream.resolve(s, progress=False, key=f"data.shards_{k}")
            for k, s in (("a", cfg.data.shards_a), ("b", cfg.data.shards_b))
        ]
        ident = json.dumps([[s.urls, (s.manifest or {}).get("count")] for s in sources], sort_keys=True)
        key = hashlib.sha1(f"{ident}|{cfg.data.resolution}|{cfg.data.channels}|{epochs}".encode()).hexdigest()[:16]
        path = cache_root() / "eval" / f"domains-{key}.safetensors"
        net = _net(cfg.data.channels)
        if path.is_file():
            net.load_state_dict(load_file(str(path)))
            return cls(net)
        x = [
            stream.read_all(
                s,
                resolution=cfg.data.resolution,
                channels=cfg.data.channels,
                limit=5000,
                options=stream.stream_options(cfg),
            )["image"]
            for s in sources
        ]
        data = torch.cat(x)
        labels = torch.cat([torch.zeros(len(x[0]), dtype=torch.long), torch.ones(len(x[1]), dtype=torch.long)])
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = _net(cfg.data.channels)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(data), generator=gen).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(net(data[idx]), labels[idx]).backward()
                opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
        tmp.replace(path)
        return cls(net)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(images[i : i + 256].float().cpu()).argmax(1) for i in range(0, len(images), 256)])

    def accuracy(self, a: torch.Tensor, b: torch.Tensor) -> float:
        correct = (self.predict(a) == 0).sum() + (self.predict(b) == 1).sum()
        return float(correct) / (len(a) + len(b))
