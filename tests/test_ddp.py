"""Real 2-process DDP on the CPU (gloo) through `accelerate launch`."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import FAST, ROOT, TINY_VIT, assert_resumed, read_metrics, run_cli
from safetensors import safe_open
from test_train import assert_bitwise_equal

from distgan import checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(*args, processes=2, command="train"):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "distgan",
        command,
        *map(str, args),
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(*args, processes=2, timeout=600, env=None, command="train"):
    return subprocess.run(
        launch_cmd(*args, processes=processes, command=command),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENV, **(env or {})},
        timeout=timeout,
    )


# The PyTorch fallback of kernels/ that CPU users get: the interpreter off for that run.
FALLBACK = {"TRITON_INTERPRET": "0"}


def kernels_used(run) -> str:
    return next(m["backend"] for m in read_metrics(run) if m.get("event") == "kernels")


def start(*args, processes=2):
    """A launch in the background, its output in files (pipes could fill up and block it)."""
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        launch_cmd(*args, processes=processes), stdout=out, stderr=out, cwd=ROOT, env=ENV, text=True
    )
    proc.log = out
    return proc


def output(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def ranks_of(launcher_pid: int, n: int = 2, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the workers a launcher started (read from /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                if ppid != launcher_pid:
                    continue
                env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            for e in env:
                if e.startswith(b"RANK="):
                    found[int(e[5:])] = int(d)
        if len(found) == n:
            return found
        time.sleep(0.2)
    raise AssertionError(f"launcher {launcher_pid} did not start {n} workers")


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, output(proc)[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["distgan"])


# BatchNorm D; spectral-norm D (u, v buffers: slow, since test_gradient_penalty_under_ddp[sn-triton] checks
# a spectral-norm D's ranks stay identical in the default suite)
@pytest.mark.parametrize("extra", [[], pytest.param(["--preset", "digits-sngan"], marks=pytest.mark.slow)])
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
    # one real loader worker per rank (auto gives 0 below 4 cores per process)
    common = [*FAST, f"data.shards={digits_shards}", "train.ckpt_every=1000", "data.num_workers=1"]
    r = launch(*common, "--out", tmp_path / "full", "train.steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "--out", tmp_path / "split", "train.steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "--out", tmp_path / "split", "train.steps=6", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed(tmp_path / "split", 3)
    assert_bitwise_equal(
        tmp_path / "full" / "checkpoints" / "step-00000006", tmp_path / "split" / "checkpoints" / "step-00000006"
    )


@pytest.mark.slow
def test_two_ranks_resume_r3gans_schedules_exactly(tmp_path, digits_shards):
    """R3GAN's networks with train.schedule_images (lr, beta2, gamma, augment p, EMA half-life, over the
    images of both ranks) and StyleGAN2-ADA's augmentation: 3 + 3 steps on 2 ranks == 6, bitwise."""
    common = [
        "--preset",
        "digits-r3gan-net",
        f"data.shards={digits_shards}",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.r3gan.widths=[8,8,8,8]",
        "model.r3gan.cardinalities=[2,2,2,2]",
        "model.g.z_dim=8",
        "train.schedule_images=96",  # 6 steps x 8 images x 2 ranks: the whole ramp
        "train.ema_halflife_images=32",
        "data.augment=ada",
        "data.augment_p=0.5",
        "train.log_every=1",
        "train.ckpt_every=1000",
        "train.sample_every=1000",
        "tracking.wandb.mode=disabled",
    ]
    for out, steps in (("full", 6), ("split", 3)):
        r = launch(*common, "--out", tmp_path / out, f"train.steps={steps}")
        assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "--out", tmp_path / "split", "train.steps=6", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed(tmp_path / "split", 3)
    assert_bitwise_equal(
        tmp_path / "full" / "checkpoints" / "step-00000006", tmp_path / "split" / "checkpoints" / "step-00000006"
    )
    images = [m["schedule/images"] for m in read_metrics(tmp_path / "split") if "schedule/images" in m]
    assert images == [0, 16, 32, 48, 64, 80]  # both ranks' images count


