"""Faults: NaN/Inf gradients, and SIGKILL while a checkpoint is written (the multi-process faults,
SIGTERM to every rank and a dead rank, are in test_ddp.py)."""

import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from conftest import FAST, read_metrics

from distgan import checkpoint, config, trainer
from distgan.data import builtin
from distgan.errors import RunFailed


def digit_batches(nan_at: int, n: int = 8, batch: int = 16):
    """Real digits at 16x16 in [-1, 1]; batch `nan_at` has NaN pixels (what a corrupt decode or an
    fp16 overflow upstream would hand the trainer)."""
    images, labels, _ = builtin.digits()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = torch.nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False)
    for i in range(n):
        img = x[i * batch : (i + 1) * batch].clone()
        if i == nan_at:
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
    assert not torch.equal(before.model_state("G")["net.0.weight"], after.model_state("G")["net.0.weight"])
    for ckpt in (after, read_step(tmp_path / "run", 4)):
        assert all(torch.isfinite(v).all() for v in ckpt.models.values())
    metrics = read_metrics(tmp_path / "run")
    assert [(m["step"], m["skipped"]) for m in metrics if m.get("event") == "nonfinite"] == [(3, "D")]
    assert [m["train/nan_skipped_steps"] for m in metrics if "loss/d" in m] == [0, 1]


def test_nan_gradients_stop_the_run_when_asked_and_keep_the_last_checkpoint(tmp_path):
    cfg = config.load_config(
        "digits-dcgan", overrides=[*FAST, "train.steps=6", "train.ckpt_every=2", "train.on_nan=stop"]
    )
    with pytest.raises(RunFailed, match=r"step 4: NaN/Inf gradients in D; stopping \(train.on_nan=stop\)"):
        trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at=3))
    steps = checkpoint.list_steps(tmp_path / "run")
    assert [p.name for p in steps] == ["step-00000002"]
    assert all(torch.isfinite(v).all() for v in checkpoint.load(steps[0]).models.values())


def _write_forever(run, first_step, forever=True):
    """Checkpoints of a ~6 MB model whose every value is its step number, one after another."""
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 1024))
    opt = torch.optim.Adam(model.parameters())
    step = first_step
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        checkpoint.save(run, step, models={"G": model}, optimizers={"G": opt},
                        state_tensors={"step": torch.tensor([step])}, meta={"step_check": step}, keep_last=2)  # fmt: skip
        if not forever:
            return
        step += 1


def test_sigkill_while_writing_checkpoints_never_leaves_a_partial_one(tmp_path):
    """20 writers killed with SIGKILL at random moments: every step folder resume could pick reads
    back whole, with the values of its step, and the newest is never older than the one before."""
    run = tmp_path / "run"
    _write_forever(tmp_path / "warm-up", 0, forever=False)  # import everything before forking
    ctx = multiprocessing.get_context("fork")
    rnd = random.Random(0)
    newest, mid_write = -1, 0
    for trial in range(20):
        proc = ctx.Process(target=_write_forever, args=(run, newest + 1), daemon=True)
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


def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path):
    cfg = config.load_config("digits-dcgan", overrides=[*FAST, "train.steps=2", "train.ckpt_every=1"])
    assert trainer.train(cfg, tmp_path / "run", data=digit_batches(nan_at=-1)) == 0
    newest = checkpoint.list_steps(tmp_path / "run")[-1]
    (newest / "optimizer.safetensors").write_bytes(b"\0" * 100)  # damage from outside: a bad copy
    picked = trainer._find_resume("auto", tmp_path / "run")
    assert picked.step == 1
    np.testing.assert_array_equal([p.name for p in checkpoint.list_steps(tmp_path / "run")],
                                  ["step-00000001", "step-00000002"])  # fmt: skip
