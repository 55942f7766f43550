"""The shards users already have: webdataset ShardWriter shards with JPEG/WebP members and no
manifest, the image-key and label-key rules, crops of mixed sizes, RGB <-> grayscale, the
`distgan shards --format` round trip, and the brace-list override."""

import io
import json

import numpy as np
import pytest
from conftest import FAST, cli, read_metrics
from PIL import Image

from distgan import config
from distgan.data import shards, stream
from distgan.errors import UserError


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def photos(n: int, seed: int = 0, sizes=((40, 40), (48, 32), (30, 60))) -> list[np.ndarray]:
    """Smooth RGB images of mixed sizes (H, W), so JPEG keeps them close."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(40, 200, 3)
        img = base + 40 * np.sin(xx[..., None] / (3 + i % 5) + rng.uniform(0, 6, 3)) * np.cos(yy[..., None] / 7)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def shardwriter(folder, samples, maxcount=6):
    """Shards as webdataset's own ShardWriter writes them (no manifest.json)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    return sorted(folder.glob("*.tar"))


def first_batch(urls, **kw):
    opts = dict(
        batch_size=kw.pop("batch_size", 4),
        resolution=kw.pop("resolution", 16),
        channels=kw.pop("channels", 3),
        seed=0,
        shuffle_buffer=1,
    )
    return next(iter(stream.ShardStream([str(u) for u in urls], **opts, **kw)))


def test_shardwriter_jpeg_shards_without_manifest_train_and_resume_exactly(tmp_path, capsys):
    from test_augment import split_run_resumes_exactly

    imgs = photos(18)
    shardwriter(
        tmp_path / "jpg",
        ({"__key__": f"{i:06d}", "jpg": encode(im, "JPEG", quality=90), "cls": i % 3} for i, im in enumerate(imgs)),
    )
    assert not (tmp_path / "jpg" / "manifest.json").exists()
    common = [
        *FAST,
        f"data.shards={tmp_path / 'jpg'}/train-{{000000..000002}}.tar",
        "data.channels=3",
        "data.batch_size=6",
        "train.ckpt_every=1000",
    ]
    split_run_resumes_exactly(tmp_path, common, total=4, at=2)
    # conditional: the .cls labels (0, 1, 2) reach the training step: 3 classes train; with 2, label 2
    # is refused by name (an unread label would be -1 and pass as "unlabelled" nowhere)
    r = cli(
        capsys,
        "train",
        "--preset",
        "digits-cgan",
        *common,
        "model.num_classes=3",
        "--out",
        tmp_path / "c",
        "train.steps=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(
        capsys,
        "train",
        "--preset",
        "digits-cgan",
        *common,
        "model.num_classes=2",
        "--out",
        tmp_path / "c2",
        "train.steps=2",
    )
    assert r.returncode == 2 and "label 2 is out of range (model.num_classes=2)" in r.stderr, r.stderr[-3000:]


def test_webp_with_a_json_label_and_a_conditional_model_needs_labels(tmp_path, capsys):
    imgs = photos(8)
    urls = shardwriter(
        tmp_path / "w",
        (
            {
                "__key__": f"{i:06d}",
                "webp": encode(im, "WEBP", quality=90),
                "json": json.dumps({"label": i % 4, "caption": "x"}).encode(),
            }
            for i, im in enumerate(imgs)
        ),
        maxcount=100,
    )
    b = first_batch(urls, label_key="json:label", batch_size=8)  # one shard, read in order
    assert b["image"].shape == (8, 3, 16, 16) and sorted(b["label"].tolist()) == sorted(i % 4 for i in range(8))
    assert first_batch(urls, batch_size=8)["label"].tolist() == [-1] * 8  # no cls: unlabelled is fine
    with pytest.raises(UserError, match="no label .* which a conditional variant needs"):
        first_batch(urls, num_classes=4)
    with pytest.raises(UserError, match="label 3 is out of range \\(model.num_classes=3\\)"):
        first_batch(urls, label_key="json:label", num_classes=3, batch_size=8)
    r = cli(
        capsys,
        "train",
        "--preset",
        "digits-cgan",
        *FAST,
        f"data.shards={tmp_path / 'w'}",
        "data.channels=3",
        "train.steps=1",
        "--out",
        tmp_path / "r",
    )
    assert r.returncode == 2 and "which a conditional variant needs (set data.on_error=skip" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_first_image_extension_present_is_taken_unless_image_key_names_one(tmp_path):
    red, blue = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    urls = shardwriter(
        tmp_path / "s", [{"__key__": "a", "png": encode(red, "PNG"), "jpg": encode(blue, "JPEG"), "cls": "2"}]
    )
    png = first_batch(urls, batch_size=1)
    assert png["image"][0, 0].min() == 1.0 and png["label"].tolist() == [2]  # red: the png
    jpg = first_batch(urls, batch_size=1, image_key="jpg")
    assert jpg["image"][0, 2].mean() > 0.9 and jpg["image"][0, 0].mean() < -0.9  # blue: the jpg
    with pytest.raises(UserError, match="no .webp member \\(members: cls\\)"):
        first_batch(urls, batch_size=1, image_key="webp")
    with pytest.raises(UserError, match="data.image_key"):
        config.load_config(None, None, ["data.image_key=gif"])