LONG = [*FAST, "train.steps=100000", "train.log_every=1", "train.ckpt_every=4"]


def start_ranks(*args, n=2):
    """n rank processes started directly with torch.distributed's environment, one task per rank
    as `srun --ntasks-per-node=N` would start them: their exit codes are ours to read."""
    port, procs = free_port(), []
    for rank in range(n):
        env = {
            **ENV,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        out = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distgan", "train", *map(str, args)],
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env=env,
            text=True,
        )
        proc.log = out
        procs.append(proc)
    return procs


def test_sigterm_to_every_rank_checkpoints_once_then_requeue_resumes(tmp_path, digits_shards):
    """What SLURM does at preemption: SIGTERM to every rank at once. The ranks agree on a step,
    write one checkpoint there and exit 143; --resume auto continues from it. Checkpoints are written
    in the background (train.ckpt_async=true; the SIGINT test in test_train.py writes them in the
    step): the signal may land while one is pending, and the exit waits for the last."""
    run = tmp_path / "run"
    procs = start_ranks(*LONG, f"data.shards={digits_shards}", "--out", run, "train.ckpt_async=true")
    wait_for(run / "checkpoints" / "step-00000004", procs[0])
    for proc in procs:
        os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=120)
    logs = [output(proc) for proc in procs]
    assert [proc.returncode for proc in procs] == [143, 143], logs[0][-3000:]
    assert sum(log.count("stopped by signal 15") for log in logs) == 1, logs[0][-3000:]  # rank 0 says it, once
    steps = checkpoint.list_steps(run)
    stop = steps[-1]
    assert stop.name != "step-00000004"  # a new checkpoint at the step where the ranks stopped
    ckpt = checkpoint.load(stop)
    assert len(set(ckpt.meta["fingerprints"])) == 1
    assert [p.name for p in steps if p.name > "step-00000004"] == [stop.name]  # exactly one
    # the requeued job, under the launcher
    r = launch(*FAST, f"data.shards={digits_shards}", "--out", run, "--resume", "auto", f"train.steps={ckpt.step + 2}")
    assert r.returncode == 0, r.stderr[-3000:]
    resumes = [m for m in read_metrics(run) if m.get("event") == "resume"]
    assert [m["step"] for m in resumes] == [ckpt.step]
    assert checkpoint.list_steps(run)[-1].name == f"step-{ckpt.step + 2:08d}"


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_stops_the_others_with_a_clear_error(tmp_path, digits_shards, how):
    """Rank 1 killed (SIGKILL) or frozen (SIGSTOP): rank 0 fails with a clear message, the frozen
    case within dist.timeout_s, and the last checkpoint stays whole."""
    run = tmp_path / "run"
    proc = start(*LONG, f"data.shards={digits_shards}", "--out", run, "dist.timeout_s=6")
    wait_for(run / "checkpoints" / "step-00000004", proc)
    ranks = ranks_of(proc.pid)
    t0 = time.time()
    os.kill(ranks[1], getattr(signal, how))
    while os.path.exists(f"/proc/{ranks[0]}") and open(f"/proc/{ranks[0]}/stat").read().split()[2] != "Z":
        assert time.time() - t0 < 60, "rank 0 did not give up"
        time.sleep(0.1)
    waited = time.time() - t0
    print(f"rank 0 gave up {waited:.2f} s after {how}")
    if how == "SIGKILL":
        assert waited < 5, waited  # the socket closes: no need to wait for dist.timeout_s
    if how == "SIGSTOP":
        assert 5 < waited < 30, waited  # dist.timeout_s=6, plus the step in flight
        os.kill(ranks[1], signal.SIGKILL)
    proc.wait(timeout=120)
    log = output(proc)
    assert proc.returncode != 0
    assert "rank 0: lost contact with the other ranks" in log, log[-3000:]
    assert "continue with --resume auto" in log
    newest = checkpoint.list_steps(run)[-1]
    assert len(set(checkpoint.load(newest).meta["fingerprints"])) == 1


