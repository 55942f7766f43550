"""Hostile and odd inputs around runs: evaluation that follows the run's data.on_error, one cache
of reference statistics shared by `stats`, `eval` and training and checked before it is trusted,
unusable --ref statistics refused before any Inception work, files never written through a planted
link, keep-best that survives a kill at any rename, and optimizer settings that a resume applies."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import FAST, read_metrics, run_main
from test_hostile_data import digit_members, write_tar
from test_inception import random_inception

from distgan import checkpoint, files, images
from distgan.errors import UserError
from distgan.metrics import inception, standard


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(random_inception(0).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def bad_digits(tmp_path_factory):
    """Two shards of 4 real digits; the first holds one more sample whose PNG does not decode."""
    folder = tmp_path_factory.mktemp("bad-digits")
    members = digit_members(8)
    write_tar(folder / "d-0.tar", members[:4] + [("broken.png", b"not a png"), ("broken.cls", b"1")] + members[4:8])
    write_tar(folder / "d-1.tar", members[8:])
    return folder


def test_stats_eval_and_training_share_one_checked_cache_and_follow_on_error(weights, bad_digits, tmp_path, capsys):
    net = inception.FeatureNet(weights)
    with pytest.raises(UserError, match="sample 'broken'"):  # data.on_error=raise, the default
        standard.reference_stats(
            str(bad_digits), resolution=16, channels=1, net=net, split=standard.Split(), progress=False
        )
    stats = ["stats", "--shards", bad_digits, "--inception", weights, "--resolution", "16", "--channels", "1"]
    code, out, err = run_main(capsys, *stats, "--on-error", "skip")
    assert code == 0, err[-2000:]
    assert "of 8 images" in out and "computed, cached in " in out, out
    cached = out.split("computed, cached in ")[1].split()[0]
    # a run that skips bad samples evaluates on the same shards, from the same cached statistics
    run = tmp_path / "run"
    code, _, err = run_main(
        capsys,
        "train",
        *FAST,
        f"data.shards={bad_digits}",
        "data.on_error=skip",
        "--out",
        run,
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_n=4",
        f"train.eval_inception={weights}",
    )
    assert code == 0, err[-3000:]
    assert f"reference statistics: cached {cached}" in err, err[-3000:]
    assert any("eval/fid" in m for m in read_metrics(run))
    # a file put in the cache that records another computation (stale, or someone else's) is not trusted;
    # eval recomputes it under the same name: stats, training and eval share one key
    ev = ["eval", "--ckpt", run, "--inception", weights, "--n", "4", f"data.shards={bad_digits}"]
    planted = standard.RefStats.load(cached)
    planted.meta = {**planted.meta, "resolution": 99}
    planted.mu = planted.mu + 100.0
    planted.save(cached)
    code, out, err = run_main(capsys, *ev, "data.on_error=skip", "--json", tmp_path / "e.json")  # as key=value
    assert code == 0, err[-3000:]
    assert "was not used: it records other resolution" in out and f"computed, cached in {cached}" in out, out
    assert json.loads((tmp_path / "e.json").read_text())["fid"] < 1e4  # not against mu + 100
    assert standard.RefStats.load(cached).meta["resolution"] == 16 and standard.RefStats.load(cached).n == 8
    # unusable --ref statistics: one line, before any Inception work
    feats = np.random.default_rng(0).standard_normal((20, inception.FEATURES)).astype(np.float32)
    bad = standard.RefStats.of(feats, {})
    bad.sigma[3, 5] = np.nan
    bad.save(tmp_path / "nan.npz")
    code, out, err = run_main(capsys, *ev, "--ref", tmp_path / "nan.npz")
    assert code == 2 and "cannot be used: mu or sigma holds NaN/Inf" in err, err[-2000:]
    assert "generated features" not in err  # (the one line comes from main(): no traceback)


def test_unusable_reference_statistics_are_named(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((20, inception.FEATURES)).astype(np.float32)
    good = standard.RefStats.of(feats, {"shards": "x"})
    cases = {
        "width": (dict(features=feats[:, :64]), "features have shape (20, 64); expected (N, 2048)"),
        "inf": (dict(mu=np.full(inception.FEATURES, np.inf)), "mu or sigma holds NaN/Inf"),
        "asym": (dict(sigma=good.sigma + np.triu(np.ones_like(good.sigma), 1)), "sigma is not symmetric"),
        "n": (dict(n=np.int64(5)), "20 features but n=5"),
    }
    for name, (change, needle) in cases.items():
        arrays = {"mu": good.mu, "sigma": good.sigma, "n": np.int64(20), "features": feats, **change}
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(UserError, match="cannot be used: " + needle.replace("(", r"\(").replace(")", r"\)")):
            standard.RefStats.load(tmp_path / f"{name}.npz")
    # a run given such statistics stops before it writes anything
    from distgan import config, trainer

    cfg = config.load_config(
        None,
        None,
        [
            "tracking.wandb.mode=disabled",
            f"train.eval_ref={tmp_path / 'inf.npz'}",
            "train.eval_inception=x.pth",
            "train.eval_every=2",
        ],
    )
    with pytest.raises(UserError, match="cannot be used: mu or sigma holds NaN/Inf"):
        trainer.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_file_is_written_through_a_link_planted_in_the_output_folder(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "shared"
    out.mkdir()
    # the temporary names distgan used before, and the target names themselves
    for name in (".ref.npz.tmp.npz", "ref.npz", ".grid.png.tmp", "grid.png", ".manifest.json.tmp", "x.json"):
        os.symlink(victim, out / name)
    feats = np.random.default_rng(0).standard_normal((10, inception.FEATURES)).astype(np.float32)
    standard.RefStats.of(feats, {"shards": "x"}).save(out / "ref.npz")
    images.save_png(out / "grid.png", np.zeros((4, 4, 3), np.uint8))
    files.write_text(out / "x.json", "{}")
    from distgan.data import shards

    shards.write_arrays(np.zeros((3, 4, 4, 1), np.uint8), None, [], out, source="test", progress=False)
    assert victim.read_text() == "precious"
    for name in ("ref.npz", "grid.png", "x.json", "manifest.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert standard.RefStats.load(out / "ref.npz").n == 10
    assert (out / "ref.npz").stat().st_mode & 0o777 == 0o666 & ~_umask()  # as a plain open() creates it
    # a log opened for appending refuses a link
    os.symlink(victim, tmp_path / "metrics.jsonl")
    with pytest.raises(UserError, match="is a symbolic link"):
        files.open_append(tmp_path / "metrics.jsonl")
    assert victim.read_text() == "precious"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _step(run, step, fid):
    """A real checkpoint of a tiny model at `step`, recording an improvement to `fid`."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    meta = {"config": {}, "keep_best": {"name": "best-fid", "fid": fid}}
    checkpoint.save(
        run,
        step,
        models={"G": model},
        optimizers={"G": opt},
        state_tensors={"x": torch.zeros(1)},
        meta=meta,
        keep_last=3,
    )


