"""A checkpoint or run directory from someone else never runs a command, fetches, reads a file or
chooses a W&B destination on the user's machine (distgan/trust.py, docs/security.md)."""

import json
import shutil

import pytest
from conftest import FAST, assert_resumes_exactly, cli, read_metrics, run_cli
from wandb_log import run_record

from distgan import trust
from distgan.data import shards

QUIET = [o for o in FAST if not o.startswith("tracking")]


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory, digits_shards):
    """A run whose stored config streams its shards through `pipe:touch MARKER; cat SHARD` and logs
    to someone else's W&B project. Made here with the command, so the marker is deleted after."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "PWNED"
    shard = sorted(digits_shards.glob("*.tar"))[0]
    run = root / "run"
    r = run_cli(
        "train",
        *QUIET,
        "--out",
        run,
        "train.steps=2",
        "train.ckpt_every=1",
        f"data.shards=pipe:touch {marker}; cat {shard}",
        "tracking.wandb.mode=disabled",
        "tracking.wandb.project=authors-project",
        "tracking.wandb.entity=author",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists()  # the author's own command did run it
    marker.unlink()
    return run, marker


def refused(r, key="data.shards"):
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, r.stderr
    assert f"stores {key}='pipe:touch " in lines[0] and trust.TRUST_FLAG in lines[0]
    assert f"'{key}=pipe:touch " in lines[0]  # how to pass it explicitly, quoted for a shell


def test_resume_eval_and_sample_never_run_a_stored_pipe_command(tmp_path, evil_run, digits_shards, capsys):
    run, marker = evil_run
    ckpt = run / "checkpoints" / "step-00000001"
    refused(cli(capsys, "train", "--resume", ckpt, "--out", tmp_path / "victim"))
    assert not (tmp_path / "victim").exists()  # refused before writing anything
    refused(cli(capsys, "eval", "--ckpt", run, "--n", "50"))
    refused(cli(capsys, "sample", "--ckpt", run, "--out", tmp_path / "x.png", "--drs", "--drs-calibrate", "2"))
    # a run directory copied from the author (its config.yaml included) is just as untrusted
    copied = tmp_path / "copied"
    shutil.copytree(run, copied)
    assert "pipe:touch" in (copied / "config.yaml").read_text()
    refused(cli(capsys, "train", "--out", copied, "--resume", "auto", "train.steps=3"))
    # sampling needs no shards: it works, with nothing run
    r = cli(capsys, "sample", "--ckpt", run, "--n", "8", "--out", tmp_path / "s.npy")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not marker.exists()
    # the user names the data: training and eval go on, saying what was not used
    r = cli(
        capsys, "train", "--resume", ckpt, "--out", tmp_path / "victim", "train.steps=2", f"data.shards={digits_shards}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "note: the checkpoint was made with data.shards='pipe:touch" in r.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "victim") if m.get("event") == "resume"] == [1]
    r = cli(capsys, "eval", "--ckpt", run, "--n", "50", "--metrics", "digits", f"data.shards={digits_shards}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not marker.exists()


def test_trust_checkpoint_config_does_what_it_says(tmp_path, evil_run, capsys):
    run, marker = evil_run
    r = cli(
        capsys,
        "train",
        "--resume",
        run / "checkpoints" / "step-00000001",
        "--out",
        tmp_path / "trusting",
        "train.steps=2",
        trust.TRUST_FLAG,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "using the checkpoint's data.shards='pipe:touch" in r.stderr
    assert marker.exists()  # the user asked for it
    marker.unlink()


def test_stored_wandb_destination_is_never_used(tmp_path, evil_run, digits_shards):
    # (a process per run: in-process, a suite run once read the offline run file before W&B had
    # written its run record into it)
    run, _ = evil_run
    victim = tmp_path / "victim"
    r = run_cli(
        "train",
        "--resume",
        run / "checkpoints" / "step-00000001",
        "--out",
        victim,
        "train.steps=2",
        f"data.shards={digits_shards}",
        "tracking.wandb.mode=offline",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tracking.wandb.project='authors-project'; this run uses 'distgan'" in r.stderr
    assert "tracking.wandb.entity='author'; this run uses None" in r.stderr
    record = run_record(next(victim.glob("wandb/offline-run-*/run-*.wandb")))
    assert record.project == "distgan" and record.entity == ""
    # ... unless the user passes it
    mine = tmp_path / "mine"
    r = run_cli(
        "train",
        "--resume",
        run / "checkpoints" / "step-00000001",
        "--out",
        mine,
        "train.steps=2",
        f"data.shards={digits_shards}",
        "tracking.wandb.mode=offline",
        "tracking.wandb.project=my-project",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_record(next(mine.glob("wandb/offline-run-*/run-*.wandb"))).project == "my-project"


def test_resuming_your_own_run_with_the_same_command_is_unchanged(tmp_path, digits_shards, capsys):
    """No preset or config file (the form of launch/slurm.sbatch): the checkpoint's
    config is the base, and every outward value comes from the command line again."""
    common = [*FAST, f"data.shards={digits_shards}", "train.ckpt_every=1000"]
    _, r = assert_resumes_exactly(capsys, common, tmp_path, 2, 4)  # resumed at step 2, bitwise the same
    assert "note:" not in r.stderr  # nothing differs, nothing to say


def test_checkpoint_config_keeps_harmless_values_and_drops_the_rest():
    from distgan import config

    stored = config.to_dict(config.load_config("ring-gan"))
    stored["tracking"]["wandb"].update(project="theirs", entity="them", mode="offline")
    cfg, notes = trust.checkpoint_config(stored, given=set(), needed={"data.shards"}, trust=False, where="c")
    assert cfg["data"]["shards"] == "builtin:ring" and not notes  # an embedded set is kept
    assert cfg["tracking"]["wandb"] == {"mode": "offline", "project": "distgan", "entity": None, "name": None}
    assert cfg["model"] == stored["model"] and cfg["train"] == stored["train"]
    stored["data"]["shards"] = "https://example.invalid/{000..009}.tar"
    stored["variant"]["vgg_weights"] = "/home/user/vgg.pth"
    cfg, _ = trust.checkpoint_config(stored, given=set(), needed=(), trust=False, where="c")
    assert cfg["data"]["shards"] == "" and cfg["variant"]["vgg_weights"] == ""  # not needed: dropped
    with pytest.raises(Exception, match="stores data.shards='https://example.invalid"):
        trust.checkpoint_config(stored, given=set(), needed={"data.shards"}, trust=False, where="c")
    # given on the command line: no error (the override replaces it)
    trust.checkpoint_config(stored, given={"data.shards"}, needed={"data.shards"}, trust=False, where="c")
    cfg, notes = trust.checkpoint_config(stored, given=set(), needed={"data.shards"}, trust=True, where="c")
    assert cfg["data"]["shards"].startswith("https://") and len(notes) == 4


def test_sample_and_eval_take_only_data_locations_as_overrides(tmp_path, evil_run, capsys):
    run, _ = evil_run
    r = cli(capsys, "sample", "--ckpt", run, "--out", tmp_path / "x.png", "model.g.width=8")
    assert r.returncode == 2 and "takes only data.on_error, data.shards" in r.stderr


def test_a_manifest_names_only_files_of_its_own_folder(tmp_path, digits_shards, capsys):
    from distgan.data import stream
    from distgan.errors import UserError

    folder = tmp_path / "shards"
    shutil.copytree(digits_shards, folder)
    manifest = json.loads((folder / shards.MANIFEST).read_text())
    good = manifest["shards"]
    for names in (["/etc/hosts"], ["../other/shard.tar"], ["pipe:touch x"], ["a/b.tar"]):
        (folder / shards.MANIFEST).write_text(json.dumps({**manifest, "shards": names}))
        with pytest.raises(UserError, match="may only name files in its own folder"):
            stream.resolve(str(folder), progress=False)
    (folder / shards.MANIFEST).write_text(json.dumps({**manifest, "shards": good, "heldout": "/tmp"}))
    with pytest.raises(UserError, match="names '/tmp'"):
        stream.heldout_source(str(folder))
    (folder / shards.MANIFEST).write_text(json.dumps({**manifest, "shards": ["/etc/hosts"]}))
    r = cli(capsys, "train", *FAST, f"data.shards={folder}", "--out", tmp_path / "run", "train.steps=1")
    assert r.returncode == 2 and "may only name files in its own folder" in r.stderr, r.stderr[-2000:]


def test_shard_file_names_never_read_as_urls(tmp_path, digits_shards):
    """A file in the current folder named like a pipe: spec is read as a file, never run."""
    src = sorted(digits_shards.glob("*.tar"))[0]
    shutil.copy(src, tmp_path / "pipe:touch PWNED;.tar")
    r = run_cli("train", *FAST, "data.shards=.", "--out", tmp_path / "run", "train.steps=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "PWNED").exists()


def test_a_copied_wandb_run_id_that_is_not_an_id_is_replaced(tmp_path, digits_shards, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb_run_id").write_text("../../x\n")
    r = cli(
        capsys,
        "train",
        *QUIET,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "train.steps=1",
        "tracking.wandb.mode=offline",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is not a W&B run id" in r.stderr
    new = (run / "wandb_run_id").read_text()
    assert new != "../../x\n" and run_record(next(run.glob("wandb/offline-run-*/run-*.wandb"))).run_id == new


def test_a_cyclegan_checkpoint_never_runs_its_stored_domain_commands(tmp_path, capsys):
    """The unpaired variant streams data.shards_a and data.shards_b: a stored pipe: in either is refused
    on resume as data.shards is for a GAN run, and runs nothing."""
    root = tmp_path / "evil"
    for name in ("digits-thin", "digits-thick"):
        shards.write_builtin(name, root / name, maxcount=200, progress=False)
    marker = root / "PWNED"
    first = {n: sorted((root / n).glob("*.tar"))[0] for n in ("digits-thin", "digits-thick")}
    tiny = [
        "data.batch_size=2",
        "model.g.width=8",
        "model.g.blocks=1",
        "model.d.width=8",
        "variant.pool_size=3",
        "train.eval_every=0",
        "tracking.wandb.mode=disabled",
    ]
    for key, domain in (("data.shards_a", "digits-thin"), ("data.shards_b", "digits-thick")):
        other = "data.shards_b" if key == "data.shards_a" else "data.shards_a"
        other_domain = "digits-thick" if domain == "digits-thin" else "digits-thin"
        run = root / f"run-{key}"
        r = cli(
            capsys,
            "train",
            "--preset",
            "cyclegan-digits-thin2thick",
            *tiny,
            "--out",
            run,
            "train.steps=1",
            f"{key}=pipe:touch {marker}; cat {first[domain]}",
            f"{other}={root / other_domain}",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert marker.exists()  # the author's own command did run
        marker.unlink()
        ckpt = run / "checkpoints" / "step-00000001"
        # the other domain's folder named again (a path is never taken from a checkpoint either)
        r = cli(
            capsys,
            "train",
            "--resume",
            ckpt,
            "--out",
            tmp_path / "victim",
            "train.steps=2",
            f"{other}={root / other_domain}",
        )
        refused(r, key)
        assert not marker.exists() and not (tmp_path / "victim").exists()


@pytest.mark.parametrize("value", ["pipe:touch /tmp/distgan-never", "/etc/hostname", "https://example.invalid/x"])
def test_every_string_key_of_a_stored_config_is_dropped_or_refused(value):
    """From the schema, not a list: every config key that holds a string can be made to name a path, URL,
    command or destination. Stored in a checkpoint with such a value, each one is either replaced by
    trust.checkpoint_config (what every command resumes through) or refused by the config's validation
    (a fixed vocabulary: a loss, an arch, a crop mode), so that no such value reaches the run."""
    import copy

    from distgan import config
    from distgan.errors import UserError

    base = config.to_dict(config.load_config("digits-dcgan"))
    keys = [key for key, kind, _, _ in config.reference() if "str" in kind]
    assert {"data.shards", "data.shards_a", "data.shards_b", "variant.vgg_weights", "model.g.arch"} <= set(keys)
    passed = []
    for key in keys:
        stored = copy.deepcopy(base)
        trust._set(stored, key, value)
        cfg, _ = trust.checkpoint_config(stored, given=set(), needed=set(), trust=False, where="c")
        if trust._get(cfg, key) != value:
            continue  # replaced: the checkpoint's value is never used
        try:
            config.load_config(base=cfg)
        except UserError:
            continue  # refused: a run with it never starts
        passed.append(key)
    assert passed == [], f"stored {value!r} reaches a run through: {passed}"
