"""Faults: NaN/Inf gradients, and SIGKILL while a checkpoint is written (the multi-process faults,
SIGTERM to every rank and a dead rank, are in test_ddp.py)."""

import multiprocessing
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch
from conftest import FAST, read_metrics

from distgan import checkpoint, cluster, config, trainer
from distgan import run as run_state
from distgan.data import builtin
from distgan.errors import RunFailed, UserError


def digit_batches(nan_at: int | set[int], n: int = 8, batch: int = 16):
    """Real digits at 16x16 in [-1, 1]; batch `nan_at` (or each of a set) has NaN pixels (what a corrupt decode or an
    fp16 overflow upstream would hand the trainer)."""
    images, labels, _ = builtin.digits()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    for i in range(n):
        img = x[i * batch : (i + 1) * batch].clone()
        if i == nan_at or (isinstance(nan_at, set) and i in nan_at):
            img[:, :, 4:8, 4:8] = float("nan")
        yield {"image": img, "label": torch.from_numpy(labels[i * batch : (i + 1) * batch])}


def read_step(run, step):
    return checkpoint.load(run / "checkpoints" / f"step-{step:08d}")


def test_nan_gradients_skip_the_update_and_undo_buffer_updates(tmp_path):
    cfg = config.load_config("digits-dcgan", overrides=[*FAST, "train.steps=4", "train.ckpt_every=1"])
    assert trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at=2)) == 0
    before, after = read_step(tmp_path / "run", 2), read_step(tmp_path / "run", 3)
    d_before, d_after = before.model_state("D"), after.model_state("D")
    assert any("running_mean" in k for k in d_before)  # BatchNorm stats: undone too
    for k in d_before:
        assert torch.equal(d_before[k], d_after[k]), f"D.{k} changed in the skipped step"
    # D's Adam (fused: it skipped its own update on the flag) kept its moments and its step count
    opt_before, opt_after = before.optimizer_state("D")["state"], after.optimizer_state("D")["state"]
    assert opt_before and opt_before.keys() == opt_after.keys()
    for i in opt_before:
        for k, v in opt_before[i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_after[i][k])), f"D's Adam {i}.{k} changed"
    assert not torch.equal(before.model_state("G")["net.0.weight"], after.model_state("G")["net.0.weight"])
    for ckpt in (after, read_step(tmp_path / "run", 4)):
        assert all(torch.isfinite(v).all() for v in ckpt.models.values())
    metrics = read_metrics(tmp_path / "run")
    assert [(m["step"], m["skipped"]) for m in metrics if m.get("event") == "nonfinite"] == [(3, "D")]
    assert [m["train/nan_skipped_steps"] for m in metrics if "loss/d" in m] == [0, 1]