FS_OPS = ("rename", "replace", "symlink", "link", "mkdir", "unlink")


def _keep_copy_killed_at(run, k) -> bool:
    """In a forked child, keep_copy(step 2) killed (os._exit, no clean-up) just before its k-th file
    system operation; False when it finished first (k is past its last operation)."""
    pid = os.fork()
    if pid == 0:  # the child
        count = [0]

        def counted(fn):
            def op(*a, **kw):
                count[0] += 1
                if count[0] == k:
                    os._exit(9)
                return fn(*a, **kw)

            return op

        for name in FS_OPS:
            setattr(os, name, counted(getattr(os, name)))
        try:
            checkpoint.keep_copy(run, 2, "best-fid", {"step": 2, "fid": 3.0})
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 9


def test_keep_best_survives_a_kill_at_every_file_operation_and_resume_recovers_it(tmp_path):
    k = 1
    while True:
        run = tmp_path / f"run{k}"
        _step(run, 1, 5.0)
        checkpoint.keep_copy(run, 1, "best-fid", {"step": 1, "fid": 5.0})
        _step(run, 2, 3.0)  # published; a kill may come before, during or after its keep_copy
        killed = _keep_copy_killed_at(run, k)
        best = checkpoint.read_best(run, "best-fid")
        assert best in ({"step": 1, "fid": 5.0}, {"step": 2, "fid": 3.0}), (k, best)
        kept = checkpoint.load(run / "checkpoints" / "best-fid")  # a complete, readable checkpoint
        assert kept.step == best["step"], k
        # resume: the best is step 2 again, whatever the kill interrupted, and nothing is left over
        assert checkpoint.recover_best(run, "best-fid", "fid") == {"step": 2, "fid": 3.0}
        assert checkpoint.read_best(run, "best-fid") == {"step": 2, "fid": 3.0}
        assert checkpoint.load(run / "checkpoints" / "best-fid").step == 2
        left = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert left == [".best-fid-00000002", "best-fid", "step-00000001", "step-00000002"], (k, left)
        if not killed:  # keep_copy finished before the k-th operation: every kill point was tried
            break
        k += 1
    assert k > 5  # it did go through the copy, the renames and the link switch


