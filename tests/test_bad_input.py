"""Every bad input gives one clear message, exit status 2, no traceback, and damages nothing."""

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import FAST, cli, read_metrics, run_cli


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_user_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert needle in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def rewrite_shard(src: Path, dst: Path, change) -> None:
    """Copy a tar shard member by member, letting `change(name, data)` replace a member's bytes."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = change(m.name, tin.extractfile(m).read())
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_shards):
    run = tmp_path_factory.mktemp("trained") / "run"
    r = run_cli("train", *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=2")
    assert r.returncode == 0, r.stderr
    return run


def train(capsys, tmp_path, *args):
    """`distgan train` in this process (test_missing_shards runs one as its own process: no traceback there
    either)."""
    return cli(capsys, "train", *FAST, "--out", tmp_path / "run", "train.steps=3", *args)


def test_missing_shards(tmp_path):
    r = run_cli("train", *FAST, "--out", tmp_path / "run", "data.shards=/nonexistent/d-{000..003}.tar")
    assert_user_error(r, "does not exist")  # a process of its own, as a user runs it: one line, no traceback
    assert not (tmp_path / "run").exists()


def test_empty_shard_folder_and_empty_shard(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_user_error(train(capsys, tmp_path, f"data.shards={tmp_path / 'empty'}"), "holds no .tar shards")
    (tmp_path / "zero.tar").write_bytes(b"")
    assert_user_error(train(capsys, tmp_path, f"data.shards={tmp_path / 'zero.tar'}"), "is empty")


def make_bad_shard(folder: Path, digits_shards: Path, corrupt: bool = True, wrong_shape: bool = True) -> Path:
    """Shard 0 of the digits with sample 5's PNG corrupted and/or sample 7's PNG of the wrong size."""
    import numpy as np

    from distgan.data.shards import encode_png

    folder.mkdir()

    def change(name, data):
        if corrupt and name == "00000005.png":
            return b"this is not a png"
        if wrong_shape and name == "00000007.png":
            return encode_png(np.zeros((9, 9, 1), dtype=np.uint8))
        return data

    rewrite_shard(digits_shards / "digits-000000.tar", folder / "digits-000000.tar", change)
    shutil.copy(digits_shards / "manifest.json", folder / "manifest.json")  # says 8x8x1
    return folder / "digits-000000.tar"


def test_corrupt_member_raises_by_default(tmp_path, digits_shards, capsys):
    shard = make_bad_shard(tmp_path / "bad", digits_shards, wrong_shape=False)
    r = train(capsys, tmp_path, f"data.shards={shard}", "data.shuffle_buffer=1")
    assert_user_error(r, "corrupt image")
    assert "00000005" in r.stderr and "data.on_error=skip" in r.stderr


def test_wrong_shape_raises(tmp_path, digits_shards, capsys):
    shard = make_bad_shard(tmp_path / "bad", digits_shards, corrupt=False)
    r = train(capsys, tmp_path, f"data.shards={shard}", "data.shuffle_buffer=1")
    assert_user_error(r, "image of size 9x9 (H x W), the manifest says 8x8")
    assert "00000007" in r.stderr


def test_bad_samples_skipped_and_counted(tmp_path, digits_shards, capsys):
    shard = make_bad_shard(tmp_path / "bad", digits_shards)
    r = train(capsys, tmp_path, f"data.shards={shard}", "data.on_error=skip", "train.steps=20", "data.batch_size=32")
    assert r.returncode == 0, r.stderr
    logged = [m for m in read_metrics(tmp_path / "run") if "data/skipped" in m]
    assert logged[-1]["data/skipped"] >= 2  # both bad samples, every time the shard is read


def test_truncated_shard(tmp_path, digits_shards, capsys):
    data = (digits_shards / "digits-000000.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2 + 100])
    r = train(capsys, tmp_path, f"data.shards={tmp_path / 't.tar'}", "train.steps=30")
    # the cut shard is named, with what is wrong, and how to go on past it
    assert_user_error(r, f"shard '{tmp_path / 't.tar'}': unreadable tar data (TarFormatError: truncated tar")
    assert "(set data.on_error=skip" in r.stderr


def test_channels_mismatch_with_manifest(tmp_path, digits_shards, capsys):
    assert_user_error(train(capsys, tmp_path, f"data.shards={digits_shards}", "data.channels=3"), "set data.channels=1")


def test_missing_checkpoint(tmp_path, capsys):
    assert_user_error(train(capsys, tmp_path, "--resume", "/nonexistent/step-00000002"), "does not exist")
    assert_user_error(run_cli("sample", "--ckpt", "/nonexistent", "--out", tmp_path / "x.png"), "does not exist")


def test_truncated_checkpoint_leaves_run_untouched(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model = run / "checkpoints" / "step-00000002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    before = snapshot(run)
    r = run_cli("train", "--out", run, "--resume", "auto", "train.steps=4")
    assert_user_error(r, "unreadable")
    assert snapshot(run) == before
    assert_user_error(run_cli("sample", "--ckpt", run, "--out", tmp_path / "x.png"), "unreadable")


def test_incompatible_checkpoint_leaves_run_untouched(tmp_path, trained_run, digits_shards):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    r = run_cli(
        "train",
        *FAST,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "--resume",
        "auto",
        "train.steps=4",
        "model.g.width=32",
    )
    assert_user_error(r, "cannot resume with model.g.width=16 -> 32 (these keys cannot change on resume)")
    r = run_cli("train", "--preset", "digits-mlp", "--out", run, "--resume", "auto", "tracking.wandb.mode=disabled")
    assert_user_error(r, "cannot resume with model.d.arch='dcgan' -> 'mlp', model.d.width=16 -> ")
    assert snapshot(run) == before


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "model.safetensors").write_bytes(b"garbage" * 10)
    assert_user_error(
        run_cli("sample", "--ckpt", tmp_path / "step-00000001", "--out", tmp_path / "x.png"), "unreadable"
    )


def test_sample_bad_output_suffix(tmp_path, trained_run):
    assert_user_error(run_cli("sample", "--ckpt", trained_run, "--out", tmp_path / "x.jpg"), ".png")
