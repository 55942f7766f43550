"""Write webdataset shards (KEY.png + KEY.cls + KEY.json) from builtin sets, image folders or arrays.

A finished shard folder holds `PREFIX-000000.tar ...` and a `manifest.json` that gives the
sample count, the image shape, the classes, the shard list and a brace pattern for them.
Shards are written into a hidden temporary folder first and moved into place, manifest last,
so an interrupted write never leaves a folder that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from distgan import files
from distgan.data import pixels
from distgan.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MANIFEST = "manifest.json"


FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # --format: member extension -> PIL format


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (grayscale for C=1)."""
    return encode_image(image, "png")


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """(H, W, C) uint8 -> PNG (lossless), JPEG (4:2:0 chroma at the default quality, as PIL writes)
    or WebP (lossy) bytes; grayscale for C=1."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    kw = {} if fmt == "png" else {"quality": quality}
    Image.fromarray(arr).save(buf, format=FORMATS[fmt], **kw)
    return buf.getvalue()


def _to_uint8(x: np.ndarray, source: str) -> np.ndarray:
    """Arrays as users have them: uint8 as is, floats in [0, 1] or [-1, 1]."""
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise UserError(f"{source}: array 'x' has dtype {x.dtype}; expected uint8 or float")
    x = x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(x.dtype, np.floating) and lo >= -1.0 and hi <= 1.0:
        x = (x + 1.0) * 127.5 if lo < 0 else x * 255.0
    elif lo < 0 or hi > 255:
        raise UserError(f"{source}: values span [{lo}, {hi}]; expected uint8, [0, 1] or [-1, 1]")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Arrays `x` (N, H, W[, C]) and optional `y` (N,) from an .npz file."""
    if not os.path.isfile(path):
        raise UserError(f"npz file '{path}' does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        x = data["x"]
        y = data["y"] if "y" in data.files else None
    except KeyError:
        raise UserError(f"npz file '{path}' has no array 'x' (found: {', '.join(data.files)})") from None
    except Exception as exc:
        raise UserError(f"npz file '{path}' cannot be read: {exc}") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"npz file '{path}': 'x' has shape {x.shape}; expected (N, H, W) or (N, H, W, 1|3)")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise UserError(f"npz file '{path}': 'y' has shape {y.shape}; expected ({len(x)},)")
    x = _to_uint8(x, f"npz file '{path}'")
    classes = [str(c) for c in range(int(y.max()) + 1)] if y is not None and len(y) else []
    return x, (y.astype(np.int64) if y is not None else None), classes