def test_a_kill_before_keep_best_leaves_the_best_to_resume(tmp_path):
    run = tmp_path / "run"
    _step(run, 1, 5.0)
    checkpoint.keep_copy(run, 1, "best-fid", {"step": 1, "fid": 5.0})
    _step(run, 2, 3.0)
    _step(run, 3, 4.0)  # an improvement over step 1 at its time, but not the best
    model = torch.nn.Linear(2, 2)  # step 4: no improvement recorded; keep_last prunes step 1
    checkpoint.save(
        run,
        4,
        models={"G": model},
        optimizers={},
        state_tensors={"x": torch.zeros(1)},
        meta={"config": {}},
        keep_last=3,
    )
    assert checkpoint.read_best(run, "best-fid")["step"] == 1
    assert checkpoint.recover_best(run, "best-fid", "fid") == {"step": 2, "fid": 3.0}
    assert checkpoint.load(run / "checkpoints" / "best-fid").step == 2
    # the step folders rotate on; the best copy stays whole (hard links, not the step folder)
    for step in (5, 6, 7):
        checkpoint.save(
            run,
            step,
            models={"G": model},
            optimizers={},
            state_tensors={"x": torch.zeros(1)},
            meta={"config": {}},
            keep_last=3,
        )
    assert not (run / "checkpoints" / "step-00000002").exists()
    assert checkpoint.load(run / "checkpoints" / "best-fid").step == 2


def test_optimizer_settings_given_on_resume_take_effect_and_are_logged(tmp_path, digits_shards, capsys):
    run = tmp_path / "run"
    common = [*FAST, f"data.shards={digits_shards}", "--out", run]
    code, _, err = run_main(capsys, "train", *common, "train.steps=2")
    assert code == 0, err[-2000:]
    code, _, err = run_main(
        capsys, "train", *common, "train.steps=4", "--resume", "auto", "train.lr_g=1e-5", "train.beta2=0.99"
    )
    assert code == 0, err[-2000:]
    assert "applied: G.lr 0.0002 -> 1e-05, G.betas [0.5, 0.999] -> [0.5, 0.99], D.betas" in err, err[-2000:]
    resume = next(m for m in read_metrics(run) if m.get("event") == "resume")
    assert resume["optimizer"]["G.lr"] == [0.0002, 1e-05] and "D.lr" not in resume["optimizer"]
    groups = checkpoint.load(run / "checkpoints" / "step-00000004").optimizer_meta
    assert groups["G"]["param_groups"][0]["lr"] == pytest.approx(1e-5)  # what Adam used for steps 3 and 4
    assert groups["G"]["param_groups"][0]["betas"] == [0.5, 0.99]
    assert groups["D"]["param_groups"][0]["lr"] == pytest.approx(2e-4)
    # with a learning-rate decay, the base rate is what a resume compares (here: no change, so no note)
    code, _, err = run_main(
        capsys,
        "train",
        *common,
        "train.steps=8",
        "--resume",
        "auto",
        "train.lr_g=1e-5",
        "train.beta2=0.99",
        "train.lr_decay=linear",
        "train.lr_decay_start=0.5",
    )
    assert code == 0 and "applied:" not in err, err[-2000:]
    groups = checkpoint.load(run / "checkpoints" / "step-00000008").optimizer_meta["G"]["param_groups"][0]
    assert groups["initial_lr"] == pytest.approx(1e-5) and groups["lr"] < 1e-5