@pytest.mark.parametrize("variant", ["digits-dcgan", "digits-wgan"])
def test_the_nan_guard_copies_no_parameter_of_a_fused_optimizer(variant):
    """StepContext.step with a NaN gradient: distgan's fused Adam skips its update on the device
    from the flag, so the step clones no tensor (the model and Adam's state are not copied); WGAN's
    RMSprop, which takes no flag, still steps on a copy and puts it back. Either way nothing changes."""
    import accelerate
    from accelerate.state import AcceleratorState
    from torch.utils._python_dispatch import TorchDispatchMode

    from distgan import step, variants

    class Clones(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.clone.default
            return func(*args, **(kwargs or {}))

    cfg = config.load_config(variant, overrides=FAST)
    v = variants.get(cfg.variant.name)(cfg)
    D, opt = v.models["D"], v.optimizers["D"]
    try:
        ctx = step.StepContext(accelerate.Accelerator(cpu=True), accum=1)
        for bad in (False, True):
            for p in D.parameters():
                p.grad = torch.full_like(p, float("nan") if bad else 0.01)
            before = [p.detach().clone() for p in D.parameters()]
            state = [{k: t.clone() for k, t in opt.state[p].items()} for p in D.parameters() if opt.state.get(p)]
            with Clones() as clones:
                ctx.step(opt)
            _, flags = ctx.pop_nonfinite()
            assert flags.tolist() == [bad]
        assert all(torch.equal(a, p) for a, p in zip(before, D.parameters()))
        after = [{k: t for k, t in opt.state[p].items()} for p in D.parameters() if opt.state.get(p)]
        assert all(torch.equal(s[k], a[k]) for s, a in zip(state, after) for k in s)
        assert (clones.n == 0) == (variant == "digits-dcgan"), clones.n
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_nan_gradients_stop_the_run_when_asked_and_keep_the_last_checkpoint(tmp_path):
    cfg = config.load_config(
        "digits-dcgan", overrides=[*FAST, "train.steps=6", "train.ckpt_every=2", "train.on_nan=stop"]
    )
    with pytest.raises(RunFailed, match=r"step 4: NaN/Inf gradients in D; stopping \(train.on_nan=stop\)"):
        trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at=3))
    steps = checkpoint.list_steps(tmp_path / "run")
    assert [p.name for p in steps] == ["step-00000002"]
    assert all(torch.isfinite(v).all() for v in checkpoint.load(steps[0]).models.values())


