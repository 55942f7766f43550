import io
import json
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
from conftest import cli
from PIL import Image

from distgan.data import builtin, shards
from distgan.errors import UserError


def read_all(folder: Path) -> dict[str, dict]:
    """Every sample of every shard in a folder, by key, read with plain tarfile."""
    out: dict[str, dict] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def decode(png: bytes) -> np.ndarray:
    arr = np.asarray(Image.open(io.BytesIO(png)))
    return arr[..., None] if arr.ndim == 2 else arr


def test_digits_round_trip(digits_shards):
    x, y, classes = builtin.digits()
    assert x.shape == (1797, 8, 8, 1) and classes == [str(i) for i in range(10)]
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    assert manifest["count"] == 1797
    assert manifest["image_shape"] == [8, 8, 1]
    assert manifest["num_classes"] == 10
    assert len(manifest["shards"]) == 8  # 1797 / 250
    expanded = list(braceexpand.braceexpand(manifest["pattern"]))
    assert expanded == manifest["shards"]
    samples = read_all(digits_shards)
    assert len(samples) == 1797
    for i in range(len(x)):
        s = samples[f"{i:08d}"]
        assert np.array_equal(decode(s["png"]), x[i])
        assert int(s["cls"]) == y[i]
        assert json.loads(s["json"])["index"] == i


def test_faces_builtin_shape():
    x, y, classes = builtin.faces()
    assert x.shape == (200, 25, 25, 1) and x.dtype == np.uint8
    assert sorted(set(y.tolist())) == [0, 1] and classes == ["face", "non-face"]


def test_npz_round_trip_with_float_rgb(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, size=(37, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x8.astype(np.float32) / 255.0, y=np.arange(37) % 4)
    r = cli(capsys, "shards", "--npz", tmp_path / "a.npz", "--out", tmp_path / "s", "--maxcount", 10)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["count"] == 37 and manifest["image_shape"] == [6, 5, 3] and len(manifest["shards"]) == 4
    samples = read_all(tmp_path / "s")
    for i in range(37):
        assert np.array_equal(decode(samples[f"{i:08d}"]["png"]), x8[i])
        assert int(samples[f"{i:08d}"]["cls"]) == i % 4


def test_npz_without_labels_and_maxsize(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, size=(20, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", x=x)
    m = shards.write_arrays(
        *shards.load_npz(str(tmp_path / "b.npz")), tmp_path / "s", source="t", maxsize=3000, progress=False
    )
    assert m["count"] == 20 and len(m["shards"]) > 1 and m["num_classes"] == 0
    assert "cls" not in next(iter(read_all(tmp_path / "s").values()))


def test_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    expected = {}
    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for j in range(3):
            arr = rng.integers(0, 256, size=(9, 9, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / cls / f"{j}.png")
            expected[f"{cls}/{j}.png"] = (arr, ["cat", "dog"].index(cls))
    m = shards.write_folder(str(tmp_path / "img"), tmp_path / "s", rgb=True, progress=False)
    assert m["classes"] == ["cat", "dog"] and m["count"] == 6 and m["image_shape"] == [9, 9, 3]
    for s in read_all(tmp_path / "s").values():
        arr, label = expected[json.loads(s["json"])["file"]]
        assert np.array_equal(decode(s["png"]), arr) and int(s["cls"]) == label


def test_image_folder_mixed_sizes_needs_resize(tmp_path):
    (tmp_path / "img" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "img" / "a" / "0.png")
    Image.new("L", (10, 6)).save(tmp_path / "img" / "a" / "1.png")
    with pytest.raises(UserError, match="--resize"):
        shards.write_folder(str(tmp_path / "img"), tmp_path / "s", progress=False)
    assert not list((tmp_path / "s").glob("*.tar"))  # nothing half-written
    m = shards.write_folder(str(tmp_path / "img"), tmp_path / "s", resize=4, progress=False)
    assert m["image_shape"] == [4, 4, 1]


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    r = cli(capsys, "shards", "--builtin", "digits", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    assert "1797 samples" in r.stdout
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    r = cli(capsys, "shards", "--builtin", "digits", "--out", tmp_path / "s")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--images", "/nonexistent"], "does not exist"),
        (["--npz", "/nonexistent.npz"], "does not exist"),
        (["--builtin", "mnist"], "available: digits, digits-latents, digits-thick, digits-thin, edges2photos, faces"),
    ],
)
def test_shards_bad_sources(tmp_path, args, needle, capsys):
    r = cli(capsys, "shards", *args, "--out", tmp_path / "s")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
