import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the files on one pytest-xdist worker per core: share the cores out, or the
    # workers' (and their subprocesses') thread pools oversubscribe them (3x slower on 2 cores)
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """A fresh shard cache and offline W&B for the whole test session."""
    os.environ["DISTGAN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("WANDB_API_KEY", None)
    yield


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """The builtin digits as 8 shards of up to 250 samples."""
    from distgan.data import shards

    out = tmp_path_factory.mktemp("digits")
    shards.write_builtin("digits", out, maxcount=250, progress=False)
    return out


def run_cli(*args, env=None, timeout=600, cwd=None):
    """Run `python -m distgan ...` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "distgan", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`distgan ARGS` in this process: the CLI's own code, without a process start per command (a few
    seconds each). (exit status, stdout, stderr)."""
    from distgan.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """`run_main` with `run_cli`'s result (returncode, stdout, stderr): for tests where the command's
    behaviour is what is checked, not the process around it (signals, exit on a dead rank, env)."""
    code, out, err = run_main(capsys, *args)
    return subprocess.CompletedProcess(["distgan", *map(str, args)], code, out, err)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_resumes_exactly(capsys, common, tmp_path, at, total):
    """`distgan train *common` (in this process) for `total` steps in one run (tmp_path/full) and in two
    (tmp_path/split: `at`, then --resume auto): the second resumed from step `at` and its last checkpoint
    equals the first's bitwise. Returns (the full run's last step folder, the resuming command's result)."""
    from test_train import assert_bitwise_equal

    for out, steps, more in (("full", total, []), ("split", at, []), ("split", total, ["--resume", "auto"])):
        res = cli(capsys, "train", *common, "--out", tmp_path / out, f"train.steps={steps}", *more)
        assert res.returncode == 0, res.stderr[-3000:]
    assert_resumed(tmp_path / "split", at)
    step = f"step-{total:08d}"
    assert_bitwise_equal(tmp_path / "full" / "checkpoints" / step, tmp_path / "split" / "checkpoints" / step)
    return tmp_path / "full" / "checkpoints" / step, res


def assert_resumed(run_dir, step):
    """The run in `run_dir` resumed exactly once, from a checkpoint of step `step`, and logged
    steps after it: a resume that was silently ignored (a fresh start) fails here."""
    lines = read_metrics(run_dir)
    resumes = [m for m in lines if m.get("event") == "resume"]
    assert [m["step"] for m in resumes] == [step], resumes
    assert resumes[0]["checkpoint"].endswith(f"step-{step:08d}")
    after = lines[lines.index(resumes[0]) + 1 :]
    logged = [m["step"] for m in after if "step" in m and "event" not in m]
    assert logged and min(logged) > step, logged


# GAT's transformers (model.vit) at a size a test trains in seconds: width 16, 2 blocks, 2 heads, 2 levels.
TINY_VIT = ["model.vit.width=16", "model.vit.depth=2", "model.vit.heads=2", "model.vit.levels=2"]

# Small, fast settings for end-to-end runs.
FAST = [
    "data.batch_size=16",
    "model.g.width=16",
    "model.d.width=16",
    "model.g.z_dim=16",
    "train.log_every=2",
    "train.sample_every=1000",
    "train.n_samples=16",
    "tracking.wandb.mode=disabled",
]