def _folder_entries(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    if not root.is_dir():
        raise UserError(f"image folder '{root}' does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:  # a flat folder of images: unlabelled (super-resolution, one CycleGAN domain)
        flat = [(f, None) for f in _images_in(root)]
        if not flat:
            raise UserError(f"image folder '{root}' holds no images (nor class subfolders DIR/CLASS/IMAGE.png)")
        return flat, []
    loose = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if loose:  # they would belong to no class: say so rather than leave them out
        raise UserError(
            f"image folder '{root}' has class subfolders and also images directly in it (e.g. "
            f"'{loose[0].name}'); put every image in a class subfolder, or use a flat folder"
        )
    entries = [(f, idx) for idx, name in enumerate(classes) for f in _images_in(root / name)]
    if not entries:
        raise UserError(f"image folder '{root}' has no images in its class subfolders")
    return entries, classes


def _images_in(folder: Path) -> list[Path]:
    """The image files under `folder`; entries that are not regular files (a FIFO, a socket, a device,
    a dangling link) are left out with a note, since opening one could block forever."""
    found = [f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    regular = [f for f in found if f.is_file()]
    odd = [f for f in found if not f.is_file() and not f.is_dir()]
    if odd:
        print(
            f"note: skipped {len(odd)} entr{'y' if len(odd) == 1 else 'ies'} of '{folder}' that "
            f"{'is' if len(odd) == 1 else 'are'} not a regular file (e.g. '{odd[0]}')",
            file=sys.stderr,
        )
    return sorted(regular)


def _open(path: Path, mode: str) -> Image.Image:
    """The image at `path` as `mode`, its full range mapped to 0..255 (distgan/data/pixels.py);
    refused before decoding when it has more than data.max_image_pixels' default."""
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > pixels.MAX_IMAGE_PIXELS:
                raise UserError(
                    f"image '{path}' has {img.size[0]}x{img.size[1]} pixels, over "
                    f"{pixels.MAX_IMAGE_PIXELS}; shrink it first"
                )
            img.load()
            return pixels.convert(img, mode)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"image '{path}' cannot be decoded: {str(exc)[:200]}") from None


def write_pairs(
    input_dir: str,
    target_dir: str,
    out_dir,
    *,
    resize: int | None = None,
    rgb: bool = False,
    input_rgb: bool = False,
    **kw,
) -> dict:
    """Paired shards (KEY.input.png + KEY.target.png) from two folders whose images pair up by
    relative path without the suffix (edges/0001.png <-> photos/0001.jpg). Every image must have
    its partner and the same size (`resize` center-crops and resizes both alike)."""
    roots = {"input": Path(input_dir), "target": Path(target_dir)}
    found = {}
    for name, root in roots.items():
        if not root.is_dir():
            raise UserError(f"--pairs: {name} folder '{root}' does not exist")
        found[name] = {str(f.relative_to(root).with_suffix("")): f for f in _images_in(root)}
    keys = sorted(set(found["input"]) & set(found["target"]))
    alone = sorted(set(found["input"]) ^ set(found["target"]))
    if alone:
        which = "input" if alone[0] in found["input"] else "target"
        raise UserError(
            f"--pairs: {len(alone)} image(s) have no partner, e.g. the {which} '{alone[0]}'; every "
            "input needs a target of the same name (any image suffix)"
        )
    if not keys:
        raise UserError(f"--pairs: no images in '{input_dir}' and '{target_dir}'")

    def samples():
        for k in keys:
            a = _open(found["input"][k], "RGB" if input_rgb else "L")
            b = _open(found["target"][k], "RGB" if rgb else "L")
            if a.size != b.size:
                raise UserError(
                    f"--pairs: '{k}' is {a.size[0]}x{a.size[1]} as input but {b.size[0]}x{b.size[1]} "
                    "as target; pairs must be aligned, same size"
                )
            if resize:
                a, b = _center_square(a, resize), _center_square(b, resize)
            a, b = np.asarray(a), np.asarray(b)
            pair = {"input": a[..., None] if a.ndim == 2 else a, "target": b[..., None] if b.ndim == 2 else b}
            yield pair, None, {"file": k}

    return write_shards(samples(), len(keys), out_dir, classes=[], source=f"pairs:{input_dir}|{target_dir}", **kw)


def _center_square(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def folder_samples(root: Path, entries: list[tuple[Path, int]], resize: int | None, rgb: bool) -> Iterator:
    mode = "RGB" if rgb else "L"
    for path, label in entries:
        img = _open(path, mode)
        if resize:
            img = _center_square(img, resize)
        arr = np.asarray(img)
        yield (arr[..., None] if arr.ndim == 2 else arr), label, {"file": str(path.relative_to(root))}


def write_shards(
    samples: Iterable[tuple[np.ndarray, int | None, dict]],
    count: int,
    out_dir: str | os.PathLike,
    *,
    classes: list[str],
    source: str,
    prefix: str = "shard",
    maxcount: int = 1000,
    maxsize: float = 256e6,
    overwrite: bool = False,
    progress: bool = True,
    extra_manifest: dict | None = None,
    fmt: str = "png",
    quality: int = 95,
) -> dict:
    """Write `samples` ((H, W, C) uint8 images, or (D,) float32 points; label or None; extra json)
    as shards: KEY.png (or KEY.jpg / KEY.webp with `fmt`) or KEY.npy (points), KEY.cls, KEY.json.
    Returns the manifest."""
    import webdataset as wds

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got '{fmt}'")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality must be in 1..100; got {quality}")

    out = Path(out_dir)
    if out.exists() and any(out.glob("*.tar")) or (out / MANIFEST).exists():
        if not overwrite:
            raise UserError(f"'{out}' already holds shards; pass --overwrite to replace them or pick another --out")
    if maxcount < 1 or maxsize < 1:
        raise UserError("--maxcount and --maxsize must be positive")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-shards-", dir=out))
    shape = input_shape = None
    n = 0
    try:
        pattern = str(tmp / f"{prefix}-%06d.tar")
        # An integer mtime keeps tar headers plain ustar: a float one adds a PAX header per member,
        # which doubles the reader's header parsing. A fixed one makes shards reproducible.
        with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0) as sink:
            for image, label, extra in tqdm(samples, total=count, desc=f"shards {out}", disable=not progress):
                pair = image if isinstance(image, dict) else None  # paired: {"input": ..., "target": ...}
                if pair is not None:
                    image = pair["target"]
                    input_shape = input_shape or tuple(pair["input"].shape)
                if shape is None:
                    shape = tuple(image.shape)
                elif tuple(image.shape) != shape:
                    where = extra.get("file", f"sample {n}")
                    raise UserError(
                        f"{where} has shape {tuple(image.shape)} but earlier images have {shape}; "
                        "pass --resize N to bring all images to N x N"
                    )
                sample = {"__key__": f"{n:08d}", "json": {"index": n, **extra}}
                if pair is not None:
                    sample[f"input.{fmt}"] = encode_image(pair["input"], fmt, quality)
                    sample[f"target.{fmt}"] = encode_image(image, fmt, quality)
                elif image.ndim == 1:
                    buf = io.BytesIO()
                    np.save(buf, image.astype(np.float32))
                    sample["npy"] = buf.getvalue()
                else:
                    sample[fmt] = encode_image(image, fmt, quality)
                if label is not None:
                    sample["cls"] = int(label)
                sink.write(sample)
                n += 1
        if n == 0:
            raise UserError(f"no samples to write from {source}")
        names = sorted(p.name for p in tmp.glob(f"{prefix}-*.tar"))
        for stale in list(out.glob("*.tar")) + ([out / MANIFEST] if (out / MANIFEST).exists() else []):
            stale.unlink()
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = {
        "count": n,
        "kind": "paired" if input_shape else "points" if len(shape) == 1 else "images",
        "image_shape": list(shape),  # H, W, C of the stored images (paired: the targets); (D,) for points
        **({"format": fmt, "quality": quality} if fmt != "png" else {}),
        **({"input_shape": list(input_shape)} if input_shape else {}),
        "classes": classes,
        "num_classes": len(classes),
        "shards": names,
        "pattern": f"{prefix}-{{000000..{len(names) - 1:06d}}}.tar",
        "source": source,
        **(extra_manifest or {}),
    }
    files.write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def write_arrays(x, y: np.ndarray | None, classes: list[str], out_dir, *, source: str, **kw) -> dict:
    """`x`: (N, H, W, C) uint8 images or (N, D) points, or paired images as a dict {"input": ...,
    "target": ...} of two such arrays."""
    n = len(x["target"]) if isinstance(x, dict) else len(x)
    labels = y if y is not None else [None] * n
    if isinstance(x, dict):
        samples = (({"input": x["input"][i], "target": x["target"][i]}, labels[i], {}) for i in range(n))
    else:
        samples = ((x[i], labels[i], {}) for i in range(n))
    return write_shards(samples, n, out_dir, classes=classes, source=source, **kw)


def write_folder(root: str, out_dir, *, resize: int | None = None, rgb: bool = False, **kw) -> dict:
    rootp = Path(root)
    entries, classes = _folder_entries(rootp)
    samples = folder_samples(rootp, entries, resize, rgb)
    return write_shards(samples, len(entries), out_dir, classes=classes, source=f"images:{root}", **kw)


HELDOUT = "heldout"


def write_builtin(name: str, out_dir, **kw) -> dict:
    from distgan.data import builtin

    kw.setdefault("prefix", name)
    if name in builtin.IMAGE2IMAGE:  # training shards, and held-out ones in OUT/heldout/ for eval
        train, held = builtin.IMAGE2IMAGE[name]()
        progress = kw.get("progress", True)
        held_kw = {**kw, "maxcount": 10_000, "progress": False}
        write_arrays(held, None, [], Path(out_dir) / HELDOUT, source=f"builtin:{name} (held out)", **held_kw)
        kw["extra_manifest"] = {"heldout": HELDOUT}
        if progress:
            print(f"held-out samples for eval: {Path(out_dir) / HELDOUT}")
        return write_arrays(train, None, [], out_dir, source=f"builtin:{name}", **kw)
    x, y, classes = builtin.load(name)
    if name in builtin.MIXTURES:  # what distgan eval measures samples against
        centres, std = builtin.mixture_spec(name)
        kw["extra_manifest"] = {"mixture": {"centres": centres.tolist(), "std": std}}
    return write_arrays(x, y, classes, out_dir, source=f"builtin:{name}", **kw)


# Small shards so that 2 ranks x 2 workers each get their own on the 1797 digits.
BUILTIN_MAXCOUNT = 250
# Part of the cache folder's name: bump it when the way builtin shards are written changes.
CACHE_VERSION = 3


def ensure_builtin(name: str, progress: bool = True) -> Path:
    """The folder of builtin `name`'s shards in the cache, written on first use."""
    folder = files.cache_root() / "shards" / f"{name}-v{CACHE_VERSION}"
    if not (folder / MANIFEST).exists():
        # 100k points or 60k stacked digits: ~10 shards; the real digits and the image-to-image
        # sets (4000 patches, 800 digits): small ones, so 2 ranks x 2 workers each get their own
        maxcount = 10_000 if name in ("ring", "grid", "stacked-digits") else BUILTIN_MAXCOUNT
        write_builtin(name, folder, maxcount=maxcount, overwrite=True, progress=progress)
    return folder


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"manifest '{path}' cannot be read: {exc}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"manifest '{path}' is not a JSON object")
    # Names in a manifest are files of its own folder: never a path elsewhere, a URL or a command.
    names = manifest.get("shards") or []
    heldout = manifest.get("heldout")
    for name in [*(names if isinstance(names, list) else [names]), *([heldout] if heldout else [])]:
        if not _plain_name(name):
            raise UserError(
                f"manifest '{path}' names {str(name)[:200]!r}; a manifest may only name files in its own folder"
            )
    _check_keys(manifest, path)
    return manifest


def _is_shape(value, lengths: tuple[int, ...]) -> bool:
    return (
        isinstance(value, list)
        and len(value) in lengths
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The keys distgan reads from a manifest, and what each must be. A manifest is only used for checks
# and conveniences (the shard list, the image size, the classes): a key that is absent is not used,
# so a manifest written by another tool works as long as the keys it shares with these are well formed.
MANIFEST_KEYS = {
    "shards": ("a list of shard file names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "image_shape": (
        "[H, W, C] (images: C 1 to 4), or [D] for points",
        lambda v: _is_shape(v, (1, 3)),
    ),
    "input_shape": ("[H, W, C] (C 1 to 4)", lambda v: _is_shape(v, (3,)) and v[2] <= 4),
    "kind": ("images, points, paired or latents", lambda v: v in ("images", "points", "paired", "latents")),
    "classes": ("a list of class names", lambda v: isinstance(v, list)),
    "count": (
        "a number of samples (an integer >= 0)",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    ),
    "heldout": ("a folder name", lambda v: isinstance(v, str)),
    "mixture": (
        '{"centres": [[x, y], ...], "std": s}',
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("centres"), list)
            and all(isinstance(c, list) and len(c) == 2 and all(_is_number(x) for x in c) for c in v["centres"])
            and _is_number(v.get("std"))
        ),
    ),
}


