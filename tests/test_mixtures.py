"""The 2-D mixtures: data, shards, metrics (against hand-computed cases), and a short training run."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_resumed, cli, run_cli

from distgan.data import builtin, shards, stream
from distgan.metrics.mixtures import mode_metrics


def test_mixture_data_matches_its_definition():
    x, y, classes = builtin.mixture("grid", n=20_000, seed=1)
    centres, std = builtin.mixture_spec("grid")
    assert x.shape == (20_000, 2) and len(classes) == 25 and std == 0.05
    assert sorted(set(centres[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    resid = x - centres[y]
    assert abs(resid.std() - 0.05) < 0.002 and abs(resid.mean()) < 0.002
    ring, _ = builtin.mixture_spec("ring")
    np.testing.assert_allclose(np.linalg.norm(ring, axis=1), 1.0)
    # the real data scores perfectly
    m = mode_metrics(x, centres, std)
    assert m["modes"] == 25 and m["high_quality_pct"] > 99 and m["reverse_kl"] < 0.01


def test_mode_metrics_on_known_cases():
    centres, std = builtin.mixture_spec("ring")
    # all samples on 2 of 8 modes, 3:1, plus one far-away sample (not high quality)
    pts = np.concatenate([np.repeat(centres[:1], 6, 0), np.repeat(centres[1:2], 2, 0), [[5.0, 5.0]]])
    m = mode_metrics(pts, centres, std)
    assert m["modes"] == 2
    assert m["high_quality_pct"] == pytest.approx(100 * 8 / 9)
    assert m["reverse_kl"] == pytest.approx(0.75 * math.log(0.75 * 8) + 0.25 * math.log(0.25 * 8))
    # just inside / outside 3 std in one coordinate
    inside = centres[:1] + [[2.9 * std, 0.0]]
    outside = centres[:1] + [[3.1 * std, 0.0]]
    assert mode_metrics(inside, centres, std)["high_quality_pct"] == 100
    assert mode_metrics(outside, centres, std)["high_quality_pct"] == 0
    assert mode_metrics(outside, centres, std)["reverse_kl"] == math.inf


def test_point_shards_stream_as_vectors(tmp_path):
    x = mixture_shards("ring", 2500, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["kind"] == "points" and manifest["image_shape"] == [2] and len(manifest["shards"]) == 3
    assert manifest["mixture"]["std"] == 0.01
    src = stream.resolve(str(tmp_path))
    ds = stream.ShardStream(src.urls, batch_size=50, resolution=1, channels=2, seed=0, points=True, shuffle_buffer=10)
    batch = next(iter(ds))
    assert batch["image"].shape == (50, 2) and batch["image"].dtype == torch.float32
    # the points are the written ones, bit for bit
    written = {tuple(p) for p in x.tolist()}
    assert all(tuple(p) in written for p in batch["image"].tolist())


def mixture_shards(name, n, out):
    """n points of mixture `name` as shards with the mixture in the manifest (the builtin writes 100k)."""
    x, y, classes = builtin.mixture(name, n=n)
    centres, std = builtin.mixture_spec(name)
    shards.write_arrays(
        x,
        y,
        classes,
        out,
        source="test",
        maxcount=1000,
        progress=False,
        extra_manifest={"mixture": {"centres": centres.tolist(), "std": std}},
    )
    return x


def test_grid_preset_trains_samples_and_evaluates(tmp_path, capsys):
    """grid-pacgan on 4000 grid points."""
    mixture_shards("grid", 4000, tmp_path / "grid")
    run = tmp_path / "run"
    r = cli(
        capsys,
        "train",
        "--preset",
        "grid-pacgan",
        "--out",
        run,
        f"data.shards={tmp_path / 'grid'}",
        "train.steps=20",
        "train.log_every=10",
        "tracking.wandb.mode=disabled",
        "train.sample_every=20",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "samples" / "latest.png").stat().st_size > 0
    data = f"data.shards={tmp_path / 'grid'}"  # never taken from the checkpoint (distgan/trust.py)
    r = cli(capsys, "eval", "--ckpt", run, "--n", "500", "--json", tmp_path / "eval.json", data)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["modes_total"] == 25 and result["samples"] == 500
    assert 0 <= result["modes"] <= 25 and 0 <= result["high_quality_pct"] <= 100
    assert "modes" in r.stdout
    r = cli(capsys, "sample", "--ckpt", run, "--n", "300", "--out", tmp_path / "pts.npy")
    assert r.returncode == 0 and np.load(tmp_path / "pts.npy").shape == (300, 2)
    r = cli(capsys, "sample", "--ckpt", run, "--n", "300", "--out", tmp_path / "live.npy", "--live")
    assert r.returncode == 0  # the trained G, not its EMA copy: same noise, other points
    assert not np.allclose(np.load(tmp_path / "live.npy"), np.load(tmp_path / "pts.npy"))
    r = cli(capsys, "eval", "--ckpt", run, "--drs", data)  # its D judges packs of samples
    assert r.returncode == 2 and "packs of 4" in r.stderr


@pytest.mark.slow  # 17 s; resume is exact in test_train/test_resnet, lr decay is a function of the step
def test_lr_decay_and_r1_resume_exactly(tmp_path):
    """A linearly decaying learning rate (a function of the step) and the R1 penalty: resuming at
    step 3 gives step 6 bitwise, and the logged factor follows (steps - step) / (steps - start)."""
    from conftest import read_metrics
    from test_train import assert_bitwise_equal

    mixture_shards("grid", 2000, tmp_path / "grid")
    # grid-gan-r1 (maxout D, R1, decay over the second half, no EMA) with small MLPs
    common = [
        "--preset",
        "grid-gan-r1",
        f"data.shards={tmp_path / 'grid'}",
        "model.g.width=32",
        "model.d.width=16",
        "train.log_every=1",
        "train.ckpt_every=3",
        "tracking.wandb.mode=disabled",
    ]
    # the schedule depends on train.steps, so the second half resumes from the full run's step 3
    for out, extra in (("full", []), ("split", ["--resume", tmp_path / "full" / "checkpoints" / "step-00000003"])):
        r = run_cli("train", *common, "--out", tmp_path / out, "train.steps=6", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    step = "step-00000006"
    assert_resumed(tmp_path / "split", 3)
    assert_bitwise_equal(tmp_path / "full" / "checkpoints" / step, tmp_path / "split" / "checkpoints" / step)
    logged = {m["step"]: m for m in read_metrics(tmp_path / "full") if "loss/d" in m}
    assert [logged[s]["lr/factor"] for s in range(1, 7)] == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])
    assert all(logged[s]["loss/r1"] > 0 for s in range(1, 7))
    # discriminator rejection sampling with this (logistic-loss, unpacked) checkpoint's D
    data = f"data.shards={tmp_path / 'grid'}"
    r = run_cli("eval", "--ckpt", tmp_path / "full", "--n", "300", "--drs", "--json", tmp_path / "drs.json", data)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "drs.json").read_text())
    assert result["samples"] == 300 and result["drs_drawn"] >= 300
    assert 300 / result["drs_drawn"] <= result["drs_accept_rate"] <= 1
    r = run_cli("sample", "--ckpt", tmp_path / "full", "--n", "50", "--drs", "--out", tmp_path / "drs.npy")
    assert r.returncode == 0 and np.load(tmp_path / "drs.npy").shape == (50, 2) and "rejection" in r.stdout
    # ... with D first trained further against the frozen G; the checkpoint itself is left as it was
    model_file = tmp_path / "full" / "checkpoints" / step / "model.safetensors"
    before = model_file.read_bytes()
    r = run_cli(
        "eval",
        "--ckpt",
        tmp_path / "full",
        "--n",
        "300",
        "--drs",
        "--drs-calibrate",
        "20",
        "--json",
        tmp_path / "cal.json",
        data,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["drs_calibrate_steps"] == 20 and 0 < cal["drs_calibrate_loss"] < 10 and cal["samples"] == 300
    assert cal["drs_max_logit"] != result["drs_max_logit"]  # another D judged
    assert model_file.read_bytes() == before
    r = run_cli("sample", "--ckpt", tmp_path / "full", "--drs-calibrate", "5", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "add --drs" in r.stderr


def test_calibration_fits_the_log_density_ratio():
    """G draws N(0, I) in 2-D, the data is N(0, 0.5^2 I), and D(x) = a + b |x|^2 starts at 0: trained
    against the frozen G it reaches the optimum of the logistic loss, log p_data/p_G =
    log 4 - 1.5 |x|^2; the caller's D is untouched."""
    from distgan.sampling import calibrate

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(()))
            self.b = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return self.a + self.b * x.square().sum(1)

    class Variant:
        @staticmethod
        def sample(G, n, generator):
            return torch.randn(n, 2, generator=generator)

    gen = torch.Generator().manual_seed(0)
    real = iter(lambda: 0.5 * torch.randn(512, 2, generator=gen), None)
    D = Quadratic()
    fitted, stats = calibrate(Variant(), None, D, real, 1500, 0.02, torch.Generator().manual_seed(1), average=0.99)
    assert fitted.a.item() == pytest.approx(math.log(4.0), abs=0.1)
    assert fitted.b.item() == pytest.approx(-1.5, abs=0.1)
    assert D.a.item() == 0 and D.b.item() == 0
    assert stats["calibrate_steps"] == 1500 and 0 < stats["calibrate_loss"] < 2 * math.log(2)


