import re

import pytest
from conftest import run_cli

from distgan import config
from distgan.errors import UserError


def test_default_preset_is_digits_dcgan():
    cfg = config.load_config()
    assert cfg.data.shards == "builtin:digits"
    assert cfg.model.g.arch == "dcgan" and cfg.model.d.arch == "dcgan"
    assert cfg.data.resolution in (16, 32)


def test_presets_include_required():
    assert {"digits-dcgan", "digits-mlp"} <= set(config.list_presets())
    mlp = config.load_config("digits-mlp")
    assert mlp.model.g.arch == "mlp" and mlp.variant.loss == "ns"


@pytest.mark.parametrize("preset", config.list_presets())
def test_every_preset_loads_and_builds_its_models(preset):
    """Each preset validates and its variant builds (the model shapes fit the data)."""
    from distgan import variants

    cfg = config.load_config(preset)
    if not cfg.data.shards or "resnet" in (cfg.model.g.arch, cfg.model.d.arch):
        # cluster templates (biggan-128 ...) and the residual presets: the same layout at a width a CPU
        # builds in seconds (their spectral norm's first power iterations run in the Triton interpreter)
        small = ["model.g.width=2", "model.d.width=2"]
        if cfg.model.g.arch == "vit":  # GAT's S-XL at a custom size, the preset's patch and levels kept
            small += ["model.vit.size=custom", "model.vit.width=16", "model.vit.depth=4", "model.vit.heads=2"]
        cfg = config.load_config(preset, None, small)
    variant = variants.get(cfg.variant.name)(cfg)
    assert variant.models and all(sum(p.numel() for p in m.parameters()) > 0 for m in variant.models.values())


def test_dotted_overrides_are_typed():
    cfg = config.load_config(None, None, ["train.steps=200", "data.batch_size=8", "train.lr_g=1e-3"])
    assert cfg.train.steps == 200 and cfg.data.batch_size == 8 and cfg.train.lr_g == pytest.approx(1e-3)


def test_yaml_file_and_override_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\n  seed: 3\n")
    cfg = config.load_config(None, str(f), ["train.seed=5"])
    assert cfg.train.steps == 7 and cfg.train.seed == 5


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"preset": "nope"}, "available presets: biggan-128, cyclegan-digits-thin2thick, digits-biggan"),
        ({"overrides": ["train.stepz=3"]}, "unknown config key 'train.stepz'"),
        ({"overrides": ["train.stepz=3"]}, "valid keys in 'train': steps, seed"),
        ({"overrides": ["bogus.x=3"]}, "unknown config key 'bogus"),
        ({"overrides": ["tracking.wandb=disabled"]}, "'tracking.wandb' is a section, not a value; set one of its keys"),
        ({"overrides": ["tracking.wandb=disabled"]}, "(tracking.wandb.KEY=VALUE): mode, project"),
        ({"overrides": ["data.foo=3"]}, "unknown config key 'data.foo'"),
        ({"overrides": ["train.steps=abc"]}, "bad value for config key 'train.steps'"),
        ({"overrides": ["train.mixed_precision=fp8"]}, "must be one of auto, no, bf16, fp16"),
        ({"overrides": ["data.on_error=ignore"]}, "must be one of raise, skip"),
        ({"overrides": ["model.d.arch=resnet9000"]}, "must be one of dcgan, mlp"),
        ({"overrides": ["data.resolution=12"]}, "power of two"),
        ({"overrides": ["train.steps=0"]}, "'train.steps' must be >= 1"),
        ({"overrides": ["train.steps"]}, "not of the form key=value"),
        ({"overrides": ["variant.r1_gamma=-1"]}, "'variant.r1_gamma' must be >= 0"),
        ({"overrides": ["train.lr_decay=cosine"]}, "must be one of none, linear"),
        ({"overrides": ["train.lr_decay_start=1.0"]}, "'train.lr_decay_start' must be in [0, 1)"),
        ({"preset": "edges2photos-pix2pix", "overrides": ["variant.r1_gamma=1"]}, "not used by variant 'pix2pix'"),
        ({"config_file": "/nonexistent.yaml"}, "does not exist"),
    ],
)
def test_config_errors_are_clear(kwargs, needle):
    with pytest.raises(UserError) as err:
        config.load_config(**kwargs)
    assert needle in str(err.value)