def _write_forever(run, first_step, forever=True, background=False):
    """Checkpoints of a ~6 MB model whose every value is its step number, one after another. In the
    background (train.ckpt_async's writer) the model already moves on to the next step's values while
    the previous snapshot is written."""
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 1024))
    opt = torch.optim.Adam(model.parameters())
    writer = checkpoint.BackgroundWriter() if background else None
    step = first_step
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        snap = checkpoint.snapshot({"G": model}, {"G": opt}, {"step": torch.tensor([step])})
        if writer is None:
            checkpoint.write(run, step, snap, {"step_check": step}, keep_last=2)
        else:
            writer.submit(step, lambda s=snap, n=step: checkpoint.write(run, n, s, {"step_check": n}, keep_last=2))
        if not forever:
            if writer is not None:
                writer.wait()
            return
        step += 1


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_sigkill_while_writing_checkpoints_never_leaves_a_partial_one(tmp_path, background):
    """20 writers killed with SIGKILL at random moments: every step folder resume could pick reads
    back whole, with the values of its step, and the newest is never older than the one before. The
    same with the files written on a background thread while the model already changes (async)."""
    run = tmp_path / "run"
    _write_forever(tmp_path / "warm-up", 0, forever=False, background=background)  # import everything before forking
    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(0)
    newest, mid_write = -1, 0
    for trial in range(20):
        proc = ctx.Process(target=_write_forever, args=(run, newest + 1, True, background), daemon=True)
        proc.start()
        time.sleep(rnd.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        folder = run / "checkpoints"
        mid_write += folder.is_dir() and any(p.name.startswith(".tmp-step-") for p in folder.iterdir())
        steps = checkpoint.list_steps(run)
        if not steps:  # killed before its first checkpoint was published
            continue
        for path in steps:
            ckpt = checkpoint.load(path)
            assert ckpt.meta["step_check"] == ckpt.step
            values = torch.cat([v.flatten() for v in ckpt.models.values()]).unique()
            assert values.tolist() == [float(ckpt.step)], f"trial {trial}: {path.name} holds mixed steps"
        assert checkpoint.list_steps(run)[-1] == steps[-1]
        assert ckpt.step >= newest
        newest = ckpt.step
    assert newest > 5  # the writers did get checkpoints out between the kills
    assert mid_write >= 5  # and many kills landed in the middle of writing one
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert len(leftovers) <= 2, leftovers  # a killed writer's temp folder is cleaned by the next one


def test_async_checkpoints_are_the_synchronous_ones_and_complete_before_the_run_ends(tmp_path):
    """train.ckpt_async=true: the same tensors, bitwise, as synchronous checkpoints at every step
    written; the last one is complete when train() returns, and its event says it was written in
    the background. A write that fails surfaces as RunFailed, not as a lost checkpoint."""
    from test_train import assert_bitwise_equal

    for mode in ("true", "false"):
        cfg = config.load_config(
            "digits-dcgan", overrides=[*FAST, "train.steps=4", "train.ckpt_every=2", f"train.ckpt_async={mode}"]
        )
        assert trainer.train(cfg, tmp_path / mode, data=digit_batches(nan_at=-1)) == 0
        # the run waited for its last save: no writer thread left, the last step folder published
        assert not [t for t in threading.enumerate() if t.name.startswith("distgan-checkpoint")]
        assert checkpoint.list_steps(tmp_path / mode)[-1].name == "step-00000004"
    for step in ("step-00000002", "step-00000004"):
        assert_bitwise_equal(tmp_path / "true" / "checkpoints" / step, tmp_path / "false" / "checkpoints" / step)
    events = [m for m in read_metrics(tmp_path / "true") if m.get("event") == "checkpoint"]
    assert [(m["step"], m.get("background")) for m in events] == [(2, True), (4, True)]
    writer = checkpoint.BackgroundWriter()
    writer.submit(7, lambda: checkpoint.write(tmp_path / "nowhere" / "\0", 7, None, {}, 1))
    with pytest.raises(RunFailed, match="checkpoint step 7 could not be written"):
        writer.wait()


def test_sigterm_while_a_background_save_is_pending_waits_for_it_then_checkpoints(tmp_path, monkeypatch):
    """SIGTERM arrives while step 2's files are still being written on the writer thread (the write is
    made slow: a second's sleep before the real one). The run waits for it, writes its stop checkpoint
    (step 3) after it, and ends: both complete, in order, no temporary folder left."""
    real_write, started = checkpoint.write, threading.Event()

    def slow_write(run_dir, step, *args, **kwargs):
        if step == 2:  # only this save is slow: the stop checkpoint's must wait for it, not overtake it
            started.set()
            time.sleep(1.0)
        return real_write(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "write", slow_write)

    def batches():
        for i, batch in enumerate(digit_batches(nan_at=-1)):
            if i == 2:  # step 3's batch: step 2's save was submitted at the end of step 2
                assert started.wait(5) and not checkpoint.list_steps(tmp_path / "run")  # still being written
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    cfg = config.load_config(
        "digits-dcgan", overrides=[*FAST, "train.steps=8", "train.ckpt_every=2", "train.ckpt_async=true"]
    )
    assert trainer.train(cfg, tmp_path / "run", data=batches()) == 128 + signal.SIGTERM  # stopped by the signal
    assert [p.name for p in checkpoint.list_steps(tmp_path / "run")] == ["step-00000002", "step-00000003"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert read_step(tmp_path / "run", 3).step == 3 and read_step(tmp_path / "run", 2).step == 2
    events = [
        (m["event"], m["step"]) for m in read_metrics(tmp_path / "run") if m.get("event") in ("checkpoint", "stop")
    ]
    assert events[:2] == [("checkpoint", 2), ("checkpoint", 3)], events


def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path):
    cfg = config.load_config("digits-dcgan", overrides=[*FAST, "train.steps=2", "train.ckpt_every=1"])
    assert trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at=-1)) == 0
    newest = checkpoint.list_steps(tmp_path / "run")[-1]
    (newest / "optimizer.safetensors").write_bytes(b"\0" * 100)  # damage from outside: a bad copy
    picked = run_state.find_resume("auto", tmp_path / "run")
    assert picked.step == 1
    np.testing.assert_array_equal(
        [p.name for p in checkpoint.list_steps(tmp_path / "run")], ["step-00000001", "step-00000002"]
    )