def test_rejection_sampling_draws_from_the_data_distribution():
    """G draws N(0, I) in 2-D and D(x) is exactly log p_data/p_G for p_data = N(0, 0.5^2 I): the kept
    samples have standard deviation 0.5, and the acceptance rate is 1/max ratio = 1/4."""
    from distgan.sampling import rejection_sample

    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, z):
            return z * self.w

    class Variant:
        @staticmethod
        def sample(G, n, generator):
            return G(torch.randn(n, 2, generator=generator))

    def D(x):  # log N(x; 0, 0.25 I) - log N(x; 0, I)
        sq = x.square().sum(1)
        return math.log(4.0) - sq / (2 * 0.25) + sq / 2

    x, stats = rejection_sample(Variant(), Identity(), D, 20_000, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 2)
    assert x.std(0).tolist() == pytest.approx([0.5, 0.5], abs=0.01)
    assert stats["accept_rate"] == pytest.approx(0.25, abs=0.01)
    assert stats["max_logit"] == pytest.approx(math.log(4.0), abs=0.01)


def test_eval_every_logs_the_metrics_during_training(tmp_path, capsys):
    mixture_shards("ring", 2000, tmp_path / "ring")
    run = tmp_path / "run"
    r = cli(
        capsys,
        "train",
        "--preset",
        "ring-gan",
        "--out",
        run,
        f"data.shards={tmp_path / 'ring'}",
        "train.steps=10",
        "train.eval_every=5",
        "train.eval_n=300",
        "tracking.wandb.mode=disabled",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from conftest import read_metrics

    evals = [m for m in read_metrics(run) if "eval/modes" in m]
    assert [m["step"] for m in evals] == [5, 10]
    assert all(0 <= m["eval/modes"] <= 8 and m["eval/samples"] == 300 for m in evals)


def test_points_and_images_do_not_mix(tmp_path, digits_shards, capsys):
    r = cli(capsys, "train", "--preset", "grid-gan", "--out", tmp_path / "a", f"data.shards={digits_shards}")
    assert r.returncode == 2 and "the shards hold images but data.kind=points" in r.stderr
    mixture_shards("ring", 1000, tmp_path / "ring")
    r = cli(capsys, "train", "--out", tmp_path / "b", f"data.shards={tmp_path / 'ring'}")
    assert r.returncode == 2 and "the shards hold points but data.kind=images" in r.stderr


def test_maxout_discriminator_takes_the_max_over_pieces():
    from distgan import config, models
    from distgan.models.toy import Maxout

    layer = Maxout(2, 3, 5)
    x = torch.randn(4, 2)
    full = layer.linear(x).view(4, 3, 5)
    assert torch.equal(layer(x), full.max(-1).values)
    cfg = config.load_config("grid-gan", overrides=["model.d.maxout=5"])
    D = models.build_discriminator(cfg)
    assert sum(isinstance(m, Maxout) for m in D.modules()) == 3 and D(torch.randn(7, 2)).shape == (7,)
    with pytest.raises(Exception, match="model.d.maxout"):
        config.load_config("grid-gan", overrides=["model.d.maxout=1"])
