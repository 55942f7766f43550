"""Real 2-process DDP on the CPU (gloo) through `accelerate launch`."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import FAST, ROOT, read_metrics
from safetensors import safe_open
from test_train import assert_bitwise_equal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, processes=2, timeout=600):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), "-m", "distgan", "train", *map(str, args),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["distgan"])


@pytest.mark.parametrize("extra", [[], ["--preset", "digits-sngan"]])  # BatchNorm D; spectral-norm D (u, v buffers)
def test_two_ranks_disjoint_data_identical_params_rank0_writes(tmp_path, digits_shards, extra):
    run = tmp_path / "run"
    r = launch(*extra, *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=6", "train.ckpt_every=3")
    assert r.returncode == 0, r.stderr[-3000:]
    step = run / "checkpoints" / "step-00000006"
    state, meta = read(step / "state.safetensors")
    assert meta["data"]["world_size"] == 2
    # every parameter and buffer of G, D and G_ema hashes the same on both ranks; spectral norm's
    # u, v (never broadcast nor averaged: DDP runs with broadcast_buffers=False) included
    fingerprints = meta["fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    model, _ = read(step / "model.safetensors")
    assert any(k.endswith("._u") for k in model) == (extra != [])
    # the ranks read disjoint shards
    read_by = state["data.shards_read"].bool()
    assert read_by.shape == (2, 8) and read_by[0].any() and read_by[1].any()
    assert not (read_by[0] & read_by[1]).any()
    # per-rank noise: the ranks' RNG states differ, and both are saved
    assert state["rng.rank.torch"].shape[0] == 2 and not torch.equal(
        state["rng.rank.torch"][0], state["rng.rank.torch"][1]
    )
    # only rank 0 writes: one line per logged step, one set of checkpoints
    steps = [m["step"] for m in read_metrics(run) if "loss/d" in m]
    assert steps == [2, 4, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_two_ranks_resume_is_exact(tmp_path, digits_shards):
    common = [*FAST, f"data.shards={digits_shards}", "train.ckpt_every=1000"]
    r = launch(*common, "--out", tmp_path / "full", "train.steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "--out", tmp_path / "split", "train.steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "--out", tmp_path / "split", "train.steps=6", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_bitwise_equal(
        tmp_path / "full" / "checkpoints" / "step-00000006", tmp_path / "split" / "checkpoints" / "step-00000006"
    )
