"""distgan eval's image metrics: FID/KID against closed forms, stacked digits, the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, cli, run_main

from distgan.data import builtin
from distgan.metrics import fid, kid
from distgan.metrics.digits import DigitFeatures


def test_frechet_distance_matches_the_closed_form_for_known_gaussians():
    """For diagonal covariances: |m1 - m2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    exact = ((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(exact, rel=1e-9)
    # a full covariance: a rotation of both leaves the distance unchanged
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    rotated = fid.frechet_distance(q @ m1, q @ np.diag(s1) @ q.T, q @ m2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(exact, rel=1e-6)
    # and from samples, FID converges to it
    rng = np.random.default_rng(1)
    a = m1 + rng.standard_normal((200_000, 3)) * np.sqrt(s1)
    b = m2 + rng.standard_normal((200_000, 3)) * np.sqrt(s2)
    assert fid.fid(a, b) == pytest.approx(exact, rel=0.02)


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
    assert abs(kid.kid(a, b)) < 0.01
    assert kid.kid(a, b + 1.0) > 0.1


def test_stacked_digits_are_three_real_digits_and_1000_modes():
    x, y, classes = builtin.stacked_digits(n=5000, seed=0)
    digits, labels, _ = builtin.digits()
    assert x.shape == (5000, 8, 8, 3) and len(classes) == 1000 and y.max() < 1000
    first = x[0]
    for c, want in enumerate((y[0] // 100, y[0] // 10 % 10, y[0] % 10)):
        matches = [i for i in range(len(digits)) if np.array_equal(digits[i, ..., 0], first[..., c])]
        assert matches and labels[matches[0]] == want
    assert len(np.unique(y)) > 990  # 5000 draws cover nearly all 1000 modes


def test_stacked_metric_counts_1000_modes_of_real_stacked_digits_and_half_of_a_collapsed_set():
    """The stacked-digits measure (VEEGAN/PacGAN): the digits classifier reads each channel; real
    stacked digits cover all 1000 modes with a KL to uniform near the sampling floor (K-1)/(2N), and
    a set holding only the modes 000-499 covers at most 500 with KL = log 2."""
    from PIL import Image

    from distgan import config, metrics

    n = 20_000  # P(a mode missing from 20 000 uniform draws) = 1000 e^-20
    x, y, _ = builtin.stacked_digits(n=n, seed=3)
    # each channel resized as the classifier's training digits were (PIL bilinear to 16x16)
    up = np.stack(
        [
            np.stack([np.asarray(Image.fromarray(img[..., c]).resize((16, 16), Image.BILINEAR)) for c in range(3)])
            for img in x
        ]
    )
    samples = torch.from_numpy(up).float() / 127.5 - 1
    cfg = config.load_config("stacked-digits-r1")
    real = metrics.compute(samples, ["stacked"], cfg, None)
    assert real["stacked_modes"] == 1000
    floor = 999 / (2 * n)
    assert floor < real["stacked_kl"] < floor + 0.03, real
    half = metrics.compute(samples[y < 500], ["stacked"], cfg, None)
    assert 450 <= half["stacked_modes"] <= 560  # the classifier misreads a few digits into other modes
    assert half["stacked_kl"] == pytest.approx(np.log(2), abs=0.06)


def test_eval_reports_fid_kid_and_digit_judgement_on_a_digits_run(tmp_path, digits_shards, capsys):
    run = tmp_path / "run"
    assert run_main(capsys, "train", *FAST, "--out", run, "train.steps=2")[0] == 0  # builtin:digits
    code, _, err = run_main(capsys, "eval", "--ckpt", run, "--n", "300", "--json", tmp_path / "e.json")
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert "kid" in result and result["digits"]["generated"]["n"] == 300
    assert "held-out accuracy 0.9" in result["feature_space"]  # the feature classifier's, reported
    # the same 300 samples (same seed) and the real digits, through the same cached feature MLP:
    # the Frechet distance written out here, with scipy's sqrtm, gives the reported FID
    from scipy import linalg

    from distgan.metrics.digits import real_digits

    assert run_main(capsys, "sample", "--ckpt", run, "--n", "300", "--out", tmp_path / "x.npy")[0] == 0
    net = DigitFeatures(16)
    a = net.features(torch.from_numpy(np.load(tmp_path / "x.npy")))
    b = net.features(torch.from_numpy(real_digits(16)[0]).view(-1, 1, 16, 16))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert result["fid"] == pytest.approx(expected, rel=1e-6) and expected > 1
    code, _, err = run_main(capsys, "eval", "--ckpt", run, "--metrics", "modes")
    assert code == 2 and "does not apply" in err
    # swd is in the default set (against the training images), and --heldout swaps in other shards
    assert "training images, 300 of each" in result["swd_reference"] and set(result["swd_levels"]) == {"16"}
    code, _, err = run_main(
        capsys,
        "eval",
        "--ckpt",
        run,
        "--n",
        "200",
        "--metrics",
        "swd",
        "--heldout",
        digits_shards,
        "--json",
        tmp_path / "s.json",
    )
    assert code == 0, err[-3000:]
    got = json.loads((tmp_path / "s.json").read_text())
    from distgan.data import stream
    from distgan.metrics.swd import swd

    assert run_main(capsys, "sample", "--ckpt", run, "--n", "200", "--out", tmp_path / "y.npy")[0] == 0
    ref = stream.read_all(stream.resolve(str(digits_shards)), resolution=16, channels=1)["image"]
    assert got["swd"] == pytest.approx(swd(torch.from_numpy(np.load(tmp_path / "y.npy")), ref)["swd"], rel=1e-6)
    assert got["swd_reference"] == "held-out images, 200 of each" and got["swd"] > 0
    code, _, err = run_main(capsys, "eval", "--ckpt", run, "--metrics", "fid", "--heldout", digits_shards)
    assert code == 2 and "add swd to --metrics" in err
    # --standing-stats: the same noise through the same weights, with BN statistics of G's own batches
    code, _, err = run_main(
        capsys, "sample", "--ckpt", run, "--n", "200", "--standing-stats", "4", "--out", tmp_path / "z.npy"
    )
    assert code == 0, err[-3000:]
    standing, copied = np.load(tmp_path / "z.npy"), np.load(tmp_path / "y.npy")
    assert standing.shape == copied.shape and 1e-3 < np.abs(standing - copied).mean() < 0.5
    code, _, err = run_main(capsys, "sample", "--ckpt", run, "--standing-stats", "-1", "--out", tmp_path / "w.npy")
    assert code == 2 and "--standing-stats must be >= 0" in err


def test_eval_with_a_torchscript_feature_network(tmp_path, digits_shards, capsys):
    """`distgan eval --features NET.pt` (in this process: 3 s, against 12 s with three process starts)."""
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 16)))
    torch.jit.save(net, str(tmp_path / "features.pt"))
    run = tmp_path / "run"
    assert cli(capsys, "train", *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=1").returncode == 0
    r = cli(
        capsys,
        "eval",
        "--ckpt",
        run,
        "--n",
        "200",
        "--metrics",
        "fid",
        "--features",
        tmp_path / "features.pt",
        "--json",
        tmp_path / "e.json",
        f"data.shards={digits_shards}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["fid"] > 0
    r = cli(
        capsys,
        "eval",
        "--ckpt",
        run,
        "--metrics",
        "fid",
        "--features",
        tmp_path / "nope.pt",
        f"data.shards={digits_shards}",
    )
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_stacked_digits_r1_preset_trains(tmp_path, capsys):
    """stacked-digits-r1 (DCGAN + R1 + a faster D + lr decay) on a small set of stacked digits."""
    from conftest import read_metrics

    from distgan.data import shards

    x, y, classes = builtin.stacked_digits(n=400, seed=0)
    shards.write_arrays(x, y, classes, tmp_path / "stacked", source="test", maxcount=200, progress=False)
    run = tmp_path / "run"
    code, _, err = run_main(
        capsys,
        "train",
        "--preset",
        "stacked-digits-r1",
        *FAST,
        f"data.shards={tmp_path / 'stacked'}",
        "--out",
        run,
        "train.steps=4",
        "train.log_every=1",
    )
    assert code == 0, err[-3000:]
    logged = [m for m in read_metrics(run) if "loss/d" in m]
    assert [m["lr/factor"] for m in logged] == pytest.approx([1, 1, 1, 0.5])  # decay over the second half
    assert all(m["loss/r1"] > 0 for m in logged)


def test_eval_watch_evaluates_each_checkpoint_as_it_appears_and_goes_on_where_it_stopped(
    tmp_path, digits_shards, capsys
):
    """A watcher started beside a run evaluates the checkpoints the run writes while it runs, one line each,
    and ends at the run's last step; run again, it evaluates nothing twice."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    run.mkdir()  # the watcher starts before the run has written anything
    common = [*FAST, f"data.shards={digits_shards}", "data.num_workers=0", "train.ckpt_every=2", "train.keep_last=10"]
    watch = [sys.executable, "-m", "distgan", "eval", "--ckpt", str(run), "--watch", "--poll", "0.2"]
    watch += ["--metrics", "digits", "--n", "50", f"data.shards={digits_shards}"]
    watcher = subprocess.Popen(watch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        assert watcher.poll() is None  # waiting, not failing
        assert cli(capsys, "train", *common, "--out", run, "train.steps=6").returncode == 0
        out, err = watcher.communicate(timeout=120)
    finally:
        watcher.kill()
    log = run / "eval" / "watch.jsonl"
    assert watcher.returncode == 0, err
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    assert all(0 <= r["digits"]["generated"]["confident_fraction"] <= 1 for r in lines)
    assert "step 6 of 6 evaluated" in out
    # again: every step is in the log already, so it ends at once without evaluating anything
    code, out, _ = run_main(capsys, *watch[3:])
    assert code == 0 and "eval --watch: {" not in out and len(log.read_text().splitlines()) == 3
    code, _, err = run_main(capsys, "eval", "--ckpt", run / "checkpoints" / "step-00000002", "--watch")
    assert code == 2 and "--watch takes a run directory" in err
