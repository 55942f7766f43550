"""`distgan shards --encode VAE`: images (a folder, an embedded set or image shards) encoded by a frozen
VAE (distgan/vae.py) into latent shards for latent-space training (`data.kind=latents`).

Each sample is KEY.npy, the normalised latent (C, H, W) as float16, with KEY.cls (its label, when it has
one) and KEY.json (its index and whether it is a mirror image). `--flips` writes every image's mirror as a
sample of its own, encoded from the flipped pixels (REPA's and GAT's latents come without flips; a flip in
latent space only approximates the flipped image's latent, so distgan encodes both). `--keep-images`
stores the encoded image itself beside its latent (KEY.png, RGB or gray at --resize), which the
alignment term (model.align.encoder, distgan/align.py) feeds its frozen encoder. `--posterior` also stores
the posterior's standard deviation (KEY.std.npy, float16, normalised as the mean), from which training
with data.posterior=true draws each latent afresh (REPA's and GAT's sample_posterior). The manifest says
kind "latents", the latents' [H, W, C], the VAE's identity (distgan.vae.identity: training refuses
another VAE) and the image resolution.

Resumable: shards are written one at a time, each renamed into place when complete, and
`.encode-progress.json` records how many are done, so an interrupted encode run again with the same
arguments goes on after the last complete shard (the sources are read in a fixed order).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distgan import files
from distgan.data import shards as shards_module
from distgan.errors import UserError

PROGRESS = ".encode-progress.json"


def folder_samples(root: str, resolution: int) -> tuple[Iterator, int, list[str]]:
    """The images of a folder (class subfolders or flat), center-cropped and resized, as RGB."""
    rootp = Path(root)
    entries, classes = shards_module._folder_entries(rootp)
    samples = ((img, label) for img, label, _ in shards_module.folder_samples(rootp, entries, resolution, True))
    return samples, len(entries), classes


def builtin_samples(name: str, resolution: int) -> tuple[Iterator, int, list[str]]:
    """An embedded image set's images resized (PIL bilinear, as the training stream does) to `resolution`."""
    from PIL import Image

    from distgan.data import builtin

    if name in builtin.MIXTURES or name in builtin.IMAGE2IMAGE or name in builtin.LATENT_BUILTINS:
        raise UserError(f"--encode takes an image set (digits, faces, stacked-digits); got builtin '{name}'")
    x, y, classes = builtin.load(name)

    def samples():
        for img, label in zip(x, y):
            pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
            arr = np.asarray(pil.resize((resolution, resolution), Image.BILINEAR))
            yield (arr[..., None] if arr.ndim == 2 else arr), int(label)

    return samples(), len(x), list(classes)


def ensure_builtin(name: str, progress: bool = True) -> Path:
    """The folder of latent builtin `name` (data.shards=builtin:digits-latents) in the cache, encoded on
    first use."""
    from distgan.data import builtin

    images, size, vae = builtin.LATENT_BUILTINS[name]
    # "-images": encoded with their images beside them (--keep-images), for model.align.encoder
    folder = files.cache_root() / "shards" / f"{name}-v{shards_module.CACHE_VERSION}-images"
    if not (folder / shards_module.MANIFEST).exists():
        samples, count, classes = builtin_samples(images, size)
        encode(
            vae,
            (samples, count, classes),
            f"builtin:{images}",
            folder,
            resolution=size,
            maxcount=shards_module.BUILTIN_MAXCOUNT,
            keep_images=True,
            overwrite=True,
            progress=progress,
            device="cpu",
        )
    return folder