def test_checkpoint_config_round_trip():
    cfg = config.load_config("digits-mlp", None, ["train.steps=11"])
    again = config.from_dict(config.to_dict(cfg))
    assert again == cfg


def test_cli_config_error_exit_code_and_no_traceback(tmp_path):
    r = run_cli("train", "--out", tmp_path / "run", "train.bogus=1")
    assert r.returncode == 2
    assert "unknown config key 'train.bogus'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
    r = run_cli("train", "--preset", "nope", "--out", tmp_path / "run")
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_a_bare_no_is_the_string_no_not_yaml_false():
    """`train.mixed_precision=no` (as the docs write it) and `mixed_precision: no` in a file: YAML reads
    both as the boolean false; the choice 'no' is meant."""
    from distgan import config

    assert config.load_config(overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_config_reference_in_docs_is_the_generated_one():
    """docs/config.md is `distgan config --doc`: a key added, removed or re-documented in
    distgan/config.py without regenerating it fails here (regenerate: distgan config --doc > docs/config.md)."""
    import dataclasses
    from pathlib import Path

    from distgan import config

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            value = getattr(cls(), f.name)
            yield from keys(type(value), f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    rows = config.reference()
    assert [r[0] for r in rows] == list(keys(config.Config))
    assert all(meaning for _, _, _, meaning in rows), [r[0] for r in rows if not r[3]]  # every key explained
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert doc == config.reference_markdown()
    assert '| `train.mixed_precision` | str | `"auto"` |' in doc and "One of: auto, no, bf16, fp16." in doc


def test_every_flag_is_in_docs_usage():
    """docs/usage.md ends with `distgan config --flags`, every subcommand's flags from the parser: a flag
    added, removed or re-documented in cli.py without regenerating it fails here."""
    from pathlib import Path

    from distgan import cli

    doc = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    generated = cli.flags_markdown()
    assert cli.FLAGS_HEADING in doc and doc[doc.index(cli.FLAGS_HEADING) :] == generated
    for flag in ("`--trust-checkpoint-config`", "`--drs-calibrate` STEPS", "`--on-error`", "`--flags`"):
        assert flag in generated, flag


def test_config_rules_live_beside_their_fields():
    """A key's choices and bounds are its field's metadata: validate checks them, the reference says them."""
    from distgan import config
    from distgan.errors import UserError

    meta = {k: m for k, m, _ in config._bounded(config.Config())}
    assert meta["variant.scale"]["choices"] == (2, 4) and meta["train.steps"]["min"] == 1
    assert meta["train.ema_beta"]["range"] == (0.0, 1.0, False)
    assert {"data.augment", "data.augment_p", "data.image_key", "data.label_key", "model.d.maxout"} <= {
        k for k, m in meta.items() if "check" in m
    }
    for override, said in (
        ("variant.scale=3", "'variant.scale' must be one of 2, 4; got '3'"),
        ("train.ema_beta=1.0", "'train.ema_beta' must be in [0, 1), got 1.0"),
        ("data.augment_target=0", "'data.augment_target' must be in (0, 1), got 0"),
        ("train.keep_best=best", "'train.keep_best' must be one of '', fid; got 'best'"),
        ("model.d.maxout=1", "'model.d.maxout' must be 0 (off) or >= 2 pieces, got 1"),
        ("data.label_key=json:", "'data.label_key' must be '' (cls, else label), cls, label or json:FIELD"),
    ):
        with pytest.raises(UserError, match=re.escape(said)):
            config.load_config(overrides=[override])


def test_distgan_config_prints_yaml_that_loads_back(tmp_path):
    from distgan import config

    r = run_cli("config", "--preset", "digits-sngan", "train.steps=10", "train.mixed_precision=no")
    assert r.returncode == 0, r.stderr
    (tmp_path / "mine.yaml").write_text(r.stdout)
    mine = config.load_config(config_file=str(tmp_path / "mine.yaml"))
    assert mine == config.load_config("digits-sngan", overrides=["train.steps=10", "train.mixed_precision=no"])
    assert mine.train.steps == 10 and mine.variant.name == "sngan" and mine.train.mixed_precision == "no"
    r = run_cli("config", "--preset", "nope")
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr
