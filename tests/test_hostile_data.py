"""Hostile and odd shard data: bounded memory for every member and image, every pixel mode mapped
to its full range, one short line for every bad sample, foreign manifests, odd folder entries.

The hostile files are small on disk (a sparse member, gzip of zeros, a PNG of zero rows) but
declare or inflate to hundreds of MB; the memory tests compare the peak RSS of a real training run
on them with the same run on clean shards."""

import functools
import gzip
import io
import json
import os
import sys
import tarfile
import zlib

import numpy as np
import pytest
from conftest import FAST, ROOT, run_cli, run_main
from PIL import Image

from distgan.data import pixels, shards, stream, tarstream
from distgan.errors import UserError


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def digit_members(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    from distgan.data import builtin

    x, y, _ = builtin.digits()
    out = []
    for i in range(start, start + n):
        out += [(f"d{i:04d}.png", png(x[i, ..., 0])), (f"d{i:04d}.cls", str(int(y[i])).encode())]
    return out


def write_tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def gnu_sparse_member(name: str, real_size: int) -> bytes:
    """A GNU tar sparse member (as `tar -S` writes it): one stored block of data, at the end of a
    `real_size`-byte file that is otherwise a hole."""
    info = tarfile.TarInfo(name)
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = b"S"
    header[386:410] = f"{real_size - 512:011o}\0{512:011o}\0".encode()  # sparse map: (offset, numbytes)
    header[482] = 0  # no extension blocks
    header[483:495] = f"{real_size:011o}\0".encode()
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header) + bytes(512)


def huge_png(side: int) -> bytes:
    """A valid side x side RGBA PNG of zeros: under 1 MB on disk, side^2 x 4 bytes decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    comp = zlib.compressobj(9)
    row = bytes(1 + side * 4)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 6, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def member(name: str, data: bytes) -> bytes:
    """One ustar member: header, data, padding."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


@functools.lru_cache
def huge_png_13000() -> bytes:
    return huge_png(13000)


class _Zeros(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k

    def readable(self):
        return True


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """clean/: 4 shards of 60 real digits. hostile/: 3 of them plus, in each, a sample whose member is
    a sparse 1 GB file and one with a 13000^2 PNG; and a gzip shard with a 300 MB member of zeros."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "clean").mkdir()
    (root / "hostile").mkdir()
    for s in range(4):
        clean = digit_members(60, start=60 * s)
        write_tar(root / "clean" / f"c-{s}.tar", clean)
        if s == 3:
            break
        parts = [member(n, d) for n, d in clean[:60]]
        parts += [member("big.png", huge_png_13000()), member("big.cls", b"1")]
        parts += [gnu_sparse_member("hole.png", 1 << 30), member("hole.cls", b"2")]
        parts += [member(n, d) for n, d in clean[60:]]
        (root / "hostile" / f"h-{s}.tar").write_bytes(b"".join(parts) + bytes(1024))
    with gzip.open(root / "hostile" / "z-0.tar", "wb", compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in digit_members(60, start=180):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("zeros.png")
            info.size = 300_000_000
            tar.addfile(info, io.BufferedReader(_Zeros(info.size)))
            tar.addfile(_cls("zeros.cls"), io.BytesIO(b"3"))
    return root


def _cls(name):
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


RSS = (
    "import resource, sys\nfrom distgan.cli import main\ncode = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)"
)


def train_rss(out, shards_spec, *extra):
    """A real training run in a fresh process: (CompletedProcess, its peak RSS in MB)."""
    import subprocess

    r = subprocess.run(
        [
            sys.executable,
            "-c",
            RSS,
            "train",
            *FAST,
            f"data.shards={shards_spec}",
            "--out",
            str(out),
            "train.steps=12",
            "data.shuffle_buffer=50",
            "data.cache=off",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    peak = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    return r, (peak[0] / 1024 if peak else None)


def test_hostile_members_and_images_take_no_more_memory_than_clean_shards(hostile, tmp_path):
    spec, clean = hostile / "hostile", hostile / "clean"  # folders of shards, no manifest
    r0, base = train_rss(tmp_path / "clean", clean)
    assert r0.returncode == 0, r0.stderr[-2000:]
    r1, peak = train_rss(tmp_path / "hostile", spec, "data.on_error=skip")
    assert r1.returncode == 0, r1.stderr[-2000:]
    skipped = [json.loads(x) for x in (tmp_path / "hostile" / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("data/skipped", 0) for m in skipped) >= 1  # they were drawn, refused and counted
    # a 1 GB hole, a 300 MB inflated member or a 676 MB decoded image would show here
    assert peak < base + 80, (peak, base)


def test_over_the_bounds_raise_names_shard_key_member_and_bound(hostile, tmp_path):
    hole = tmp_path / "hole.tar"
    hole.write_bytes(gnu_sparse_member("hole.png", 1 << 30) + member("hole.cls", b"2") + bytes(1024))
    ds = stream.ShardStream([str(hole)], batch_size=1, resolution=8, channels=1, seed=0)
    with pytest.raises(UserError) as err:
        next(iter(ds))
    msg = str(err.value)
    assert f"sample 'hole' of shard '{hole}': member 'hole.png' not read: 1073741824 bytes" in msg, msg
    assert "over data.max_member_bytes=64000000" in msg
    write_tar(tmp_path / "big.tar", [("big.png", huge_png_13000()), ("big.cls", b"1")])
    ds = stream.ShardStream([str(tmp_path / "big.tar")], batch_size=1, resolution=8, channels=1, seed=0)
    with pytest.raises(UserError, match=r"image of 13000x13000 pixels \(png\) is over data.max_image_pixels=50000000"):
        next(iter(ds))
    # the gzip shard: bounded on its inflated size
    z = hostile / "hostile" / "z-0.tar"
    ds = stream.ShardStream([str(z)], batch_size=500, resolution=8, channels=1, seed=0)
    with pytest.raises(UserError, match="member 'zeros.png' not read: 300000000 bytes"):
        next(iter(ds))
    # a bound set by the user applies, and the good samples around a refused one still come
    ds = stream.ShardStream(
        [str(hostile / "hostile" / "h-0.tar")],
        batch_size=60,
        resolution=8,
        channels=1,
        seed=0,
        on_error="skip",
        max_member_bytes=1000,
        shuffle_buffer=1,
    )
    b = next(iter(ds))
    assert b["skipped"] >= 1 and len(b["label"]) == 60


def test_tar_formats_and_extended_headers(tmp_path):
    members = digit_members(3)
    long = [(("x" * 150) + name, data) for name, data in members]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        write_tar(tmp_path / f"{fmt}.tar", long if fmt else members, fmt)
        got = list(tarstream.samples([str(tmp_path / f"{fmt}.tar")], select=lambda n: True, max_member=10**6))
        assert [sorted(k for k in s if not k.startswith("__")) for s in got] == [["cls", "png"]] * 3
        assert got[0]["png"] == members[0][1]
    # a pax header that declares a 2 GB path: the shard is unreadable, nothing is allocated for it
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 2 << 30
    (tmp_path / "pax.tar").write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + bytes(4096))
    with pytest.raises(tarstream.TarFormatError, match="extended tar header of 2147483648 bytes"):
        list(tarstream.samples([str(tmp_path / "pax.tar")], select=lambda n: True, max_member=10**6))
    # a ".tar" that is a gzip stream of 200 MB of zeros: the two zero blocks at its start end it
    with gzip.open(tmp_path / "zeros.tar", "wb", compresslevel=1) as gz:
        for _ in range(200):
            gz.write(bytes(1 << 20))
    assert list(tarstream.samples([str(tmp_path / "zeros.tar")], select=lambda n: True, max_member=10**6)) == []
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(tarstream.TarFormatError, match="bad tar header checksum"):
        list(tarstream.samples([str(tmp_path / "junk.tar")], select=lambda n: True, max_member=10**6))


def _png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if img.mode in ("I", "F", "CMYK", "LAB", "YCbCr") else "PNG")
    return buf.getvalue()


def _pa() -> Image.Image:
    img = Image.frombytes("PA", (2, 1), bytes([0, 255, 1, 255]))
    img.putpalette([0, 0, 0, 255, 255, 255])
    return img


# (mode, a small image in that mode, the expected L values, the expected RGB values), by hand:
# 16-bit: v / 65535 * 255; 32-bit int: (v + 2^31) / (2^32 - 1) * 255; float: v * 255, clipped;
# LAB (a*, b* stored as signed bytes: 0 is neutral): L* 100 is white, 0 black, 50 sRGB 119
MODES = [
    ("I;16", Image.fromarray(np.array([[0, 65535, 32896, 257]], np.uint16)), [0, 255, 128, 1], None),
    ("I", Image.fromarray(np.array([[-(2**31), 2**31 - 1, 0, 1 << 24]], np.int32)), [0, 255, 128, 128], None),
    ("F", Image.fromarray(np.array([[0.0, 1.0, 0.5, 7.0]], np.float32)), [0, 255, 128, 255], None),
    ("1", Image.fromarray(np.array([[False, True, True, False]])), [0, 255, 255, 0], None),
    ("L", Image.fromarray(np.array([[0, 255, 128, 7]], np.uint8)), [0, 255, 128, 7], None),
    ("P", Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8)).convert("P"), [0, 1, 1, 0], None),
    (
        "RGB",
        Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], np.uint8)),
        [76, 29, 255, 0],
        [[255, 0, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]],
    ),
    (
        "RGBA",
        Image.fromarray(np.array([[[255, 0, 0, 9], [0, 255, 0, 255], [9, 9, 9, 0], [0, 0, 0, 0]]], np.uint8)),
        [76, 150, 9, 0],
        [[255, 0, 0], [0, 255, 0], [9, 9, 9], [0, 0, 0]],
    ),
    ("LA", Image.fromarray(np.array([[[200, 0], [10, 255], [0, 9], [255, 255]]], np.uint8)), [200, 10, 0, 255], None),
    (
        "CMYK",
        Image.frombytes("CMYK", (4, 1), bytes([0, 0, 0, 0, 255, 255, 255, 0, 0, 0, 0, 255, 0, 255, 255, 0])),
        [255, 0, 0, 76],
        [[255, 255, 255], [0, 0, 0], [0, 0, 0], [255, 0, 0]],
    ),
    (
        "LAB",
        Image.frombytes("LAB", (4, 1), bytes([255, 0, 0, 0, 0, 0, 128, 0, 0, 128, 0, 0])),
        [255, 0, 119, 119],
        [[255, 255, 255], [0, 0, 0], [119, 119, 119], [119, 119, 119]],
    ),
    ("I;16B", Image.frombytes("I;16B", (2, 1), b"\xff\xff\x01\x01"), [255, 1], None),  # big-endian 65535, 257
    ("YCbCr", Image.frombytes("YCbCr", (2, 1), bytes([255, 128, 128, 0, 128, 128])), [255, 0], None),
    ("HSV", Image.frombytes("HSV", (2, 1), bytes([0, 0, 255, 0, 255, 255])), [255, 76], [[255, 255, 255], [255, 0, 0]]),
    (
        "RGBX",
        Image.frombytes("RGBX", (2, 1), bytes([255, 0, 0, 0, 0, 0, 255, 0])),
        [76, 29],
        [[255, 0, 0], [0, 0, 255]],
    ),
    # premultiplied alpha: 50 at alpha 128 is 50 * 255 / 128 = 99.6 un-premultiplied
    ("La", Image.frombytes("La", (2, 1), bytes([100, 255, 50, 128])), [100, 99.6], None),
    (
        "RGBa",
        Image.frombytes("RGBa", (2, 1), bytes([100, 0, 0, 255, 50, 0, 0, 128])),
        [30, 30],
        [[100, 0, 0], [99.6, 0, 0]],
    ),
    ("PA", _pa(), [0, 255], None),
]


@pytest.mark.parametrize("mode,img,grey,rgb", MODES, ids=[m[0] for m in MODES])
def test_every_mode_maps_its_full_range(mode, img, grey, rgb):
    assert img.mode == mode
    got = np.asarray(pixels.convert(img, "L")).ravel()
    np.testing.assert_allclose(got, grey, atol=1)
    want_rgb = np.array(rgb if rgb is not None else [[g] * 3 for g in grey])
    np.testing.assert_allclose(np.asarray(pixels.convert(img, "RGB")).reshape(-1, 3), want_rgb, atol=1)


def test_sixteen_bit_grey_reaches_the_model_unclipped_in_the_stream_and_in_distgan_shards(tmp_path, capsys):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535 in 256 steps
    want = np.arange(256).reshape(16, 16)  # v / 257
    write_tar(tmp_path / "s.tar", [("a.png", png(ramp)), ("a.cls", b"0")])
    b = stream.read_all(stream.ShardSource([str(tmp_path / "s.tar")], None), resolution=16, channels=1)
    got = np.rint((b["image"][0, 0].numpy() + 1) * 127.5)
    np.testing.assert_array_equal(got, want)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(ramp))
    code, _, err = run_main(capsys, "shards", "--images", tmp_path / "imgs", "--out", tmp_path / "out")
    assert code == 0, err
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        stored = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
    np.testing.assert_array_equal(stored, want)


def test_bad_labels_give_one_short_line_or_are_skipped(tmp_path):
    x = digit_members(1)[0][1]
    bad = {
        "big": ("cls", b"99999999999999999999999"),  # an integer beyond int64
        "inf": ("json", b'{"label": 1e999}'),  # a float that overflows
        "huge": ("json", b'{"label": 1e300}'),  # a float that is an integer, beyond int64
        "deep": ("json", b"[" * 200_000 + b"]" * 200_000),  # nesting past Python's recursion limit
        "long": ("cls", b"7" * 1_000_000),  # a 1 MB label
    }
    for key, (ext, data) in bad.items():
        write_tar(tmp_path / f"{key}.tar", [(f"{key}.png", x), (f"{key}.{ext}", data)])
        label_key = "json:label" if ext == "json" else ""
        ds = stream.ShardStream(
            [str(tmp_path / f"{key}.tar")], batch_size=1, resolution=8, channels=1, seed=0, label_key=label_key
        )
        with pytest.raises(UserError) as err:
            next(iter(ds))
        assert len(str(err.value)) < 800 and f"sample '{key}'" in str(err.value), (key, str(err.value)[:1000])
        # skip mode: skipped and counted, the good sample after it comes
        write_tar(
            tmp_path / f"{key}2.tar",
            [(f"{key}.png", x), (f"{key}.{ext}", data), ("ok.png", x), ("ok.cls", b"1"), ("ok.json", b'{"label": 1}')],
        )
        ds = stream.ShardStream(
            [str(tmp_path / f"{key}2.tar")],
            batch_size=1,
            resolution=8,
            channels=1,
            seed=0,
            label_key=label_key,
            on_error="skip",
            shuffle_buffer=1,
        )
        b = next(iter(ds))
        assert b["label"].tolist() == [1] and b["skipped"] == 1, key


def test_foreign_and_malformed_manifests(tmp_path, digits_shards, capsys):
    import shutil

    def folder(name, manifest):
        f = tmp_path / name
        f.mkdir()
        for t in sorted(digits_shards.glob("*.tar"))[:2]:
            shutil.copy(t, f / t.name)
        (f / "manifest.json").write_text(json.dumps(manifest))
        return f

    # another tool's manifest, with keys of its own: the shards are read without it
    foreign = folder("foreign", {"name": "my-set", "files": 2, "created_by": "img2dataset"})
    assert len(stream.resolve(str(foreign)).urls) == 2
    code, _, err = run_main(
        capsys, "train", *FAST, f"data.shards={foreign}", "--out", tmp_path / "run", "train.steps=2"
    )
    assert code == 0, err[-2000:]
    for name, manifest, needle in [
        ("shape2", {"image_shape": [8, 8]}, "key 'image_shape' is [8, 8]; expected [H, W, C]"),
        ("shapestr", {"image_shape": "8x8"}, "key 'image_shape' is \"8x8\""),
        ("shards", {"shards": "digits-000000.tar"}, "key 'shards' is \"digits-000000.tar\"; expected a list"),
        ("kind", {"kind": ["images"]}, "key 'kind' is [\"images\"]"),
    ]:
        f = folder(name, manifest)
        with pytest.raises(UserError) as err:
            stream.resolve(str(f))
        assert f"manifest '{f / 'manifest.json'}': {needle}" in str(err.value), str(err.value)
    code, _, err = run_main(capsys, "train", *FAST, f"data.shards={tmp_path / 'shape2'}", "--out", tmp_path / "r2")
    assert code == 2 and "key 'image_shape'" in err, err[-2000:]  # main() turns it into one line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_shards_from_a_folder_skip_entries_that_are_not_regular_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(np.full((8, 8), 40 * i, np.uint8)))
    os.mkfifo(tmp_path / "imgs" / "pipe.png")  # opening it would wait for a writer forever
    os.symlink(tmp_path / "nowhere.png", tmp_path / "imgs" / "dangling.png")
    r = run_cli("shards", "--images", tmp_path / "imgs", "--out", tmp_path / "out", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped 2 entries" in r.stderr and "not a regular file" in r.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["count"] == 3


def test_the_config_defaults_are_the_streams(tmp_path):
    from distgan import config

    d = config.DataConfig()
    assert (d.max_member_bytes, d.max_image_pixels) == (pixels.MAX_MEMBER_BYTES, pixels.MAX_IMAGE_PIXELS)
    with pytest.raises(UserError, match="data.max_member_bytes' must be >= 1"):
        config.load_config(None, None, ["data.max_member_bytes=0"])
    assert shards.MANIFEST_KEYS  # documented in docs/data.md


def _cache_memory(urls, cache_bytes, batches=60):
    """(peak, current) traced memory (tracemalloc sees numpy's arrays) while streaming `batches`
    batches, the stream (and its cache) still alive at the end."""
    import tracemalloc

    ds = stream.ShardStream(
        urls, batch_size=20, resolution=64, channels=3, seed=0, shuffle_buffer=1, cache_bytes=cache_bytes
    )
    tracemalloc.start()
    try:
        it = iter(ds)
        for _ in range(batches):
            next(it)
        current, peak = tracemalloc.get_traced_memory()
        return peak, current
    finally:
        tracemalloc.stop()


def test_the_ram_cache_never_holds_more_than_its_budget(tmp_path):
    rng = np.random.default_rng(0)
    urls = []
    # RGB images at 64 px (12 KB decoded each). Seed 0 draws shards 4, 3, 2, 3, 3, 1 ...: two small
    # shards that fit the budget, then one of 600 images (7.4 MB) that does not
    for s, n in enumerate([100, 100, 600, 100, 100, 100]):
        members = []
        for i in range(n):
            image = png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            members += [(f"{s}-{i:03d}.png", image), (f"{s}-{i:03d}.cls", b"0")]
        write_tar(tmp_path / f"s{s}.tar", members)
        urls.append(str(tmp_path / f"s{s}.tar"))
    budget = 3_000_000
    _cache_memory(urls, 0, batches=5)  # one-time allocations (imports, decoder set-up) are not the cache's
    off_peak, off_now = _cache_memory(urls, 0)
    on_peak, on_now = _cache_memory(urls, budget)
    held = on_now - off_now
    assert 150 * 64 * 64 * 3 < held <= budget, held  # the two small shards (2.46 MB of pixels), not nothing
    # while the big shard was read, the cache let go of it at the budget instead of holding it whole
    assert on_peak - off_peak <= budget + 200_000, (on_peak - off_peak, budget)
