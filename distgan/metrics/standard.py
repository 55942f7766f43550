"""The standard metrics: FID, KID, IS and precision/recall on Inception-v3 features.

Work is cut into chunks of `Split.chunk` images, numbered in order; under `accelerate launch` rank r
takes chunks r, r + W, ... and the features are gathered in chunk order. Generated chunk c draws
its noise from its own seed (seed, c), so the images, their features and every number computed
from them do not depend on how many ranks did the work.

Reference statistics of a shard set (its real images' mean, covariance, and a sample of features
for KID and precision/recall) are computed once and kept in $DISTGAN_CACHE/stats/ under a key made
of the shard files' sha256, the Inception file's sha256, the resolution, channels, image count, image
member and crop (`cache_identity`), the same for `distgan stats`, `distgan eval` and training
evaluations. A change to any shard gives a new key. A cached file records its identity and is used
only when it matches and its arrays are usable; otherwise it is recomputed, with a note.
`distgan stats --out FILE` writes them where the user says;
`distgan eval --ref FILE` reads those or pytorch-fid's `.npz` (`mu`, `sigma`: FID only).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distgan.errors import UserError
from distgan.metrics import fid, inception, kid, precision_recall
from distgan.metrics.inception_score import inception_score

CHUNK = 250  # images per unit of work (the default of `Split.chunk`)
KEEP_FEATURES = 50_000  # real features kept in reference stats for KID and precision/recall
PR_MAX = 10_000  # samples of each set for precision/recall (an all-pairs distance computation)
KID_SUBSETS, KID_SIZE = 100, 1000
STATS_VERSION = 2  # bump when what the statistics are computed from, or how, changes


@dataclass
class Split:
    """Which chunks this process computes, and how the results come together."""

    rank: int = 0
    world: int = 1
    chunk: int = CHUNK

    @classmethod
    def current(cls, chunk: int = CHUNK) -> Split:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), chunk)
        return cls(chunk=chunk)

    def mine(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def gather(self, local: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's (chunk, features, class outputs), concatenated in chunk order, on every rank."""
        if self.world > 1:
            import torch.distributed as dist

            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, local)
            local = [item for part in everyone for item in part]
        local = sorted(local, key=lambda item: item[0])
        if not local:
            return np.zeros((0, inception.FEATURES), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate([f for _, f, _ in local]), np.concatenate([p for _, _, p in local])

    def describe(self) -> str:
        how = f"in chunks of {self.chunk}"
        return f"split over {self.world} ranks {how}, gathered" if self.world > 1 else f"one process, {how}"


def _features(net, images: torch.Tensor, batch: int, outputs: bool) -> tuple[np.ndarray, np.ndarray]:
    fs, ps = [], []
    for i in range(0, len(images), batch):
        f, p = net(inception.to_uint8(images[i : i + batch]), outputs=outputs)
        fs.append(f)
        ps.append(p if outputs else np.zeros((len(f), 0), np.float32))
    return np.concatenate(fs), np.concatenate(ps)


def generated_features(
    sample, n: int, net, split: Split, seed: int = 0, batch: int = 50, bar=None, outputs: bool = True
):
    """Features (and, with `outputs`, the class outputs for IS) of n generated images;
    `sample(k, generator)` draws k images in [-1, 1]."""
    from distgan.data.stream import stream_seed

    local = []
    for c in range((n + split.chunk - 1) // split.chunk):
        k = min(split.chunk, n - c * split.chunk)
        if split.mine(c):
            with torch.no_grad():
                x = sample(k, torch.Generator().manual_seed(stream_seed(seed, c))).cpu()
            local.append((c, *_features(net, x, batch, outputs)))
        if bar is not None:
            bar.update(k)
    return split.gather(local)


def real_features(
    source,
    *,
    resolution: int,
    channels: int,
    net,
    split: Split,
    limit: int = 0,
    batch: int = 50,
    bar=None,
    options: dict | None = None,
):
    """Features of the shard set's images, each once, in shard order (the first `limit` when > 0)."""
    from distgan.data.stream import iter_all

    local = []
    images = iter_all(source, resolution=resolution, channels=channels, batch=split.chunk, limit=limit, options=options)
    for c, x in enumerate(images):
        if split.mine(c):
            local.append((c, *_features(net, x, batch, False)))
        if bar is not None:
            bar.update(len(x))
    feats, probs = split.gather(local)
    if not len(feats):
        raise UserError(f"no readable images in {source.urls[0]}{' ...' if len(source.urls) > 1 else ''}")
    return feats, probs


# -- reference statistics -----------------------------------------------------------------------


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None  # a sample of the features, for KID and precision/recall
    meta: dict = field(default_factory=dict)

    @classmethod
    def of(cls, feats: np.ndarray, meta: dict, keep: int = KEEP_FEATURES) -> RefStats:
        mu, sigma = fid.moments(feats)
        return cls(mu, sigma, len(feats), feats[:keep].astype(np.float32), meta)

    def save(self, path: str | Path) -> None:
        from distgan import files

        extra = {"features": self.features} if self.features is not None else {}
        arrays = dict(mu=self.mu, sigma=self.sigma, n=np.int64(self.n), meta=np.array(json.dumps(self.meta)), **extra)
        files.write_atomic(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> RefStats:
        if not Path(path).is_file():
            raise UserError(f"reference statistics '{path}' do not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "mu" not in z or "sigma" not in z:
                    raise UserError(
                        f"reference statistics '{path}' hold no 'mu' and 'sigma' arrays "
                        f"(pytorch-fid's .npz layout); they hold {', '.join(z.files) or 'nothing'}"
                    )
                mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
                feats = z["features"] if "features" in z else None
                n = int(z["n"]) if "n" in z else 0
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"reference statistics '{path}' are not a readable .npz: {exc}") from None
        if mu.shape != (inception.FEATURES,) or sigma.shape != (inception.FEATURES, inception.FEATURES):
            raise UserError(
                f"reference statistics '{path}' have mu {mu.shape} and sigma {sigma.shape}; Inception "
                f"pool features need ({inception.FEATURES},) and ({inception.FEATURES}, {inception.FEATURES})"
            )
        problem = _unusable(mu, sigma, n, feats)
        if problem:
            raise UserError(f"reference statistics '{path}' cannot be used: {problem}")
        return cls(mu, sigma, n, feats, meta if isinstance(meta, dict) else {})


def _unusable(mu: np.ndarray, sigma: np.ndarray, n: int, feats: np.ndarray | None) -> str | None:
    """What makes loaded statistics unusable for FID/KID/PR (checked before any Inception work), or None."""
    if not np.isfinite(mu).all() or not np.isfinite(sigma).all():
        return "mu or sigma holds NaN/Inf"
    if not np.allclose(sigma, sigma.T, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(sigma).max()))):
        return "sigma is not symmetric (not a covariance)"
    if float(np.diag(sigma).min()) < -1e-6:
        return "sigma has a negative variance (not a covariance)"
    if n < 0:
        return f"n is {n}"
    if feats is not None:
        if feats.ndim != 2 or feats.shape[1] != inception.FEATURES:
            return f"features have shape {feats.shape}; expected (N, {inception.FEATURES})"
        if n and len(feats) > n:
            return f"{len(feats)} features but n={n}"
        if not np.isfinite(feats).all():
            return "features hold NaN/Inf"
    return None


def _file_sha256(path: str, memo: dict) -> str:
    st = os.stat(path)
    key = os.path.abspath(path)
    hit = memo.get(key)
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return hit["sha256"]
    digest = inception.file_digest(path)
    memo[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def shards_digest(urls: list[str]) -> str | None:
    """One sha256 of the shard files' contents (each file's hash is remembered under its size and
    mtime, so a second lookup reads nothing); None for remote shards, whose content distgan cannot
    know without reading them."""
    from distgan.files import cache_root

    if any(u.startswith("pipe:") or "://" in u for u in urls):
        return None
    memo_path = cache_root() / "stats" / "shard-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    for u in urls:
        h.update(_file_sha256(u, memo).encode())
    from distgan import files

    files.write_text(memo_path, json.dumps(memo))
    return h.hexdigest()


def image_options(options: dict | None) -> dict:
    """Of a stream's options, those that change the images the statistics are computed from: which
    member is the image, and the crop (random taken as center). Labels, bounds and on_error do not."""
    from distgan.data.stream import _fixed

    fixed = _fixed(options)
    return {"image_key": fixed.get("image_key", "").lstrip("."), "crop": fixed.get("crop", "center")}


def cache_identity(
    shards_sha256: str, net_digest: str, resolution: int, channels: int, limit: int, options: dict | None = None
) -> dict:
    """What cached statistics were computed from: they are used only for exactly this."""
    return {
        "stats_version": STATS_VERSION,
        "shards_sha256": shards_sha256,
        "inception_sha256": net_digest,
        "resolution": resolution,
        "channels": channels,
        "limit": limit,
        **image_options(options),
    }


def cache_path(identity: dict) -> Path:
    """The cache file of statistics with this identity: `distgan stats`, `distgan eval` and training
    evaluations of the same shards, network, size and images share it."""
    from distgan.files import cache_root

    key = json.dumps(identity, sort_keys=True)
    return cache_root() / "stats" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _cached(path: Path, identity: dict) -> tuple[RefStats | None, str]:
    """The statistics cached at `path` if they hold what `identity` says, else (None, why not)."""
    try:
        stats = RefStats.load(path)
    except UserError as exc:
        return None, str(exc)
    differ = sorted(k for k, v in identity.items() if stats.meta.get(k) != v)
    if differ:
        return None, f"it records other {', '.join(differ)} than this computation's"
    return stats, ""


def reference_stats(
    spec: str,
    *,
    resolution: int,
    channels: int,
    net,
    split: Split,
    limit: int = 0,
    progress: bool = True,
    key: str = "data.shards",
    options: dict | None = None,
) -> tuple[RefStats, str]:
    """The statistics of shard set `spec`'s images, from the cache when they are there; also says
    where they came from ("cached FILE", "computed, cached in FILE", "computed (remote shards: not cached)")."""
    from tqdm import tqdm

    from distgan.data import stream

    source = stream.resolve(spec, progress=False, key=key)
    digest = shards_digest(source.urls) if split.rank == 0 else None
    if split.world > 1:  # rank 0 hashed the files; everyone uses its answer
        import torch.distributed as dist

        box = [digest]
        dist.broadcast_object_list(box, src=0)
        digest = box[0]
    identity = cache_identity(digest, net.digest, resolution, channels, limit, options) if digest else None
    path = cache_path(identity) if identity else None
    note = ""
    if path is not None and path.is_file():
        stats, why = _cached(path, identity)
        if stats is not None:
            return stats, f"cached {path}"
        note = f" (the file cached there was not used: {why})"
    total = (source.manifest or {}).get("count")
    total = min(total, limit) if total and limit else (total or limit or None)
    with tqdm(total=total, desc="reference features", unit="img", disable=not progress or split.rank != 0) as bar:
        feats, _ = real_features(
            source,
            resolution=resolution,
            channels=channels,
            net=net,
            split=split,
            limit=limit,
            bar=bar,
            options=options,
        )
    meta = {"shards": spec, "inception": net.describe(), **(identity or {"shards_sha256": None})}
    stats = RefStats.of(feats, meta)
    if path is None:
        return stats, "computed (remote shards: not cached; keep them with `distgan stats --out`)"
    if split.rank == 0:
        stats.save(path)
    return stats, f"computed, cached in {path}{note}"


# -- the report ---------------------------------------------------------------------------------


def measure(variant, G, n: int, net, ref: RefStats, split: Split, names, seed: int = 0, bar=None) -> dict:
    """The metrics `names` of n samples of `variant.sample(G, ...)` against `ref`: each rank draws
    and featurises its chunks, every rank gets the result."""

    def sample(k, generator):
        return variant.sample(G, k, generator=generator)

    feats, outputs = generated_features(sample, n, net, split, seed=seed, bar=bar, outputs="is" in names)
    return compute(feats, outputs, ref, names, probabilities=net.probabilities)


def compute(fake: np.ndarray, outputs: np.ndarray, ref: RefStats, names, probabilities: bool) -> dict:
    """The metrics `names` (of distgan.metrics.STANDARD) of generated features against the reference;
    what cannot be computed is said under "missing"."""
    out: dict = {}
    missing = []
    fake64 = fake.astype(np.float64)
    names = list(names)
    if "fid" in names:
        out["fid"] = fid.frechet_distance(*fid.moments(fake64), ref.mu, ref.sigma)
    needs_features = [m for m in names if m in ("kid", "pr")]
    if needs_features and ref.features is None:
        missing.append(
            f"{' and '.join(needs_features)}: the reference statistics hold only mu and sigma "
            "(pytorch-fid's layout); `distgan stats` keeps features too"
        )
        names = [m for m in names if m not in needs_features]
    n_ref = len(ref.features) if ref.features is not None else 0
    if "kid" in names:
        sub = kid.kid_subsets(fake64, ref.features, KID_SUBSETS, KID_SIZE)
        out["kid"], out["kid_std"] = float(sub.mean()), float(sub.std())
        out["kid_subsets"] = f"{KID_SUBSETS} of {min(KID_SIZE, len(fake64), n_ref)}"
    if "is" in names:
        if len(outputs) >= 10:
            out["is"], out["is_std"] = inception_score(outputs, 10, logits=not probabilities)
        else:
            missing.append(f"is: 10 splits need at least 10 samples; got {len(outputs)}")
    if "pr" in names:
        m = min(PR_MAX, len(fake64), n_ref)
        if m > 3:
            out["precision"], out["recall"] = precision_recall.precision_recall(ref.features[:m], fake64[:m], k=3)
            out["pr_n"] = m
        else:
            missing.append(f"pr: k=3 neighbours need at least 4 samples of each set; got {m}")
    if missing:
        out["missing"] = "; ".join(missing)
    return out