def test_consecutive_nan_steps_stop_after_max_nan_skips(tmp_path):
    """train.on_nan=skip, but 3 bad batches in a row with train.max_nan_skips=3: the third stops the run."""
    cfg = config.load_config(
        "digits-dcgan", overrides=[*FAST, "train.steps=8", "train.ckpt_every=2", "train.max_nan_skips=3"]
    )
    with pytest.raises(
        RunFailed,
        match=r"step 5: NaN/Inf gradients in D; stopping \(3 steps in a row "
        r"\(train.max_nan_skips=3\)\)",
    ):
        trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at={2, 3, 4}))
    skipped = [m["step"] for m in read_metrics(tmp_path / "run") if m.get("event") == "nonfinite"]
    assert skipped == [3, 4]  # the third is not logged: the run stopped there
    steps = checkpoint.list_steps(tmp_path / "run")  # step 4's update was skipped, its model is fine
    assert [p.name for p in steps] == ["step-00000002", "step-00000004"]
    assert all(torch.isfinite(v).all() for p in steps for v in checkpoint.load(p).models.values())


def test_a_model_holding_nan_is_never_written_over_a_good_checkpoint(tmp_path):
    """NaN in a weight that no gradient reaches (the EMA copy, from a damaged resume): the next
    checkpoint is refused, and the newest existing one stays as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = config.load_config("digits-dcgan", overrides=[*FAST, "train.steps=2", "train.ckpt_every=1"])
    assert trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at=-1)) == 0
    step = tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors"
    with safe_open(str(step), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = next(k for k in tensors if k.startswith("G_ema.") and k.endswith("weight"))
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(step), metadata=meta)
    damaged = step.read_bytes()
    cfg = config.load_config("digits-dcgan", overrides=[*FAST, "train.steps=4", "train.ckpt_every=1"])
    with pytest.raises(RunFailed, match=rf"step 3: the model holds NaN/Inf values \({key}"):
        trainer.train(cfg, tmp_path / "run", resume="auto", data=digit_batches(nan_at=-1))
    assert [p.name for p in checkpoint.list_steps(tmp_path / "run")] == ["step-00000001", "step-00000002"]
    assert step.read_bytes() == damaged


def test_fp16_on_the_cpu_is_refused_not_silently_fp32(tmp_path):
    """Accelerate runs fp16 (autocast + GradScaler) only on a GPU; on the CPU the run would be fp32
    while saying fp16. Refused before anything is written; bf16 is the CPU's mixed precision."""
    cfg = config.load_config("digits-dcgan", overrides=[*FAST, "train.steps=2", "train.mixed_precision=fp16"])
    with pytest.raises(UserError, match="fp16 mixed precision needs a GPU"):
        trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at=-1))
    assert not (tmp_path / "run").exists()


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT only sets the flag the loop checks at the end of the step; the second raises
    KeyboardInterrupt where the process is (the CLI exits 130)."""
    import os
    import signal

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with cluster.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_second_ctrl_c_exits_130_at_once_from_the_cli(tmp_path, digits_shards, capsys, monkeypatch):
    """`distgan train` (in this process) gets two SIGINTs while it draws the batches of step 3: the second
    interrupts it there, and the CLI says so in one line and exits 130, with no traceback and no
    checkpoint (the first alone would checkpoint at the end of the step: test_sigint_checkpoints_...)."""
    from conftest import run_main

    from distgan.data import feeds

    draw, calls = feeds.draw, []

    def draw_then_ctrl_c_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the first handler runs between bytecodes: two signals, not one
                pass
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        return draw(*args, **kwargs)

    monkeypatch.setattr(feeds, "draw", draw_then_ctrl_c_twice)
    run = tmp_path / "run"
    code, _, err = run_main(capsys, "train", *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=50")
    assert code == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "distgan train: interrupted" and "Traceback" not in err, err[-3000:]
    assert len(calls) == 3 and not list(run.glob("checkpoints/step-*"))
