"""The training pipeline: resampled shards, split by node and worker, shuffle, decode, batch.

Each (rank, worker) pair reads an endless, deterministic stream:

1. split by node, then by worker: rank r takes shards r, r+R, ...; worker w of it takes every
   W-th of those. When there are fewer shards than ranks (or workers), the split is skipped at
   that level and the streams differ only by seed, so nothing hangs and nothing crashes;
2. resampled: shards are drawn with replacement from that subset by a RNG seeded from
   (train.seed, rank, worker), so the stream never ends and every rank runs the same steps;
3. distgan's bounded tar reader (tarstream.py) groups members into samples as webdataset does (no
   member past data.max_member_bytes is read), and a seeded shuffle buffer mixes them;
4. decode and batch in the worker: the image member is found by extension (`IMAGE_EXTS`, or
   data.image_key), the label in `cls`, `label` or a JSON field (data.label_key); the image is
   cropped to a square (data.crop), resized to data.resolution with PIL's bilinear filter
   (antialiased when shrinking; JPEGs first shrunk in the decoder by DCT scaling when the target is
   at most half their size), converted to data.channels, and scaled to float CHW in [-1, 1].

Every batch carries `pos`, the number of raw samples its worker has taken from the shuffle
buffer. A checkpoint stores that per worker; on resume each worker rebuilds the same stream and
drops that many raw samples before decoding, so the resumed run sees exactly the same batches.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distgan.data import pixels, tarstream
from distgan.errors import UserError


@dataclass
class ShardSource:
    """Where the shards are, after resolving `data.shards`."""

    urls: list[str]
    manifest: dict | None


MAX_BAD_RUN = 10_000  # consecutive bad samples after which a skipping stream gives up
QUOTE = 200  # characters of a sample's content (a label, a key) that an error line quotes at most


def _short(text: str, limit: int = QUOTE) -> str:
    """`text` cut to `limit` characters: error lines never carry a member's content whole."""
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def quote(value, limit: int = QUOTE) -> str:
    return _short(repr(value), limit)


# Image members by extension, in the order a sample's first present one is taken (webdataset's own
# image extensions); data.image_key names one instead.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")


def stream_options(cfg) -> dict:
    """The ShardStream keywords that come from data.*: how members, labels and crops are read, their
    bounds, and what a bad sample does."""
    d = cfg.data
    return {
        "image_key": d.image_key,
        "label_key": d.label_key,
        "crop": d.crop,
        "on_error": d.on_error,
        "max_member_bytes": int(d.max_member_bytes),
        "max_image_pixels": int(d.max_image_pixels),
        "posterior": d.posterior and d.kind == "latents",
    }


def from_config(cfg, urls, *, seed: int, fixed: bool = False, **overrides) -> ShardStream:
    """The ShardStream of a run's data.* settings over `urls`: the one place a stream is assembled
    from the config. `fixed`: a deterministic read (data.crop=random read as center, posterior latents
    as their means, for evaluation reads); `overrides`: any other ShardStream keyword (rank,
    batch_size, cache_bytes ...)."""
    d = cfg.data
    options = stream_options(cfg)
    kwargs = dict(
        batch_size=d.batch_size,
        resolution=d.resolution,
        channels=d.channels,
        seed=seed,
        shuffle_buffer=d.shuffle_buffer,
        points=d.kind == "points",
        latents=d.kind == "latents",
        **(_fixed(options) if fixed else options),
    )
    kwargs.update(overrides)
    return ShardStream(list(urls), **kwargs)


def cache_budget(cfg, spec: str) -> int:
    """Bytes of decoded samples the training stream of shard set `spec` keeps in RAM per rank:
    data.cache_bytes with data.cache=ram, or with auto for the embedded sets; 0 for none."""
    d = cfg.data
    on = d.cache == "ram" or d.cache == "auto" and spec.startswith("builtin:")
    return int(d.cache_bytes) if on else 0  # (ShardStream keeps nothing with a random crop)


def _member_base(member: str) -> str:
    """A field's member as the variants name it ("png", "target.png") -> the part before the image
    extension ("", "target")."""
    return member.rsplit(".", 1)[0] if "." in member else ""