def test_crop_modes_on_a_wide_image_and_grayscale_rgb_conversion(tmp_path):
    wide = np.zeros((16, 48, 3), np.uint8)  # left third black, middle grey, right third white
    wide[:, 16:32], wide[:, 32:] = 128, 255
    urls = shardwriter(tmp_path / "s", [{"__key__": "a", "png": encode(wide, "PNG")}])
    center = first_batch(urls, batch_size=1, crop="center")["image"]
    assert float(center.min()) == float(center.max()) == pytest.approx(128 / 127.5 - 1, abs=1e-6)  # the middle square
    squeezed = first_batch(urls, batch_size=1, crop="none")["image"][0, 0, 0]  # all three bands
    assert squeezed[0] == -1.0 and squeezed[-1] == 1.0
    # random: a square somewhere along the width, the same for the same seed and position
    seen = {
        float(first_batch(urls, batch_size=1, crop="random", rank=r, world_size=6)["image"].mean()) for r in range(6)
    }
    assert len(seen) > 1 and all(-1 <= v <= 1 for v in seen)
    again = {
        float(first_batch(urls, batch_size=1, crop="random", rank=r, world_size=6)["image"].mean()) for r in range(6)
    }
    assert seen == again
    gray = first_batch(urls, batch_size=1, channels=1)["image"]
    assert gray.shape == (1, 1, 16, 16)
    small = shardwriter(tmp_path / "t", [{"__key__": "b", "png": encode(np.zeros((8, 12), np.uint8), "PNG")}])
    up = first_batch(small, batch_size=1, crop="center", channels=3)["image"]  # gray -> RGB, upscaled
    assert up.shape == (1, 3, 16, 16)
    with pytest.raises(UserError, match="smaller than data.resolution=16 \\(data.crop=none does not upscale\\)"):
        first_batch(small, batch_size=1, crop="none")


def test_jpeg_draft_decoding_stays_close_to_the_full_decode(tmp_path):
    big = photos(1, sizes=((256, 256),))[0]
    urls = shardwriter(tmp_path / "s", [{"__key__": "a", "jpg": encode(big, "JPEG", quality=95)}])
    fast = first_batch(urls, batch_size=1, resolution=64, draft=True)["image"]
    full = first_batch(urls, batch_size=1, resolution=64, draft=False)["image"]
    err = (fast - full).abs()
    assert float(err.mean()) < 0.02 and float(err.max()) < 0.2  # in [-1, 1]: < 1% and < 10% of the range
    # and the draft did decode at a quarter of the size: not the full decode again
    assert float(err.max()) > 1e-3


