"""End-to-end runs of `distgan train` / `distgan sample` as a user runs them (subprocesses)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, assert_resumed, cli, read_metrics, run_cli
from safetensors import safe_open
from wandb_log import history


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_bitwise_equal(step_a, step_b):
    for name in ("model.safetensors", "optimizer.safetensors", "state.safetensors"):
        a, _ = tensors(step_a / name)
        b, _ = tensors(step_b / name)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs"


@pytest.mark.parametrize(
    "extra, n",
    [
        (["data.num_workers=1"], 4),  # one real DataLoader worker (auto gives 0 below 4 cores per process)
        (["data.num_workers=2", "train.grad_accum=2", "model.g.arch=mlp", "model.d.arch=mlp"], 3),
    ],
)
def test_exact_resume(tmp_path, digits_shards, extra, n):
    common = ["--preset", "digits-dcgan", *FAST, f"data.shards={digits_shards}", "train.ckpt_every=1000", *extra]
    r = run_cli("train", *common, "--out", tmp_path / "full", f"train.steps={2 * n}")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", *common, "--out", tmp_path / "split", f"train.steps={n}")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", *common, "--out", tmp_path / "split", f"train.steps={2 * n}", "--resume", "auto")
    assert r.returncode == 0, r.stderr
    step = f"step-{2 * n:08d}"
    assert_bitwise_equal(tmp_path / "full" / "checkpoints" / step, tmp_path / "split" / "checkpoints" / step)
    assert_resumed(tmp_path / "split", n)


def test_checkpoint_contents_sample_and_keep_last(tmp_path, digits_shards, capsys):
    run = tmp_path / "run"
    r = cli(
        capsys,
        "train",
        *FAST,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "train.steps=6",
        "train.ckpt_every=2",
        "train.keep_last=2",
        "train.sample_every=3",
    )
    assert r.returncode == 0, r.stderr
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-00000004", "step-00000006"]  # the last 2 kept, no temp folders left
    model, meta = tensors(run / "checkpoints" / "step-00000006" / "model.safetensors")
    info = json.loads(meta["distgan"])
    assert info["step"] == 6 and info["config"]["train"]["steps"] == 6
    assert {k.split(".")[0] for k in model} == {"G", "D", "G_ema"}
    assert any(k.endswith("running_mean") for k in model)  # BatchNorm buffers are saved too
    opt, opt_meta = tensors(run / "checkpoints" / "step-00000006" / "optimizer.safetensors")
    assert {k.split(".")[0] for k in opt} == {"G", "D"} and any(k.endswith("exp_avg_sq") for k in opt)
    assert set(json.loads(opt_meta["optimizers"])) == {"G", "D"}
    state, _ = tensors(run / "checkpoints" / "step-00000006" / "state.safetensors")
    assert {"rng.rank.torch", "rng.rank.numpy", "rng.rank.python", "data.positions"} <= set(state)
    assert (run / "samples" / "step-00000003.png").exists() and (run / "samples" / "step-00000006.png").exists()
    assert (run / "config.yaml").exists()
    metrics = [m for m in read_metrics(run) if "loss/d" in m]
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert all(np.isfinite(m["loss/d"]) and np.isfinite(m["loss/g"]) for m in metrics)

    r = cli(capsys, "sample", "--ckpt", run, "--n", 10, "--out", tmp_path / "s.npy", "--seed", 3)
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (10, 1, 16, 16) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    r = cli(
        capsys,
        "sample",
        "--ckpt",
        run / "checkpoints" / "step-00000004",
        "--n",
        10,
        "--out",
        tmp_path / "s2.npy",
        "--seed",
        3,
    )
    assert not np.array_equal(x, np.load(tmp_path / "s2.npy"))  # another step, other weights
    cli(capsys, "sample", "--ckpt", run, "--n", 10, "--out", tmp_path / "s3.npy", "--seed", 3)
    assert np.array_equal(x, np.load(tmp_path / "s3.npy"))  # seeded
    r = cli(capsys, "sample", "--ckpt", run, "--n", 12, "--out", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr
    from PIL import Image

    # 12 digits of 16x16 in rows of 4, 1-pixel gaps, each drawn 4x (nearest) so that it is 64 px wide
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[:2] == (4 * (3 * 17 + 1), 4 * (4 * 17 + 1))
    assert (grid[::4, ::4] == grid[3::4, 3::4]).all()  # nearest-neighbour: 4x4 blocks of one value
    r = cli(capsys, "sample", "--ckpt", run, "--n", 12, "--zoom", 1, "--out", tmp_path / "small.png")
    assert np.asarray(Image.open(tmp_path / "small.png")).shape[:2] == (3 * 17 + 1, 4 * 17 + 1)

    # A finished run: --resume auto has nothing to do; a new run into it is refused.
    r = cli(capsys, "train", *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=6", "--resume", "auto")
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = cli(capsys, "train", *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=6")
    assert r.returncode == 2 and "--resume auto" in r.stderr


def test_wandb_offline_run_directory(tmp_path, digits_shards):
    run = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith("tracking")]
    r = run_cli(
        "train",
        *overrides,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "train.steps=4",
        "train.sample_every=2",
        "tracking.wandb.mode=auto",
    )
    assert r.returncode == 0, r.stderr
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = history(next(runs[0].glob("run-*.wandb")))
    assert [int(h["_step"]) for h in logged] == [2, 4]
    assert all("loss/d" in h and "loss/g" in h and "samples/filenames" in h for h in logged)
    jsonl = {m["step"]: m for m in read_metrics(run) if "loss/d" in m}
    assert float(logged[-1]["loss/d"]) == pytest.approx(jsonl[4]["loss/d"])
    images = sorted((runs[0] / "files" / "media" / "images").glob("samples_*.png"))
    assert len(images) == 2 and all(p.stat().st_size > 0 for p in images)
    assert (run / "wandb_run_id").read_text().strip() in runs[0].name


def test_sigint_checkpoints_and_resumes(tmp_path, digits_shards):
    run = tmp_path / "run"
    args = [*FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=100000", "train.ckpt_every=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "distgan", "train", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and "loss/d" in metrics.read_text()):
        time.sleep(0.2)  # wait until training steps are running, so the handler is installed
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "checkpoint written" in err
    (step_dir,) = (run / "checkpoints").iterdir()
    step = int(step_dir.name.split("-")[1])
    assert 0 < step < 100000
    # the same command again (shards named again: a local path never comes from the checkpoint)
    r = run_cli("train", "--out", run, "--resume", "auto", f"train.steps={step + 2}", f"data.shards={digits_shards}")
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / f"step-{step + 2:08d}").exists()


def test_bf16_mixed_precision_trains_close_to_fp32(tmp_path, digits_shards, capsys):
    """bf16 autocast is really on (the losses differ from the fp32 run's with the same seed and
    batches) and close to it (bf16 keeps 8 bits: a few parts in a thousand per op)."""
    losses = {}
    for precision in ("no", "bf16"):
        r = cli(
            capsys,
            "train",
            *FAST,
            f"data.shards={digits_shards}",
            "--out",
            tmp_path / precision,
            "train.steps=4",
            "train.log_every=1",
            f"train.mixed_precision={precision}",
        )
        assert r.returncode == 0, r.stderr
        losses[precision] = np.array(
            [[m["loss/d"], m["loss/g"]] for m in read_metrics(tmp_path / precision) if "loss/d" in m]
        )
    assert losses["bf16"].shape == (4, 2) and np.isfinite(losses["bf16"]).all()
    gap = np.abs(losses["bf16"] - losses["no"])
    assert gap[0].max() > 0 and gap.max() < 0.05, gap


def test_digits_mlp_preset_runs(tmp_path, digits_shards, capsys):
    r = cli(
        capsys,
        "train",
        "--preset",
        "digits-mlp",
        "--out",
        tmp_path / "run",
        f"data.shards={digits_shards}",
        "train.steps=3",
        "train.log_every=1",
        "tracking.wandb.mode=disabled",
    )
    assert r.returncode == 0, r.stderr
    model, _ = tensors(tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors")
    assert model["G.net.0.weight"].shape == (256, 100)  # the seed's z(100) -> 256 first layer


def test_default_command_builds_the_digits_cache(tmp_path):
    cache = tmp_path / "cache"
    r = run_cli("train", "--out", tmp_path / "run", "train.steps=2", *FAST, env={"DISTGAN_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert json.loads((next((cache / "shards").glob("digits-v*")) / "manifest.json").read_text())["count"] == 1797
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors")


@pytest.mark.slow  # 11 s; tests/test_ddp.py checks the same equality on 2 ranks
def test_grad_accum_equals_bigger_batch(tmp_path, digits_shards, capsys):
    """accum=2 x batch 16 takes the same samples and noise as accum=1 x batch 32 (MLP: no BatchNorm),
    so after 2 steps G, D and both Adam states agree to float tolerance."""
    common = [*FAST, f"data.shards={digits_shards}", "model.g.arch=mlp", "model.d.arch=mlp", "train.steps=2"]
    r = cli(capsys, "train", *common, "--out", tmp_path / "accum", "train.grad_accum=2", "data.batch_size=16")
    assert r.returncode == 0, r.stderr
    r = cli(capsys, "train", *common, "--out", tmp_path / "big", "train.grad_accum=1", "data.batch_size=32")
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, _ = tensors(tmp_path / "accum" / "checkpoints" / "step-00000002" / name)
        b, _ = tensors(tmp_path / "big" / "checkpoints" / "step-00000002" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{name}:{k}")
    # and the run differs from one with accumulation turned off at the same micro-batch size
    r = cli(capsys, "train", *common, "--out", tmp_path / "small", "train.grad_accum=1", "data.batch_size=16")
    a, _ = tensors(tmp_path / "accum" / "checkpoints" / "step-00000002" / "model.safetensors")
    c, _ = tensors(tmp_path / "small" / "checkpoints" / "step-00000002" / "model.safetensors")
    assert not torch.allclose(a["G.net.0.weight"], c["G.net.0.weight"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["model.g.arch=mlp", "model.d.arch=mlp"]])
def test_minibatch_discrimination_preset_trains(tmp_path, digits_shards, extra, capsys):
    r = cli(
        capsys,
        "train",
        "--preset",
        "digits-minibatch",
        *FAST,
        f"data.shards={digits_shards}",
        "--out",
        tmp_path / "run",
        "train.steps=3",
        "model.d.mbd_kernels=8",
        *extra,
    )
    assert r.returncode == 0, r.stderr
    model, _ = tensors(tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors")
    (t_key,) = [k for k in model if k.startswith("D.") and k.endswith(".T")]
    assert model[t_key].shape[1] == 8 * 5
    assert all(np.isfinite(m["loss/d"]) for m in read_metrics(tmp_path / "run") if "loss/d" in m)


def test_sngan_preset_trains(tmp_path, digits_shards, capsys):
    """digits-sngan, and the same with train.sn_scale=output (op(x, W) / sigma: the same function and
    gradients, so the same weights after 3 steps, to float tolerance)."""
    models = {}
    for scale in ("weight", "output"):
        run = tmp_path / scale
        r = cli(
            capsys,
            "train",
            "--preset",
            "digits-sngan",
            *FAST,
            f"data.shards={digits_shards}",
            "--out",
            run,
            "train.steps=3",
            f"train.sn_scale={scale}",
        )
        assert r.returncode == 0, r.stderr
        models[scale], _ = tensors(run / "checkpoints" / "step-00000003" / "model.safetensors")
        assert all(np.isfinite(m["loss/d"]) for m in read_metrics(run) if "loss/d" in m)
    assert any(k.startswith("D.") and k.endswith("parametrizations.weight.0._u") for k in models["weight"])
    assert models["weight"].keys() == models["output"].keys()
    for k, v in models["weight"].items():
        torch.testing.assert_close(models["output"][k], v, rtol=1e-4, atol=1e-5, msg=k)