def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def resolve(spec: str, progress: bool = True, key: str = "data.shards") -> ShardSource:
    """Expand `data.shards` (or the config key `key`) into a URL list, checking local paths exist
    and are non-empty."""
    import braceexpand

    from distgan.data import shards

    if not spec:
        raise UserError(f"config key '{key}' is empty; give a shard path, brace pattern or URL")
    if spec.startswith("builtin:"):
        from distgan.data import builtin, latents

        name = spec.split(":", 1)[1]
        ensure = latents.ensure_builtin if name in builtin.LATENT_BUILTINS else shards.ensure_builtin
        spec = str(ensure(name, progress=progress))
    if _is_remote(spec):
        return ShardSource(list(braceexpand.braceexpand(spec)), None)
    # Absolute, so that no file name joined to it can read as a URL ("pipe:..." in the current folder).
    path = Path(spec).expanduser().absolute()
    if path.is_dir():
        manifest = shards.read_manifest(path)
        names = (manifest or {}).get("shards") or sorted(p.name for p in path.glob("*.tar"))
        if not names:
            raise UserError(f"shard folder '{spec}' holds no .tar shards")
        urls = [str(path / n) for n in names]
    else:
        urls = list(braceexpand.braceexpand(str(path)))
        manifest = shards.read_manifest(Path(urls[0]).parent)
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"shard '{missing[0]}'{more} does not exist ({key}={spec})")
    empty = [u for u in urls if os.path.getsize(u) == 0]
    if empty:
        raise UserError(f"shard '{empty[0]}' is empty ({key}={spec})")
    return ShardSource(urls, manifest)


def split_shards(urls: list[str], index: int, count: int) -> list[str]:
    """Every `count`-th shard from `index`; all shards when there are fewer than `count`."""
    return urls[index::count] if len(urls) >= count else list(urls)