def _to_tensor(batch: list[np.ndarray], channels: int) -> torch.Tensor:
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[1] != channels:  # grayscale into an RGB VAE: the gray in every channel
        x = x[:, :1].expand(-1, channels, -1, -1)
    return x


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def encode(
    vae_path: str,
    source: tuple[Iterator, int | None, list[str]],
    where: str,
    out_dir: str,
    *,
    resolution: int,
    maxcount: int = 1000,
    batch: int = 64,
    flips: bool = False,
    keep_images: bool = False,
    posterior: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Encode the images of `source` ((H, W, C) uint8 images at `resolution` with their labels, their
    count, class names: `folder_samples`, `builtin_samples`, stream.image_samples), which come from
    `where` (recorded in the manifest), with the VAE of `vae_path` into latent shards in `out_dir`;
    `keep_images`: each sample also holds its image (KEY.png, what the VAE encoded), for
    model.align.encoder; `posterior`: also the posterior's std (KEY.std.npy), for data.posterior. Returns
    the manifest."""
    import webdataset as wds

    from distgan import vae as vae_module

    if resolution < 1 or maxcount < 1 or batch < 1:
        raise UserError("--resize, --maxcount and --batch must be positive")
    if flips and maxcount % 2:
        raise UserError(f"--flips writes images in pairs: --maxcount must be even; got {maxcount}")
    out = Path(out_dir)
    identity = vae_module.identity(vae_path)
    if resolution % identity["downsample"]:
        raise UserError(
            f"--resize {resolution} is not a multiple of the VAE's downsampling factor {identity['downsample']}"
        )
    settings = {
        "source": where,
        "vae": identity["sha256"],
        "resolution": resolution,
        "maxcount": maxcount,
        "flips": flips,
        "keep_images": keep_images,
        "posterior": posterior,
    }
    done = _resume_point(out, settings, overwrite)
    model = vae_module.VAE(vae_path, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples, count, classes = source
    per_image = 2 if flips else 1
    skip_images = done * maxcount // per_image
    total = count * per_image if count is not None else None
    bar = tqdm(total=total, initial=done * maxcount, desc=f"encode {out}", disable=not progress, unit="img")
    shape = None
    n = done * maxcount  # samples written (and the next key)
    names = [f"latents-{i:06d}.tar" for i in range(done)]
    pending: list[tuple[np.ndarray, int | None, bool]] = []
    shard_samples: list[dict] = []

    def flush_shard() -> None:
        name = f"latents-{len(names):06d}.tar"
        tmp = out / f".{name}.incomplete"
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as sink:
            for sample in shard_samples:
                sink.write(sample)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
        names.append(name)
        shard_samples.clear()
        files.write_text(out / PROGRESS, json.dumps({**settings, "done_shards": len(names)}))

    def encode_pending() -> None:
        nonlocal n, shape
        encoded = model.encode(_to_tensor([img for img, _, _ in pending], model.image_channels), posterior)
        means, stds = encoded if posterior else (encoded, None)
        latents = means.cpu().numpy()
        stds = None if stds is None else stds.cpu().numpy()  # one transfer per batch, as the means
        for i, ((img, label, mirrored), z) in enumerate(zip(pending, latents)):
            z16 = z.astype(np.float16)
            if not np.isfinite(z16).all():
                raise UserError(
                    f"the VAE gives latents beyond float16's range for sample {n} (|z| max {abs(z).max():g})"
                )
            shape = shape or z.shape
            sample = {"__key__": f"{n:08d}", "npy": _npy(z16), "json": {"index": n, "flip": mirrored}}
            if stds is not None:
                sample["std.npy"] = _npy(stds[i].astype(np.float16))
            if label is not None:
                sample["cls"] = int(label)
            if keep_images:
                sample["png"] = _png(img)
            shard_samples.append(sample)
            n += 1
            if len(shard_samples) == maxcount:
                flush_shard()
        bar.update(len(pending))
        pending.clear()

    out.mkdir(parents=True, exist_ok=True)
    try:
        for i, (img, label) in enumerate(samples):
            if i < skip_images:
                continue
            pending.append((img, label, False))
            if flips:
                pending.append((np.ascontiguousarray(img[:, ::-1]), label, True))
            if len(pending) >= batch:
                encode_pending()
        if pending:
            encode_pending()
        if shard_samples:
            flush_shard()
    finally:
        bar.close()
    if n == 0:
        raise UserError(f"no images to encode in {where}")
    if shape is None:  # every shard was done before this run: the shape from the last one
        shape = _shape_of(out / names[-1])
    manifest = {
        "count": n,
        "kind": "latents",
        "image_shape": [int(shape[1]), int(shape[2]), int(shape[0])],  # H, W, C of the latents
        "dtype": "float16",
        "classes": classes,
        "num_classes": len(classes),
        "shards": names,
        "pattern": f"latents-{{000000..{len(names) - 1:06d}}}.tar",
        "source": settings["source"],
        "image_resolution": resolution,
        "flips": flips,
        "images": keep_images,  # KEY.png beside each latent, at image_resolution
        "posterior": posterior,  # KEY.std.npy beside each latent: its posterior's std
        "vae": identity,
    }
    files.write_text(out / shards_module.MANIFEST, json.dumps(manifest, indent=2))
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


def _shape_of(tar: Path) -> tuple[int, ...]:
    from distgan.data import tarstream

    for sample in tarstream.samples([str(tar)], select=lambda name: name.endswith(".npy"), max_member=1 << 30):
        return np.load(io.BytesIO(sample["npy"]), allow_pickle=False).shape
    raise UserError(f"latent shard '{tar}' holds no latents")


def _resume_point(out: Path, settings: dict, overwrite: bool) -> int:
    """Complete shards of an earlier, interrupted encode with the same settings (0 for a new one)."""
    progress, manifest = out / PROGRESS, out / shards_module.MANIFEST
    if overwrite:
        for stale in [*out.glob("*.tar"), *out.glob(".*.incomplete"), progress, manifest]:
            stale.unlink(missing_ok=True)
        return 0
    if manifest.exists() or (any(out.glob("*.tar")) and not progress.exists()):
        raise UserError(f"'{out}' already holds shards; pass --overwrite to replace them or pick another --out")
    if not progress.exists():
        return 0
    try:
        state = json.loads(progress.read_text())
        done = int(state["done_shards"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"'{progress}' is unreadable; pass --overwrite to start the encode again") from None
    state.setdefault("keep_images", False)  # (a progress file from before --keep-images, --posterior)
    state.setdefault("posterior", False)
    changed = [k for k in settings if state.get(k) != settings[k]]
    if changed:
        raise UserError(
            f"'{out}' holds an interrupted encode with other settings ({', '.join(changed)}); run it with the "
            "same arguments, or pass --overwrite to start again"
        )
    for i in range(done):
        if not (out / f"latents-{i:06d}.tar").is_file():
            raise UserError(f"'{out}' lost shard latents-{i:06d}.tar of its interrupted encode; pass --overwrite")
    for stale in out.glob(".*.incomplete"):
        stale.unlink()
    return done