def test_grad_accum_equals_bigger_batch_without_extra_allreduces(tmp_path, digits_shards):
    """2 ranks: accum=2 x batch 8 equals accum=1 x batch 16 for G, D and Adam (MLP: no BatchNorm),
    with as many gradient all-reduces per step (micro-batches before the last run under no_sync)."""
    common = [
        *FAST,
        f"data.shards={digits_shards}",
        "model.g.arch=mlp",
        "model.d.arch=mlp",
        "train.steps=2",
        "train.log_every=1",
        "data.num_workers=0",
    ]
    r = launch(*common, "--out", tmp_path / "accum", "train.grad_accum=2", "data.batch_size=8")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "--out", tmp_path / "big", "train.grad_accum=1", "data.batch_size=16")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, _ = read(tmp_path / "accum" / "checkpoints" / "step-00000002" / name)
        b, _ = read(tmp_path / "big" / "checkpoints" / "step-00000002" / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{name}:{k}")
    counts = {
        run: [m["dist/grad_allreduces_per_step"] for m in read_metrics(tmp_path / run) if "loss/d" in m]
        for run in ("accum", "big")
    }
    assert counts["accum"] == counts["big"] and counts["big"][0] >= 2  # >= one bucket each for D and G


@pytest.mark.parametrize(
    "count", [3, pytest.param(1, marks=pytest.mark.slow)]
)  # 3 shards over 2 ranks x 2 workers; 1 shard, fewer than workers
def test_uneven_shards_neither_hang_nor_crash(tmp_path, count):
    from distgan.data import shards

    out = tmp_path / "shards"
    shards.write_builtin("digits", out, maxcount=-(-1797 // count), progress=False)
    assert len(list(out.glob("*.tar"))) == count
    run = tmp_path / "run"
    r = launch(*FAST, f"data.shards={out}", "data.num_workers=2", "--out", run, "train.steps=4", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = checkpoint.load(run / "checkpoints" / "step-00000004")  # every rank got there: the gather
    assert len(ckpt.meta["fingerprints"]) == 2 and len(set(ckpt.meta["fingerprints"])) == 1


@pytest.mark.parametrize("scheme", ["http", pytest.param("pipe", marks=pytest.mark.slow)])
def test_two_ranks_stream_remote_shards(tmp_path, digits_shards, scheme):
    import functools
    import http.server
    import threading

    manifest = json.loads((digits_shards / "manifest.json").read_text())
    if scheme == "http":
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/{manifest['pattern']}"
    else:
        url = f"pipe:cat {digits_shards}/{manifest['pattern']}"
    try:
        r = launch(*FAST, f"data.shards={url}", "--out", tmp_path / "run", "train.steps=4", timeout=300)
    finally:
        if scheme == "http":
            server.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    state, meta = read(tmp_path / "run" / "checkpoints" / "step-00000004" / "state.safetensors")
    read_by = state["data.shards_read"].bool()
    assert read_by[0].any() and read_by[1].any() and not (read_by[0] & read_by[1]).any()


def script_env():
    """The launch scripts call `accelerate` from PATH: this interpreter's."""
    return {
        **ENV,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "MAIN_PROCESS_PORT": str(free_port()),
    }


def test_two_nodes_on_loopback_train_checkpoint_and_resume(tmp_path, digits_shards):
    """launch/two_nodes_local.sh: two `accelerate launch`es with machine ranks 0 and 1 (static
    rendezvous on 127.0.0.1), as on a 2-node cluster."""
    run = tmp_path / "run"
    common = [*FAST, f"data.shards={digits_shards}", "--out", run, "train.ckpt_every=2"]
    script = str(ROOT / "launch" / "two_nodes_local.sh")
    r = subprocess.run(
        [script, "1", *map(str, common), "train.steps=4"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=script_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = checkpoint.load(run / "checkpoints" / "step-00000004")
    assert ckpt.meta["data"]["world_size"] == 2 and len(set(ckpt.meta["fingerprints"])) == 1
    r = subprocess.run(
        [script, "1", *map(str, common), "train.steps=6", "--resume", "auto"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=script_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run) if m.get("event") == "resume"] == [4]
    assert checkpoint.list_steps(run)[-1].name == "step-00000006"


def test_cpu_ddp_script_runs_n_ranks(tmp_path, digits_shards):
    run = tmp_path / "run"
    r = subprocess.run(
        [
            str(ROOT / "launch" / "cpu_ddp.sh"),
            "2",
            *FAST,
            f"data.shards={digits_shards}",
            "--out",
            str(run),
            "train.steps=2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=script_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.load(run / "checkpoints" / "step-00000002").meta["data"]["world_size"] == 2


@pytest.mark.parametrize(
    "d, env",
    [
        # BatchNorm buffers updated by four D calls before backward (real, fake, x_hat, R1's real)
        (["model.d.batchnorm=true", "variant.r1_gamma=1"], {}),
        # lazy: regularisation steps of their own (exact, D steps 0 and 2), each all-reduced
        (["model.d.batchnorm=true", "variant.r1_gamma=1", "variant.penalty_mode=lazy", "variant.penalty_every=2"], {}),
        (["model.d.spectral_norm=true"], {}),  # u, v updated in place by three D calls (Triton, interpreted)
        pytest.param(["model.d.spectral_norm=true"], FALLBACK, marks=pytest.mark.slow),  # ... PyTorch fallback
        (["model.d.minibatch_discrimination=true", "model.d.mbd_kernels=8"], {}),  # its double backward
        pytest.param(
            ["model.d.minibatch_discrimination=true", "model.d.mbd_kernels=8"], FALLBACK, marks=pytest.mark.slow
        ),
    ],
    ids=["bn-r1", "bn-r1-lazy", "sn-triton", "sn-fallback", "mbd-triton", "mbd-fallback"],
)
def test_gradient_penalty_under_ddp(tmp_path, digits_shards, d, env):
    """WGAN-GP on 2 ranks: D on real, fake and x_hat (and real again for R1), then one backward
    through create_graph; the ranks stay identical."""
    run = tmp_path / "run"
    r = launch(
        "--preset",
        "digits-wgan-gp",
        *FAST,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "train.steps=2",
        "variant.n_critic=2",
        *d,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert kernels_used(run) == ("torch" if env else "triton")
    _, meta = read(run / "checkpoints" / "step-00000002" / "state.safetensors")
    assert len(set(meta["fingerprints"])) == 1
    logged = [m for m in read_metrics(run) if "loss/gp" in m]
    assert logged and logged[-1]["loss/gp"] > 0
    if "variant.r1_gamma=1" in d:
        assert logged[-1]["loss/r1"] > 0


def test_unrolled_gan_under_ddp(tmp_path, digits_shards):
    """Unrolled GAN on 2 ranks: G runs k+1 times before one backward through the unrolled D steps."""
    run = tmp_path / "run"
    r = launch(
        "--preset",
        "digits-unrolled",
        *FAST,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "train.steps=2",
        "variant.unroll_steps=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _, meta = read(run / "checkpoints" / "step-00000002" / "state.safetensors")
    assert len(set(meta["fingerprints"])) == 1


def test_two_ranks_share_one_adaptive_p_and_resume_on_one_process_and_back(tmp_path, digits_shards):
    """ADA's p comes from r_t summed over both ranks, so it is one number everywhere. The run then
    resumes on 1 process and back on 2 (docs/distributed.md's contract): the global batch is kept by
    train.grad_accum (2, then 1 again), the models and optimizer states load bitwise, p carries over
    and ADA's partial sums keep their total over ranks, and each `resume` event records the change."""
    common = [
        *FAST,
        f"data.shards={digits_shards}",
        "data.augment=translation",
        "data.augment_p=auto",
        "data.augment_target=0.2",
        "train.log_every=1",
        "train.ckpt_every=1000",
    ]
    run = tmp_path / "run"
    r = launch(*common, "--out", run, "train.steps=8")
    assert r.returncode == 0, r.stderr[-3000:]
    state, meta = read(run / "checkpoints" / "step-00000008" / "state.safetensors")
    assert meta["fingerprints"][0] == meta["fingerprints"][1]
    p = state["variant.shared.augment_p"]
    assert p.shape == (2, 1) and p[0, 0] == p[1, 0] and p[0, 0] > 0
    logged = [m["augment/p"] for m in read_metrics(run) if "augment/p" in m]
    assert logged[-1] == pytest.approx(p[0, 0].item())
    # each move of p is +-(real images of the last 4 steps, both ranks) / 500k = 2 x 4 x 16 / 5e5, not one
    # rank's half of it (a p from one rank's statistics moves by 4 x 16 / 5e5), unless clamped at 0
    unit = 2 * 4 * 16 / 500e3
    moves = [(b - a, b) for a, b in zip([0.0, *logged], logged) if b != a]
    assert moves and all(abs(d) == pytest.approx(unit) or b == 0 for d, b in moves), moves
    _loads_bitwise_on_one_process(run / "checkpoints" / "step-00000008", common, tmp_path / "probe")
    r = run_cli("train", *common, "--out", run, "train.steps=9", "--resume", "auto", env=ENV)
    assert r.returncode == 0 and "on 1 processes train.grad_accum=2 keeps that" in r.stderr, r.stderr[-3000:]
    after = [m for m in read_metrics(run) if m.get("step") == 9 and "augment/p" in m]
    assert after[0]["augment/p"] == pytest.approx(p[0, 0].item())  # step 9 moves nothing (every 4 steps)
    assert "grad_accum: 2" in (run / "config.yaml").read_text()
    r = launch(*common, "--out", run, "train.steps=10", "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    resumes = [m for m in read_metrics(run) if m.get("event") == "resume"]
    assert [(m["step"], m["world_size"]) for m in resumes] == [(8, [2, 1]), (9, [1, 2])]
    assert "grad_accum: 1" in (run / "config.yaml").read_text()
    _, meta = read(run / "checkpoints" / "step-00000010" / "state.safetensors")
    assert meta["fingerprints"][0] == meta["fingerprints"][1] and meta["data"]["world_size"] == 2


def _loads_bitwise_on_one_process(path, overrides, probe):
    """trainer.build on 1 process from a 2-process checkpoint: models and optimizer states equal to the
    checkpoint's, bitwise; ADA's p carried, its partial sums' total kept on rank 0."""
    from distgan import cluster, config, trainer
    from distgan import run as run_state
    from distgan.data import feeds

    ckpt = checkpoint.load(path)
    cfg = config.load_config(None, overrides=[*overrides, "tracking.wandb.mode=disabled", "train.steps=9"])
    cfg = run_state.keep_global_batch(ckpt, cfg, 1, True)
    assert cfg.train.grad_accum == 2
    acc = cluster.make_accelerator(cfg, with_wandb=False)
    sources, expected = trainer.open_sources(cfg, acc)
    run = trainer.build(cfg, probe, acc, ckpt, sources, expected)
    try:
        for name, model in run.plain().items():
            for k, v in model.state_dict().items():
                assert torch.equal(v, ckpt.model_state(name)[k]), f"{name}.{k}"
        for name, opt in run.variant.optimizers.items():
            want = ckpt.optimizer_state(name)["state"]
            have = opt.state_dict()["state"]
            assert have.keys() == want.keys()
            assert all(
                torch.equal(torch.as_tensor(have[i][k]), torch.as_tensor(v)) for i in want for k, v in want[i].items()
            )
        # the per-rank RNG continues from (seed, rank, step), not from step 0's (seed, rank) again
        from distgan import rng
        from distgan.data import stream

        now = torch.get_rng_state()
        rng.seed_all(stream.stream_seed(cfg.train.seed, 0, 2))
        assert not torch.equal(now, torch.get_rng_state())
        ada = run.variant.ada
        assert ada.p.item() == ckpt.state["variant.shared.augment_p"][0, 0].item()
        total = ckpt.state["variant.augment_sums"].sum(0)
        if total[1] > 0:
            assert torch.equal(ada.sums.double(), total)
    finally:
        feeds.close(run.feeds)
        run.tracker.close()
        cluster.release(1)


@pytest.mark.slow  # 4 ranks on 2 cores: about a minute
def test_resume_on_four_processes_refuses_a_changed_batch_then_keeps_it(tmp_path, digits_shards):
    """2 processes x 16 = 32 images per step, resumed on 4: 16 per process cannot keep 32, so the
    resume is refused (exit 2, nothing trained) naming data.batch_size=8; with it the run continues
    on 4 ranks, identical models on every rank, and the `resume` event records 2 -> 4; then back on 2."""
    common = [*FAST, f"data.shards={digits_shards}", "train.ckpt_every=1000"]
    run = tmp_path / "run"
    r = launch(*common, "--out", run, "train.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(*common, "--out", run, "train.steps=3", "--resume", "auto", processes=4)
    assert r.returncode != 0 and "Resume with data.batch_size=8 train.grad_accum=1" in r.stderr, r.stderr[-3000:]
    assert checkpoint.list_steps(run)[-1].name == "step-00000002"
    r = launch(*common, "--out", run, "train.steps=3", "--resume", "auto", "data.batch_size=8", processes=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["world_size"] for m in read_metrics(run) if m.get("event") == "resume"] == [[2, 4]]
    _, meta = read(run / "checkpoints" / "step-00000003" / "state.safetensors")
    assert len(set(meta["fingerprints"])) == 1 and meta["data"]["world_size"] == 4
    # and back from 4 to 2 processes: 4 x 8 = 32 per step again with data.batch_size=16 (the rule
    # raises grad_accum only when it must; 16 x 2 keeps 32 as it is)
    r = launch(*common, "--out", run, "train.steps=4", "--resume", "auto", processes=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["world_size"] for m in read_metrics(run) if m.get("event") == "resume"] == [[2, 4], [4, 2]]
    _, meta = read(run / "checkpoints" / "step-00000004" / "state.safetensors")
    assert len(set(meta["fingerprints"])) == 1 and meta["data"]["world_size"] == 2
    assert meta["config"]["train"]["grad_accum"] == 1


@pytest.mark.parametrize(
    "preset",
    ["digits-gat", pytest.param("digits-gat-latent", marks=pytest.mark.slow)],
)
def test_transformer_gan_under_ddp(tmp_path, digits_shards, preset):
    """GAT's recipe on 2 ranks: vit G and D, multi-level guidance, approximate R1 + R2, gradient clipping
    after the all-reduce (the same total norm on every rank), on the pixels with the DINOv2 alignment
    term (D's projector in the all-reduce, the frozen encoder outside it); the ranks stay identical."""
    from test_align import meta_state

    run = tmp_path / "run"
    data = [f"data.shards={digits_shards}"] if preset == "digits-gat" else ["data.resolution=16"]
    if preset == "digits-gat":
        torch.save(meta_state(), tmp_path / "dinov2.pth")
        data += [
            f"model.align.encoder={tmp_path / 'dinov2.pth'}",
            "model.align.resolution=28",
            "model.align.proj_dim=16",
        ]
    r = launch(
        "--preset",
        preset,
        *data,
        "data.batch_size=8",
        *TINY_VIT,
        "train.log_every=1",
        "train.sample_every=1000",
        "tracking.wandb.mode=disabled",
        "--out",
        run,
        "train.steps=3",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _, meta = read(run / "checkpoints" / "step-00000003" / "state.safetensors")
    assert meta["data"]["world_size"] == 2 and len(set(meta["fingerprints"])) == 1
    logged = [m for m in read_metrics(run) if "loss/r1" in m]
    assert logged and logged[-1]["loss/r1"] > 0 and logged[-1]["loss/r2"] > 0
    if preset == "digits-gat":
        assert logged[-1]["loss/align"] > 0
