"""The one evaluation path of `distgan eval` and of train.eval_every.

Given the metric names that apply (metrics.applicable), `measure` computes the standard ones
(FID/KID/IS/precision-recall, metrics/standard.py) on Inception features, every rank taking its
chunks of the samples, and the others (digits, modes, SWD ..., metrics/__init__.py) on samples drawn
on the main rank. `Inception` holds the network and the reference statistics, loaded once: a run
evaluates many times. Image-to-image variants have their own measures (`variant.evaluate`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from distgan import metrics


@dataclass
class Inception:
    """The standard metrics' feature network and reference statistics (and where they came from)."""

    net: object  # metrics.inception.FeatureNet
    ref: object  # metrics.standard.RefStats
    origin: str

    @classmethod
    def load(cls, cfg, path: str, device, split, ref: str | None = None, limit: int = 0, say: bool = False):
        """The network of file `path` on `device`, and the reference statistics: the file `ref`
        (`distgan stats`, checked before any Inception work), else those of the run's shards (the
        cached ones, or computed over the ranks of `split`, the first `limit` images; 0: all)."""
        from distgan.data import stream
        from distgan.metrics import inception, standard

        if cfg.data.kind == "latents" and not ref:
            from distgan.errors import UserError

            raise UserError(
                "latent shards hold no images to take reference statistics from: compute them from the image "
                "shards the latents were encoded from (distgan stats --shards IMAGES --inception FILE --out REF) "
                "and pass them (train.eval_ref=REF, or --ref REF to distgan eval)"
            )
        stats = standard.RefStats.load(ref) if ref else None
        net = inception.FeatureNet(path, device=device)
        if stats is not None:
            return cls(net, stats, f"--ref {ref}")
        stats, origin = standard.reference_stats(
            cfg.data.shards,
            resolution=cfg.data.resolution,
            channels=cfg.data.channels,
            net=net,
            split=split,
            limit=limit,
            options=stream.stream_options(cfg),
        )
        if say:
            print(f"eval: reference statistics: {origin}", file=sys.stderr)
        return cls(net, stats, origin)

    def describe(self, split) -> dict:
        """What the report says of the standard metrics' inputs."""
        return {
            "feature_space": self.net.describe(),
            "reference": f"{self.ref.meta.get('shards', '?')}: {self.ref.n or '?'} real images ({self.origin})",
            "n_ref": self.ref.n,
            "computed": f"{split.describe()}; preprocessing as {self.net.kind}",
        }


def split_names(names: list[str], inception: bool) -> tuple[list[str], list[str]]:
    """(the standard metrics among `names`, which need the Inception network; the rest)."""
    standard = [m for m in names if m in metrics.STANDARD] if inception else []
    return standard, [m for m in names if m not in standard]


def draw(variant, G, n: int, seed: int, labels=None, bar=None) -> torch.Tensor:
    """n samples on the host, in chunks of 1024 from one generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    chunks, done = [], 0
    with torch.no_grad():
        while done < n:
            k = min(1024, n - done)
            y = labels[done : done + k] if labels is not None else None
            chunks.append(variant.sample(G, k, generator=gen, labels=y).cpu())
            done += k
            if bar is not None:
                bar.update(k)
    return torch.cat(chunks)


def measure(
    cfg,
    variant,
    G,
    names: list[str],
    *,
    n: int,
    seed: int,
    split,
    manifest: dict | None,
    inception: Inception | None = None,
    main: bool = True,
    samples: torch.Tensor | None = None,
    features: str | None = None,
    reference: torch.Tensor | None = None,
    bar=None,
) -> dict:
    """The metrics `names` of G's samples: the standard ones with `inception` (every rank its share of
    n samples from `seed`, split by `split`; every rank gets them), the rest on the main rank, of
    `samples` when given (e.g. kept by rejection sampling) else of n drawn from `seed`. `features` (a
    TorchScript file) and `reference` (images) are `distgan eval`'s --features and --heldout."""
    from distgan.metrics import standard as standard_metrics

    standard, rest = split_names(names, inception is not None)
    result: dict = {}
    if standard:
        result.update(
            standard_metrics.measure(variant, G, n, inception.net, inception.ref, split, standard, seed=seed, bar=bar)
        )
    if rest and main:
        x = samples if samples is not None else draw(variant, G, n, seed)
        result.update(metrics.compute(x, rest, cfg, manifest, features, reference))
    return result