def stream_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _ignore_signals(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the main process checkpoints, workers must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ShardStream(IterableDataset):
    """An endless stream of batches: {"image": (B,C,H,W) float in [-1, 1] (and the other `fields`),
    "label": (B,) long (-1 when
    the shards have no .cls), "pos": raw samples taken so far, "skipped": bad samples skipped so
    far, "shards": indices (into `urls`) of the shards this batch came from}."""

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        resolution: int,
        channels: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        on_error: str = "raise",
        expected_shape: tuple[int, int, int] | None = None,
        points: bool = False,
        latents: bool = False,
        raw_resolution: int = 0,
        fields: dict[str, tuple[str, int]] | None = None,
        image_key: str = "",
        label_key: str = "",
        crop: str = "center",
        draft: bool = True,
        num_classes: int = 0,
        cache_bytes: int = 0,
        max_member_bytes: int = pixels.MAX_MEMBER_BYTES,
        max_image_pixels: int = pixels.MAX_IMAGE_PIXELS,
        posterior: bool = False,
    ):
        self.urls = list(urls)
        # Batch key -> (tar member suffix, channels) of the images each sample holds; paired data
        # (pix2pix) is {"image": ("target.png", C), "input": ("input.png", C_in)}.
        self.fields = fields or {"image": ("png", channels)}
        self.image_key = image_key.lstrip(".")  # "": the first of IMAGE_EXTS present
        self.label_key = label_key  # "": cls, else label; or cls, label, json:FIELD
        self.crop = crop
        self.draft = draft  # JPEG: DCT-domain downscaling in the decoder when it is at least 2x
        self.num_classes = num_classes  # > 0: a conditional variant: every sample needs a label below it
        # data.cache=ram: decoded samples kept per shard, up to this many bytes per (rank, worker)
        self.cache_bytes = cache_bytes if crop != "random" else 0
        self.max_member_bytes = int(max_member_bytes)  # a member larger than this is never read
        self.max_image_pixels = int(max_image_pixels)  # an image with more pixels is never decoded
        self._capture: list | None = None
        self._tar_errors = 0
        self.points = points  # (D,) float points in KEY.npy instead of images in KEY.png
        self.latents = latents  # (C, R, R) VAE latents in KEY.npy (distgan shards --encode)
        # latents: > 0 also reads the image stored beside each latent (KEY.png, --keep-images) as RGB
        # at this size, into the batch's "raw" (model.align.encoder)
        self.raw_resolution = raw_resolution if latents else 0
        # latents: each a draw from the VAE's posterior, mean (KEY.npy) + std (KEY.std.npy) * eps, eps seeded by
        # (seed, rank, worker, position) (data.posterior, shards encoded --posterior)
        self.posterior = posterior and latents
        self.batch_size = batch_size
        self.resolution = resolution
        self.channels = channels
        self.seed = seed
        self._worker = 0
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.on_error = on_error
        self.expected_shape = tuple(expected_shape) if expected_shape else None
        # Resume: raw samples each (logical) worker drops, and which logical worker the
        # DataLoader's worker 0 plays, so batches keep their round-robin order across a resume.
        self.start_positions: list[int] | None = None
        self._shard_index = {u: i for i, u in enumerate(self.urls)}
        self.worker_offset = 0

    # -- errors ---------------------------------------------------------------------------
    def _fail(self, what: str, url: str, key: str | None = None) -> None:
        if self._capture is not None:  # decoding into the RAM cache: the failure is replayed when consumed
            self._capture.append((what, url, key))
            return
        where = (
            f"sample '{_short(str(key))}' of shard '{_short(str(url), 400)}'"
            if key
            else f"shard '{_short(str(url), 400)}'"
        )
        if self.on_error == "raise":
            raise UserError(f"{where}: {_short(what, 400)} (set data.on_error=skip to skip and count such samples)")
        self._skipped += 1

    def _tar_error(self, exn: Exception) -> bool:
        self._tar_errors += 1
        url = exn.args[-1] if len(exn.args) > 1 and isinstance(exn.args[-1], str) else "?"
        self._fail(f"unreadable tar data ({type(exn).__name__}: {exn.args[0] if exn.args else ''})", url)
        return True  # skip: go on with the next shard

    # -- decoding -------------------------------------------------------------------------
    def _label(self, sample: dict, url: str, key: str) -> int | None:
        """The sample's class: -1 when it has none (fine for unconditional variants)."""
        lk = self.label_key
        if lk.startswith("json:"):
            raw, field_name = sample.get("json"), lk[5:]
            if raw is None:
                if self.num_classes:
                    self._fail("no .json member for data.label_key, which a conditional variant needs", url, key)
                    return None
                return -1
            try:
                label = json.loads(raw)[field_name]
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                self._fail(
                    f"no label field '{field_name}' in its .json ({type(exc).__name__}: {_short(str(exc))})", url, key
                )
                return None
        else:
            label = next((sample[k] for k in ((lk,) if lk else ("cls", "label")) if sample.get(k) is not None), None)
            if label is None:
                if self.num_classes:
                    self._fail(f"no label ({lk or 'cls or label'} member), which a conditional variant needs", url, key)
                    return None
                return -1
        try:
            if isinstance(label, bool) or isinstance(label, float) and not label.is_integer():
                raise ValueError
            if isinstance(label, (bytes, str)) and len(label) > 40:  # no int() of a huge text (quadratic)
                raise ValueError
            value = int(label.strip() if isinstance(label, (bytes, str)) else label)
        except (ValueError, TypeError, OverflowError):
            self._fail(f"label {quote(label)} is not an integer", url, key)
            return None
        if value < 0 or value >= (self.num_classes or 2**63):
            bound = f" (model.num_classes={self.num_classes})" if self.num_classes else " (labels are int64)"
            self._fail(f"label {quote(value, 60)} is out of range{bound}", url, key)
            return None
        return value

    def _wanted(self) -> set[str]:
        """The member suffixes a sample is read for; the rest are skipped unread."""
        labels = {"json"} if self.label_key.startswith("json:") else {self.label_key or "cls", "label"}
        if self.points or self.latents:
            extra = (*(IMAGE_EXTS if self.raw_resolution else ()), *(("std.npy",) if self.posterior else ()))
            return {"npy", *labels, *extra}
        exts = (self.image_key,) if self.image_key else IMAGE_EXTS
        images = {f"{b}.{e}" if b else e for b in (_member_base(m) for m, _ in self.fields.values()) for e in exts}
        return images | labels

    def _selector(self):
        """Which tar members to read: members the trainer does not use (.json metadata ...) are
        skipped unread."""
        wanted = self._wanted()

        def select(name: str) -> bool:  # KEY.png, KEY.cls, KEY.input.png ...: the part after the key
            return name.rsplit("/", 1)[-1].split(".", 1)[-1] in wanted

        return select

    def _image_member(self, sample: dict, member: str) -> str | None:
        base = _member_base(member)
        for ext in (self.image_key,) if self.image_key else IMAGE_EXTS:
            name = f"{base}.{ext}" if base else ext
            if name in sample:
                return name
        return None

    def _decode_point(self, sample: dict, url: str, key: str) -> tuple[np.ndarray, int, int] | None:
        arr = self._read_npy(sample, url, key)
        if arr is None:
            return None
        label = self._label(sample, url, key)
        return None if label is None else (arr, label, self._shard_index.get(url, -1))

    def _read_npy(self, sample: dict, url: str, key: str, member: str = "npy") -> np.ndarray | None:
        """A point, latent or (member std.npy) latent's posterior std, checked, as float32."""
        data = sample.get(member)
        if data is None:
            self._fail(
                f"no .{member} member (members: {', '.join(k for k in sample if not k.startswith('__'))})", url, key
            )
            return None
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            self._fail(f"corrupt .{member} ({exc})", url, key)
            return None
        want = (self.channels, self.resolution, self.resolution) if self.latents else (self.channels,)
        numeric = arr.dtype.kind in "fiu"
        if arr.shape != want or not numeric or not np.isfinite(arr).all() or member != "npy" and (arr < 0).any():
            what = {"npy": "latent" if self.latents else "point"}.get(member, "posterior std")
            self._fail(
                f"{what} of shape {arr.shape} and dtype {arr.dtype} (finite: "
                f"{bool(numeric and np.isfinite(arr).all())}), expected a numeric array of shape {want}"
                + ("" if member == "npy" else ", none negative"),
                url,
                key,
            )
            return None
        return arr.astype(np.float32)

    def _draw(
        self, decoded: tuple[dict[str, np.ndarray], int, int], pos: int
    ) -> tuple[dict[str, np.ndarray], int, int]:
        """A posterior latent's draw mean + std * eps, eps from (seed, rank, worker, position): a resumed
        stream, which replays the positions, draws the same."""
        arrays = dict(decoded[0])
        std = arrays.pop("std")
        eps = np.random.default_rng(stream_seed(self.seed, self.rank, self._worker, pos, 4)).standard_normal(
            std.shape, dtype=np.float32
        )
        arrays["image"] = arrays["image"] + std * eps
        return (arrays, *decoded[1:])

    def _decode_image(
        self, sample: dict, member: str, channels: int, url: str, key: str, pos: int = 0, resolution: int = 0
    ):
        """The image member as (R, R, channels) uint8, R = data.resolution or `resolution` (the images
        beside latents, whose manifest shape is the latents')."""
        found = self._image_member(sample, member)
        base = _member_base(member)
        if found is None:
            looked = self.image_key or "/".join(IMAGE_EXTS)
            name = f"{base}.{looked}" if base else looked
            self._fail(
                f"no .{name} member (members: {', '.join(k for k in sample if not k.startswith('__'))})", url, key
            )
            return None
        what = "image" if not base else f"image .{found}"
        mode = "RGB" if channels == 3 else "L"
        r = resolution or self.resolution
        try:
            with Image.open(io.BytesIO(sample[found])) as img:
                stored = img.size  # (W, H) as stored, before any DCT scaling
                side = min(stored)
                if self.draft and img.format == "JPEG" and side >= 2 * r:
                    # libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping the short side >= the target
                    img.draft(mode, (-(-stored[0] * r // side), -(-stored[1] * r // side)))
                if img.size[0] * img.size[1] > self.max_image_pixels:  # known from the header: not decoded
                    self._fail(
                        f"{what} of {stored[0]}x{stored[1]} pixels ({found}) is over "
                        f"data.max_image_pixels={self.max_image_pixels}",
                        url,
                        key,
                    )
                    return None
                img.load()
                img = pixels.convert(img, mode)
                img = self._crop(img, stored, url, key, pos, what)
                if img is None:
                    return None
                if img.size != (r, r):
                    img = img.resize((r, r), Image.BILINEAR)
                arr = np.asarray(img)
        except UserError:  # raised by _fail inside (data.on_error=raise): already says it all
            raise
        except Exception as exc:
            self._fail(f"corrupt {what} ({found}: {_short(str(exc))})", url, key)
            return None
        expected = self.expected_shape if not base and not resolution else None
        if expected and (stored[1], stored[0]) != expected[:2]:
            self._fail(
                f"{what} of size {stored[1]}x{stored[0]} (H x W), the manifest says {expected[0]}x{expected[1]}",
                url,
                key,
            )
            return None
        return arr.reshape(r, r, channels)

    def _crop(self, img, stored: tuple[int, int], url: str, key: str, pos: int, what: str):
        """The square to resize: centred, or at a place drawn from (seed, rank, position) so that a
        resumed stream crops the same; none: the whole image, which must not be smaller than the target."""
        w, h = img.size
        if self.crop == "none":
            if min(stored) < self.resolution:
                self._fail(
                    f"{what} of {stored[0]}x{stored[1]} is smaller than data.resolution={self.resolution} "
                    "(data.crop=none does not upscale)",
                    url,
                    key,
                )
                return None
            return img
        side = min(w, h)
        if w == h:
            return img
        if self.crop == "random":
            rng = random.Random(stream_seed(self.seed, self.rank, self._worker, pos, 3))
            left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        else:
            left, top = (w - side) // 2, (h - side) // 2
        return img.crop((left, top, left + side, top + side))

    def _decode(self, sample: dict, pos: int = 0) -> tuple[dict[str, np.ndarray], int, int] | None:
        if "__cached__" in sample:  # from the RAM cache: decoded when its shard was first read
            for failure in sample["__failures__"]:
                self._fail(*failure)
            return sample["__cached__"]
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        refused = [(k, v) for k, v in sample.items() if isinstance(v, tarstream.Refused)]
        if refused:  # a member over data.max_member_bytes: never read
            self._fail(f"member '{_short(str(key))}.{_short(refused[0][0])}' not read: {refused[0][1].why}", url, key)
            return None
        if self.points or self.latents:
            decoded = self._decode_point(sample, url, key)
            if decoded is None:
                return None
            arrays = {"image": decoded[0]}
            if self.posterior:
                arrays["std"] = self._read_npy(sample, url, key, "std.npy")
                if arrays["std"] is None:
                    return None
            if self.raw_resolution:
                arrays["raw"] = self._decode_image(sample, "png", 3, url, key, pos, self.raw_resolution)
                if arrays["raw"] is None:
                    return None
            return arrays, decoded[1], decoded[2]
        arrays = {}
        for name, (member, channels) in self.fields.items():
            arr = self._decode_image(sample, member, channels, url, key, pos)
            if arr is None:
                return None
            arrays[name] = arr
        label = self._label(sample, url, key)
        return None if label is None else (arrays, label, self._shard_index.get(url, -1))

    def _batch(self, items: list[tuple[dict[str, np.ndarray], int, int]], pos: int) -> dict:
        out = {}
        for name in items[0][0]:
            stacked = np.stack([a[name] for a, _, _ in items])
            if (self.points or self.latents) and name == "image":
                out[name] = torch.from_numpy(stacked)
            else:
                out[name] = torch.from_numpy(stacked.transpose(0, 3, 1, 2)).float().div_(127.5).sub_(1.0)
        out["label"] = torch.tensor([lab for _, lab, _ in items], dtype=torch.long)
        shards = sorted({i for _, _, i in items})
        return {**out, "pos": pos, "skipped": self._skipped, "shards": shards}

    # -- the stream -----------------------------------------------------------------------
    def __iter__(self):
        from webdataset.filters import _shuffle

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (worker + self.worker_offset) % num_workers
        mine = split_shards(split_shards(self.urls, self.rank, self.world_size), worker, num_workers)
        shard_rng = random.Random(stream_seed(self.seed, self.rank, worker, 0))
        shuffle_rng = random.Random(stream_seed(self.seed, self.rank, worker, 1))
        self._skipped = 0
        self._worker = worker
        draws_without_sample = [0]

        def shard_urls():
            while True:
                if draws_without_sample[0] > 2 * len(mine) + 8:
                    raise UserError(f"no readable samples in shards {mine[:3]}{' ...' if len(mine) > 3 else ''}")
                draws_without_sample[0] += 1
                yield {"url": shard_rng.choice(mine)}

        def counted(samples):
            for sample in samples:
                draws_without_sample[0] = 0
                yield sample

        select = self._selector()
        self._tar_errors = 0
        cache: dict[str, list[dict]] = {}
        budget = [self.cache_bytes // max(num_workers, 1)]

        def cached(sample: dict) -> dict:
            self._capture = []
            try:
                decoded = self._decode(sample)
            finally:
                failures, self._capture = self._capture, None
            if decoded is not None:  # arrays that own their bytes (not views of PIL's buffers), to count them
                decoded = ({k: np.array(a, copy=True) for k, a in decoded[0].items()}, *decoded[1:])
            return {
                "__key__": sample.get("__key__"),
                "__url__": sample.get("__url__"),
                "__cached__": decoded,
                "__failures__": failures,
            }

        def shard_samples():
            # One shard at a time, so that a shard read whole can be kept (data.cache=ram) and later
            # replayed in the same order: the shuffle, positions and resume see the same raw stream.
            for src in shard_urls():
                url = src["url"]
                if url in cache:
                    yield from cache[url]
                    continue
                keep = [] if budget[0] > 0 else None
                used = 0
                errors = self._tar_errors
                for sample in tarstream.samples(
                    [url], select=select, max_member=self.max_member_bytes, handler=self._tar_error
                ):
                    if keep is None:
                        yield sample
                        continue
                    entry = cached(sample)
                    used += entry_bytes(entry)
                    if used > budget[0]:  # this shard does not fit: let go of it, stream the rest
                        keep, budget[0] = None, 0  # and the budget is spent: later shards are read every time
                    else:
                        keep.append(entry)
                    yield entry
                if keep is not None and self._tar_errors == errors:  # a shard with read errors is re-read
                    cache[url] = keep
                    budget[0] -= used

        raw = counted(shard_samples())
        raw = _shuffle(raw, bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=shuffle_rng)
        skip = self.start_positions[worker] if self.start_positions else 0
        pos = bad_run = 0
        items = []
        for sample in itertools.islice(raw, skip, None) if skip else raw:
            pos += 1
            decoded = self._decode(sample, skip + pos)
            if decoded is not None and self.posterior:
                decoded = self._draw(decoded, skip + pos)
            if decoded is None:
                bad_run += 1
                if bad_run >= MAX_BAD_RUN:  # data.on_error=skip on shards with nothing usable: never hang
                    raise UserError(
                        f"{bad_run} samples in a row were bad and skipped (shards {_short(str(mine[:3]))}); "
                        "see data.on_error=raise for what is wrong with them"
                    )
                continue
            bad_run = 0
            items.append(decoded)
            if len(items) == self.batch_size:
                yield self._batch(items, skip + pos)
                items = []


def entry_bytes(entry: dict) -> int:
    """The memory a RAM-cache entry holds: its arrays (which own their bytes), the containers and
    strings around them, and its list slot."""
    n = sys.getsizeof(entry) + 8
    n += sum(sys.getsizeof(v) for v in (entry["__key__"], entry["__url__"]) if isinstance(v, str))
    decoded = entry["__cached__"]
    if decoded is not None:
        n += sys.getsizeof(decoded) + sys.getsizeof(decoded[0]) + sum(sys.getsizeof(a) for a in decoded[0].values())
    n += sys.getsizeof(entry["__failures__"])
    n += sum(sys.getsizeof(f) + sum(sys.getsizeof(x) for x in f) for f in entry["__failures__"])
    return n


def auto_workers(requested: int, on_gpu: bool) -> int:
    """`data.num_workers`, with -1 resolved from the cores each local process has: training on the
    CPU, none below 4 cores (the step uses them all; a worker would fight it) and 1 from 4 up;
    on GPUs, up to 4, leaving one core for the training process."""
    if requested >= 0:
        return requested
    cores = (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not on_gpu:
        return 0 if cores < 4 else 1
    return max(1, min(4, cores - 1))


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the (already batched) stream that leaves the global torch RNG alone."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_ignore_signals if num_workers else None,
        generator=torch.Generator().manual_seed(stream.seed),
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def shutdown(loader_iter) -> None:
    """Stop an iterator's worker processes now (they ignore SIGTERM, so exit-time cleanup cannot)."""
    stop = getattr(loader_iter, "_shutdown_workers", None)  # torch's multi-process iterator
    if stop is not None:
        stop()


def image_samples(spec: str, resolution: int, channels: int, key: str = "--shards"):
    """The images of image shard set `spec` once, in order, center-cropped and resized to `resolution`:
    ((H, W, C) uint8 arrays with their label or None, their count if the manifest says, class names)."""
    src = resolve(spec, key=key)
    manifest = src.manifest or {}
    if manifest.get("kind", "images") != "images":
        raise UserError(f"{key} takes image shards; '{spec}' holds {manifest.get('kind')}")
    ds = ShardStream(src.urls, batch_size=1, resolution=resolution, channels=channels, seed=0)
    samples = ((arrays["image"], None if label < 0 else label) for arrays, label, _ in _each_decoded(src, ds))
    return samples, manifest.get("count"), list(manifest.get("classes") or [])


def _each_decoded(source: ShardSource, ds: ShardStream):
    """Every sample of `source`'s shards once, in order, decoded by `ds` (undecodable ones as ds.on_error says)."""
    ds._skipped = 0
    for sample in tarstream.samples(
        source.urls, select=ds._selector(), max_member=ds.max_member_bytes, handler=ds._tar_error
    ):
        decoded = ds._decode(sample)
        if decoded is not None:
            yield decoded


def _fixed(options: dict | None) -> dict:
    """stream_options for a pass that must not depend on the seed: a random crop becomes a centred one,
    posterior latents their means."""
    options = dict(options or {}, posterior=False)
    if options.get("crop") == "random":
        options["crop"] = "center"
    return options


def read_all(
    source: ShardSource,
    *,
    resolution: int,
    channels: int,
    fields=None,
    limit: int | None = None,
    progress: bool = False,
    options: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Every sample of `source`'s shards once, in order (held-out sets, classifier training data):
    {field: (N, C, H, W) in [-1, 1], "label": (N,)}; at most `limit` samples. `options`: stream_options."""
    from tqdm import tqdm

    ds = ShardStream(
        source.urls, batch_size=1, resolution=resolution, channels=channels, seed=0, fields=fields, **_fixed(options)
    )
    items = []
    for decoded in tqdm(_each_decoded(source, ds), desc="read", disable=not progress, total=limit):
        items.append(decoded)
        if limit and len(items) >= limit:
            break
    if not items:
        raise UserError(f"no readable samples in {source.urls[0]}{' ...' if len(source.urls) > 1 else ''}")
    out = ds._batch(items, len(items))
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


def iter_all(
    source: ShardSource, *, resolution: int, channels: int, batch: int, limit: int = 0, options: dict | None = None
):
    """The images of `source`'s shards, each once, in order, as (<= batch, C, H, W) tensors in [-1, 1]
    (reference statistics: a pass over a set too big to hold); the first `limit` when > 0."""
    ds = ShardStream(source.urls, batch_size=batch, resolution=resolution, channels=channels, seed=0, **_fixed(options))
    items, total = [], 0
    for decoded in _each_decoded(source, ds):
        items.append(decoded)
        total += 1
        if len(items) == batch or total == limit:
            yield ds._batch(items, total)["image"]
            items = []
        if total == limit:
            return
    if items:
        yield ds._batch(items, total)["image"]


def heldout_source(spec: str, key: str = "data.shards") -> ShardSource | None:
    """The held-out shards that go with data spec `spec`: the folder its manifest names as
    "heldout" (the builtin image-to-image sets have one), else None."""
    source = resolve(spec, progress=False, key=key)
    name = (source.manifest or {}).get("heldout")
    if not name:
        return None
    return resolve(str(Path(source.urls[0]).parent / name), progress=False, key=f"{key} (held out)")
