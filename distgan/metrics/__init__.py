"""Sample-quality and mode-collapse metrics, chosen by what the data is (`applicable`), computed by
`compute`: shared by `distgan eval` and the trainer's `train.eval_every`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from distgan.errors import UserError

if TYPE_CHECKING:
    import torch

METRICS = {
    "modes": "2-D mixtures: modes captured, % high quality, reverse KL (PacGAN's definitions)",
    "digits": "digits: a classifier of the real digits judges the samples (confident fraction, classes "
    "covered), next to held-out real digits",
    "fid": "FID against the real data: on Inception-v3 features with --inception (the standard FID), else in "
    "a digits classifier's feature space (or --features FILE's)",
    "kid": "KID (unbiased, cubic kernel, 100 subsets of 1000 with --inception), in the same feature space as fid",
    "is": "Inception Score (10 splits), with --inception",
    "pr": "improved precision and recall (Kynkaanniemi et al., k=3) on the Inception features, with --inception",
    "stacked": "stacked digits: each channel classified, modes covered of 1000, KL to uniform",
    "swd": "sliced Wasserstein distance x1e3 on Laplacian-pyramid 7x7 patches (Karras et al. 2018), per level "
    "and mean, against the training images (or --heldout SHARDS); needs no pretrained network",
}
STANDARD = ("fid", "kid", "is", "pr")  # what the Inception network gives (distgan.metrics.standard)


def applicable(cfg, manifest: dict | None, features: str | None = None, inception: bool = False) -> list[str]:
    manifest = manifest or {}
    source = manifest.get("source", "")
    if manifest.get("mixture"):
        return ["modes"]
    if cfg.data.kind == "latents":  # decoded samples against the images' statistics (train.eval_ref / --ref)
        return list(STANDARD) if inception else []
    if cfg.data.kind != "images":
        return []
    own = []
    if source == "builtin:stacked-digits":
        own = ["stacked"]
    elif source == "builtin:digits" and cfg.data.channels == 1:
        own = ["digits"]
    if inception:
        return own + list(STANDARD) + ["swd"]
    return own + (["fid", "kid"] if features or own == ["digits"] else []) + ["swd"]


def check(names: list[str], usable: list[str], cfg) -> None:
    for m in names:
        if m not in METRICS:
            raise UserError(f"unknown metric '{m}'; available: {', '.join(METRICS)}")
        if m not in usable:
            hint = " (is and pr need --inception FILE)" if m in STANDARD and cfg.data.kind == "images" else ""
            raise UserError(
                f"metric '{m}' does not apply to this run's data ({cfg.data.shards}){hint}; what applies: "
                f"{', '.join(usable) or 'nothing built in (give --inception FILE)'}"
            )
    if not names:
        from distgan.metrics.inception import missing_message

        raise UserError(
            f"no built-in metric applies to {cfg.data.shards} (they cover the 2-D mixtures, the embedded digits and "
            f"stacked digits): {missing_message()}"
        )


def real_images(cfg, n: int) -> torch.Tensor:
    """n real training images from the run's shards (rank 0's stream, seed 0)."""
    import torch

    from distgan.data import stream

    src = stream.resolve(cfg.data.shards, progress=False)
    ds = stream.from_config(
        cfg, src.urls, seed=0, fixed=True, batch_size=min(n, 256), shuffle_buffer=1000, points=False
    )
    out, got = [], 0
    for batch in ds:
        out.append(batch["image"])
        got += len(batch["image"])
        if got >= n:
            break
    return torch.cat(out)[:n]


def compute(
    samples: torch.Tensor,
    names: list[str],
    cfg,
    manifest: dict | None,
    features: str | None = None,
    reference: torch.Tensor | None = None,
) -> dict:
    """The metrics `names` of `samples` (as variant.sample returns them). `reference`: real images for
    swd instead of the training images (a held-out set)."""
    from distgan.metrics.digits import DigitFeatures
    from distgan.metrics.fid import fid
    from distgan.metrics.kid import kid

    manifest = manifest or {}
    out: dict = {}
    if "modes" in names:
        from distgan.metrics.mixtures import mode_metrics

        mix = manifest["mixture"]
        out.update(mode_metrics(samples.numpy(), mix["centres"], mix["std"]))
    if "digits" in names:
        from distgan.metrics import digits

        out["digits"] = digits.evaluate(samples)
    if "fid" in names or "kid" in names:
        if features:
            real = real_images(cfg, len(samples))
            a, b = torchscript_features(features, samples), torchscript_features(features, real)
            out["feature_space"] = features
        else:
            import torch

            from distgan.metrics.digits import real_digits

            net = DigitFeatures(cfg.data.resolution)
            x, _ = real_digits(cfg.data.resolution)
            r = cfg.data.resolution
            a, b = net.features(samples), net.features(torch.from_numpy(x).view(-1, 1, r, r))
            out["feature_space"] = f"digits MLP (hidden 128), held-out accuracy {net.test_accuracy:.3f}"
        if "fid" in names:
            out["fid"] = fid(a, b)
        if "kid" in names:
            out["kid"] = kid(a, b)
    if "swd" in names:
        from distgan.metrics.swd import swd

        real = reference if reference is not None else real_images(cfg, len(samples))
        out.update(swd(samples, real))
        out["swd_reference"] = (
            f"{'held-out' if reference is not None else 'training'} images, {out['swd_images']} of each"
        )
    if "stacked" in names:
        net = DigitFeatures(cfg.data.resolution)
        digits_per_channel = [net.probs(samples[:, c : c + 1]).argmax(1) for c in range(3)]
        modes = digits_per_channel[0] * 100 + digits_per_channel[1] * 10 + digits_per_channel[2]
        counts = np.bincount(modes, minlength=1000)
        p = counts / counts.sum()
        out["stacked_modes"] = int((counts > 0).sum())
        out["stacked_kl"] = float(np.sum(p[p > 0] * np.log(p[p > 0] * 1000)))
        out["classifier_test_accuracy"] = net.test_accuracy
    return out


def scalars(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """The numeric top-level entries (and digits' summary), for logging."""
    flat = {}
    for k, v in result.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[prefix + k] = float(v)
    gen = result.get("digits", {}).get("generated", {})
    for k in ("confident_fraction", "classes_covered"):
        if k in gen:
            flat[f"{prefix}digits_{k}"] = float(gen[k])
    return flat


def torchscript_features(path: str, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Features from a user's TorchScript network: images (N, C, H, W) in [-1, 1] -> (N, D)."""
    from pathlib import Path

    import torch

    from distgan.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"feature network '{path}' does not exist")
    try:
        net = torch.jit.load(path, map_location="cpu").eval()
    except Exception as exc:
        raise UserError(f"'{path}' is not a TorchScript file (save one with torch.jit.save): {exc}") from None
    with torch.no_grad():
        out = [net(images[i : i + batch].float()).flatten(1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy().astype(np.float64)