def test_bad_labels_are_skipped_and_counted_or_named(tmp_path):
    imgs = photos(6, sizes=((16, 16),))
    samples = [
        {"__key__": f"{i:06d}", "png": encode(im, "PNG"), "cls": b"seven" if i == 2 else str(i).encode()}
        for i, im in enumerate(imgs)
    ]
    urls = shardwriter(tmp_path / "s", samples)
    with pytest.raises(UserError, match="sample '000002' of shard .*: label b'seven' is not an integer"):
        first_batch(urls, batch_size=6)
    b = first_batch(urls, batch_size=5, on_error="skip")
    assert b["skipped"] == 1 and 2 not in b["label"].tolist()


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_shards_format_round_trip(tmp_path, fmt, capsys):
    x = np.stack(photos(5, sizes=((32, 32),)))
    r = cli(capsys, "shards", "--npz", _npz(tmp_path, x), "--out", tmp_path / "o", "--format", fmt, "--quality", "92")
    assert r.returncode == 0, r.stderr
    manifest = shards.read_manifest(tmp_path / "o")
    got = stream.read_all(stream.resolve(str(tmp_path / "o")), resolution=32, channels=3)["image"]
    back = np.round((got.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)
    names = _members(tmp_path / "o")
    assert all(n.endswith(f".{fmt}") for n in names if not n.endswith((".json", ".cls")))
    if fmt == "png":
        np.testing.assert_array_equal(back, x)
        assert "format" not in manifest
    else:
        diff = np.abs(back.astype(int) - x.astype(int))
        assert diff.mean() < 3 and manifest["format"] == fmt and manifest["quality"] == 92


def _npz(tmp_path, x):
    np.savez(tmp_path / "x.npz", x=x)
    return tmp_path / "x.npz"


def _members(folder):
    import tarfile

    return [m.name for t in sorted(folder.glob("*.tar")) for m in tarfile.open(t).getmembers()]


def test_a_brace_list_override_is_taken_literally(tmp_path, digits_shards, capsys):
    cfg = config.load_config(None, None, ["data.shards={a.tar,b.tar}", "tracking.wandb.entity=null"])
    assert cfg.data.shards == "{a.tar,b.tar}" and cfg.tracking.wandb.entity is None
    names = sorted(p.name for p in digits_shards.glob("*.tar"))[:2]
    spec = f"{digits_shards}/{{{','.join(names)}}}"
    r = cli(capsys, "train", *FAST, f"data.shards={spec}", "train.steps=1", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m for m in read_metrics(tmp_path / "r") if "loss/d" in m]


def _stream_batches(urls, n, cache_bytes, workers=0, rank=0, world=1, start=None, offset=0):
    ds = stream.ShardStream(
        [str(u) for u in urls],
        batch_size=8,
        resolution=16,
        channels=1,
        seed=3,
        rank=rank,
        world_size=world,
        shuffle_buffer=20,
        on_error="skip",
        cache_bytes=cache_bytes,
    )
    if start is not None:
        ds.start_positions, ds.worker_offset = start, offset
    it = iter(stream.make_loader(ds, workers))
    out = [next(it) for _ in range(n)]
    stream.shutdown(it)
    return out


def _same(a, b, skipped=True):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["image"].equal(y["image"]) and x["label"].equal(y["label"])
        assert (x["pos"], x["shards"]) == (y["pos"], y["shards"])
        assert not skipped or x["skipped"] == y["skipped"]


@pytest.fixture()
def small_digits(tmp_path):
    """80 digits in 8 ShardWriter shards of 10, one sample corrupt: streams re-read every shard."""
    from distgan.data import builtin

    x, y, _ = builtin.digits()
    samples = [{"__key__": f"{i:06d}", "png": encode(x[i, ..., 0], "PNG"), "cls": int(y[i])} for i in range(80)]
    samples[13]["png"] = b"\x89PNG not really"  # skipped and counted, cached or not
    return shardwriter(tmp_path / "small", samples, maxcount=10)


def test_the_ram_cache_gives_bitwise_the_uncached_batches_across_workers_ranks_and_a_resume(small_digits):
    urls = small_digits  # 8 shards: 2 ranks x 2 workers each get 2
    for rank in (0, 1):
        plain = _stream_batches(urls, 24, 0, workers=2, rank=rank, world=2)
        cached = _stream_batches(urls, 24, 10**9, workers=2, rank=rank, world=2)
        _same(plain, cached)
        assert max(b["pos"] for b in plain) > 3 * 20  # each worker's 2 shards were read again and again
    # a resume after 10 batches (5 per worker): the same batches as the run that went on
    full = _stream_batches(urls, 20, 0, workers=2)
    positions = [full[8]["pos"], full[9]["pos"]]
    resumed = _stream_batches(urls, 10, 10**9, workers=2, start=positions, offset=10 % 2)
    _same(full[10:], resumed, skipped=False)  # a resumed stream counts skips from 0 (the feed adds the rest)
    _same(_stream_batches(urls, 10, 0, workers=2, start=positions, offset=0), resumed)
    bad = [b for b in full if b["skipped"]]
    assert bad, "the corrupt sample was drawn"


@pytest.mark.slow  # 10 s; the cached stream gives bitwise the uncached batches (tested above)
def test_training_with_the_cache_equals_training_without(tmp_path, small_digits, capsys):
    from test_train import assert_bitwise_equal

    for mode in ("ram", "off"):
        r = cli(
            capsys,
            "train",
            *FAST,
            f"data.shards={small_digits[0].parent}",
            f"data.cache={mode}",
            "train.steps=6",
            "data.on_error=skip",
            "data.shuffle_buffer=20",
            "--out",
            tmp_path / mode,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    assert_bitwise_equal(*(tmp_path / m / "checkpoints" / "step-00000006" for m in ("ram", "off")))
    r = cli(capsys, "config", "data.cache=ram", "data.crop=random")
    assert r.returncode == 2 and "cannot combine with data.crop=random" in r.stderr


def _read_every_shard_then_move_them(ds, urls):
    """An iterator over `ds` that has drawn from every shard once; the shard files are then moved away."""
    it = iter(ds)
    seen = set()
    while len(seen) < len(urls):
        seen.update(next(it)["shards"])
    for u in urls:
        u.rename(u.with_suffix(".moved"))
    return it


def test_the_ram_cache_serves_shards_without_reading_them_again(tmp_path, small_digits):
    """After every shard was read once, the files are moved away: the cached stream goes on."""
    ds = stream.ShardStream(
        [str(u) for u in small_digits],
        batch_size=8,
        resolution=16,
        channels=1,
        seed=0,
        shuffle_buffer=1,
        on_error="skip",
        cache_bytes=10**9,
    )
    it = _read_every_shard_then_move_them(ds, small_digits)
    for _ in range(30):
        assert next(it)["image"].shape == (8, 1, 16, 16)
    # over budget nothing is kept: the same stream without files cannot go on
    for u in small_digits:
        u.with_suffix(".moved").rename(u)
    ds.cache_bytes = 100
    it = _read_every_shard_then_move_them(ds, small_digits)
    with pytest.raises(UserError):
        for _ in range(30):
            next(it)