def _check_keys(manifest: dict, path: Path) -> None:
    """One line naming the manifest and its first malformed key; absent keys are fine (see MANIFEST_KEYS)."""
    for key, (expected, ok) in MANIFEST_KEYS.items():
        if key in manifest and not ok(manifest[key]):
            shown = json.dumps(manifest[key])
            shown = shown if len(shown) <= 120 else shown[:100] + f"... ({len(shown)} characters)"
            raise UserError(f"manifest '{path}': key '{key}' is {shown}; expected {expected}")
    if manifest.get("kind") == "points" and "image_shape" in manifest and len(manifest["image_shape"]) != 1:
        raise UserError(f"manifest '{path}': kind 'points' needs image_shape [D]; got {manifest['image_shape']}")
    if manifest.get("kind", "images") != "points" and len(manifest.get("image_shape") or [0, 0, 0]) != 3:
        raise UserError(f"manifest '{path}': image_shape {manifest['image_shape']} is not [H, W, C]")
    if manifest.get("kind", "images") in ("images", "paired") and (manifest.get("image_shape") or [0, 0, 0])[2] > 4:
        raise UserError(f"manifest '{path}': image_shape {manifest['image_shape']} has more than 4 channels")


def _plain_name(name) -> bool:
    """A file or folder name with no path in it (no '/', '\\' or '..'), and no ':' (a URL scheme such as
    pipe: once joined to a relative folder)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\:")
