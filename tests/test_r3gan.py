"""R3GAN's networks (distgan/models/r3gan.py) against modules of R3GAN's structure written from the
architecture's description (tests/r3gan_like.py, float64, odd widths and cardinalities), the two
grouped-conv forms against each other to second order, the templates' parameter counts against
R3GAN's own, and `distgan import --from r3gan` (distgan/importer.py, distgan/safepickle.py): the same
images as the pickled G, the optimizer states mapped, nothing in a hostile pickle run."""

import os
import pickle

import numpy as np
import pytest
import r3gan_like
import torch
import torch.nn.functional as F
from conftest import cli

import distgan
from distgan import checkpoint, config, importer, safepickle, variants
from distgan.errors import UserError
from distgan.models import r3gan

ODD = {"z_dim": 5, "widths": (6, 9, 3), "cards": (3, 3, 1), "blocks": (1, 2, 1), "expansion": 3}


def _ours(fake_G, fake_D, c_dim=0):
    """distgan's r3gan G and D of the fake networks' shape, with their weights (through the importer's
    name mapping), in float64."""
    widths, cards, blocks = list(ODD["widths"]), list(ODD["cards"]), list(ODD["blocks"])
    G = r3gan.Generator(ODD["z_dim"], 3, 16, widths, cards, blocks, ODD["expansion"], num_classes=c_dim)
    D = r3gan.Discriminator(3, 16, widths, cards, blocks, ODD["expansion"], num_classes=c_dim)
    g_state = {importer._g_name(k[6:]): v for k, v in fake_G.state_dict().items()}
    d_state = {importer._d_name(k[6:], blocks[::-1]): v for k, v in fake_D.state_dict().items()}
    G.load_state_dict({k: v for k, v in g_state.items() if k is not None})
    D.load_state_dict({k: v for k, v in d_state.items() if k is not None})
    return G.double(), D.double()


@pytest.mark.parametrize("c_dim", [0, 4])
def test_g_and_d_equal_r3gan_structured_modules_in_float64(c_dim):
    fake_G, fake_D = r3gan_like.networks(
        ODD["z_dim"], ODD["widths"], ODD["cards"], ODD["blocks"], ODD["expansion"], c_dim
    )
    fake_G, fake_D = fake_G.double(), fake_D.double()
    for stage in [*fake_G.Model.MainLayers, *fake_D.Model.MainLayers]:
        stage.DataType = torch.float64
    G, D = _ours(fake_G, fake_D, c_dim)
    torch.manual_seed(1)
    z = torch.randn(7, ODD["z_dim"], dtype=torch.float64)
    y = torch.randint(0, max(c_dim, 1), (7,))
    onehot = F.one_hot(y, c_dim).double() if c_dim else None
    ours = G(z, y if c_dim else None)
    theirs = fake_G(z, onehot)
    assert ours.shape == (7, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    x = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(D(x, y if c_dim else None), fake_D(x, onehot), rtol=1e-10, atol=1e-10)


def test_a_fresh_block_is_the_identity_and_inits_follow_the_variance_scaling_rule():
    torch.manual_seed(0)
    block = r3gan.Block(16, 4, 2, total_blocks=8, grouped_conv="native")
    x = torch.randn(3, 16, 8, 8)
    assert torch.equal(block(x), x)  # the last 1x1 conv starts at zero
    assert not bool(block.conv3.weight.any())
    big = r3gan.Block(256, 8, 2, total_blocks=16, grouped_conv="native")
    # std of the first 1x1 conv: gain sqrt(2 / 1.04) * 16^(-1/4) over sqrt(fan_in = 256)
    want = (2 / 1.04) ** 0.5 * 16**-0.25 / 256**0.5
    assert big.conv1.weight.std().item() == pytest.approx(want, rel=0.02)
    fan_in = 512 // 8 * 9  # grouped: a group's inputs x the kernel
    assert big.conv2.weight.std().item() == pytest.approx((2 / 1.04) ** 0.5 * 0.5 / fan_in**0.5, rel=0.02)


@pytest.mark.parametrize("groups,side", [(4, 8), (3, 5), (1, 6)])
def test_grouped_conv_forms_agree_in_values_and_first_and_second_derivatives(groups, side):
    torch.manual_seed(0)
    native = r3gan.GroupedConv(12, groups, 3, 1.0, "native").double()
    dense = r3gan.GroupedConv(12, groups, 3, 1.0, "block_diagonal").double()
    dense.load_state_dict(native.state_dict())
    x = torch.randn(2, 12, side, side, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for conv in (native, dense):
        y = conv(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # first order in x
        penalty = gx.square().sum()  # R1-like: its weight gradient is a second derivative
        (gw,) = torch.autograd.grad(penalty, conv.weight)
        outs.append(y)
        grads.append((gx, gw))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10)
    # and the weight is dense-zero outside the diagonal blocks
    w = r3gan.block_diagonal(native.weight, groups)
    per = 12 // groups
    for g in range(groups):
        w[g * per : (g + 1) * per, g * per : (g + 1) * per] = 0
    assert not bool(w.any())


# R3GAN's parameter counts (its Networks.py instantiated with train.py's presets; CIFAR-10 and FFHQ-256
# unconditional are the paper's table's 20.73 / 20.68 M and 23.058 / 23.010 M)
COUNTS = {
    ("r3gan-cifar", "uncond"): (20_732_160, 20_683_776),
    ("r3gan-cifar", "cond"): (20_781_952, 21_280_512),
    ("r3gan-ffhq-64", "uncond"): (22_429_824, 22_381_440),
    ("r3gan-ffhq-256", "uncond"): (23_057_952, 23_009_568),
    ("r3gan-imagenet-32", "cond"): (82_914_304, 86_548_992),
    ("r3gan-imagenet-64", "cond"): (103_570_432, 107_205_120),
}


@pytest.mark.parametrize("preset,kind", list(COUNTS))
def test_templates_have_r3gans_parameter_counts(capsys, preset, kind):
    extra = ["model.num_classes=0", "variant.name=gan"] if kind == "uncond" and preset == "r3gan-cifar" else []
    res = cli(capsys, "config", "--preset", preset, "--params", *extra)
    assert res.returncode == 0, res.stderr
    g, d = COUNTS[preset, kind]
    assert res.stdout.splitlines() == [f"G: {g:,} parameters", f"D: {d:,} parameters"]


def test_config_errors_name_the_stage_count():
    with pytest.raises(UserError, match=r"one entry per stage from 4x4 to 32x32 \(4\); got 3"):
        config.load_config("digits-r3gan-net", None, ["model.r3gan.widths=[8,8,8]"])
    with pytest.raises(UserError, match="cannot be split into cardinality 5"):
        config.load_config("digits-r3gan-net", None, ["model.r3gan.cardinalities=[4,4,2,5]"])
    with pytest.raises(UserError, match="power of two"):
        config.load_config("digits-r3gan-net", None, ["data.resolution=24"])


def _snapshot(tmp_path, c_dim=0, bf16=(), with_optimizers=True, seed=0):
    fake_G, fake_D = r3gan_like.networks(
        ODD["z_dim"], ODD["widths"], ODD["cards"], ODD["blocks"], ODD["expansion"], c_dim, bf16, seed=seed
    )
    path = tmp_path / "network-snapshot-000123.pkl"
    r3gan_like.snapshot(path, fake_G, fake_D, with_optimizers=with_optimizers)
    return path


@pytest.mark.parametrize("c_dim", [0, 4])
def test_import_gives_r3gans_images_and_optimizer_states(tmp_path, capsys, c_dim):
    path = _snapshot(tmp_path, c_dim)
    res = cli(capsys, "import", "--from", "r3gan", path, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    folder = tmp_path / "run" / "checkpoints" / "step-00000000"
    assert (folder / "model.safetensors").is_file()
    _, meta = checkpoint.read_meta(folder)
    assert meta["imported"]["cur_nimg"] == 123_000 and meta["imported"]["from"] == "r3gan"
    assert meta["config"]["model"]["r3gan"]["widths"] == list(ODD["widths"])
    theirs = r3gan_like.load_as_r3gan(path)
    torch.manual_seed(3)
    z = torch.randn(6, ODD["z_dim"])
    y = torch.randint(0, max(c_dim, 1), (6,))
    onehot = F.one_hot(y, c_dim).float() if c_dim else None
    for ema, name in ((True, "G_ema"), (False, "G")):
        G = distgan.load_generator(tmp_path / "run", ema=ema)
        with torch.no_grad():
            torch.testing.assert_close(G(z, y if c_dim else None), theirs[name](z, onehot), rtol=1e-5, atol=1e-5)
    # D, and every Adam moment, land on the parameter they belong to
    ckpt = checkpoint.load(folder)
    cfg = config.from_dict(ckpt.meta["config"])
    variant = variants.get(cfg.variant.name)(cfg)
    D = variant.models["D"]
    checkpoint.load_model(D, ckpt.model_state("D"), "D")
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(D(x, y if c_dim else None), theirs["D"](x, onehot), rtol=1e-5, atol=1e-5)
    opt = ckpt.optimizer_state("D")
    their_opt = theirs["D_opt_state"]["state"]
    their_params = list(theirs["D"].parameters())
    ours = dict(D.named_parameters())
    by_name = {n: i for i, n in enumerate(ours)}
    for j, (tname, tparam) in enumerate(theirs["D"].named_parameters()):
        target = importer._d_name(tname[6:], list(ODD["blocks"])[::-1])
        mine = opt["state"][by_name[target]]
        assert tparam.shape == their_params[j].shape
        torch.testing.assert_close(mine["exp_avg_sq"], their_opt[j]["exp_avg_sq"])
        torch.testing.assert_close(mine["exp_avg"], their_opt[j]["exp_avg"])


def test_imported_bf16_stages_match_r3gan_within_bf16_rounding(tmp_path, capsys):
    """R3GAN runs its high-resolution stages in bf16 always; distgan runs them in bf16 only under mixed
    precision (the imported model samples in fp32), so the images agree to bf16's rounding."""
    path = _snapshot(tmp_path, bf16=(1, 2))
    assert cli(capsys, "import", "--from", "r3gan", path, "--out", tmp_path / "run").returncode == 0
    _, meta = checkpoint.read_meta(tmp_path / "run")
    assert meta["config"]["model"]["r3gan"]["fp32_stages"] == 1
    theirs = r3gan_like.load_as_r3gan(path)
    z = torch.randn(6, ODD["z_dim"])
    with torch.no_grad():
        ours, ref = distgan.load_generator(tmp_path / "run")(z), theirs["G_ema"](z, None).float()
    assert ref.dtype == torch.float32 and (ours - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_imported_run_samples_and_fine_tunes(tmp_path, capsys):
    path = _snapshot(tmp_path, with_optimizers=False)
    res = cli(capsys, "import", "--from", "r3gan", path, "--out", tmp_path / "run", "train.log_every=1")
    assert res.returncode == 0 and "Adam starts fresh" in res.stderr
    res = cli(capsys, "sample", "--ckpt", tmp_path / "run", "--out", tmp_path / "s.png", "--n", "4")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "s.png").stat().st_size > 0
    step0 = tmp_path / "run" / "checkpoints" / "step-00000000"
    rng = np.random.default_rng(0)  # a user's own shards: 16 RGB images, 16 x 16
    np.savez(tmp_path / "own.npz", x=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    assert cli(capsys, "shards", "--npz", tmp_path / "own.npz", "--out", tmp_path / "own").returncode == 0
    res = cli(
        capsys,
        "train",
        "--resume",
        step0,
        "--out",
        tmp_path / "tuned",
        f"data.shards={tmp_path / 'own'}",
        "train.steps=2",
        "tracking.wandb.mode=disabled",
        "data.batch_size=4",
        "data.num_workers=0",
    )
    assert res.returncode == 0, res.stderr
    assert "imported from r3gan" in res.stderr
    before = checkpoint.load(step0).model_state("G")
    after = checkpoint.load(tmp_path / "tuned").model_state("G")
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"G": _RunsCode(marker), "D": 1, "G_ema": 2}))
    res = cli(capsys, "import", "--from", "r3gan", bad, "--out", tmp_path / "run")
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "system, which is not on the allow-list" in err[0] and "nothing was run" in err[0]
    assert not marker.exists() and not (tmp_path / "run").exists()
    # the same file does run code under a plain pickle.load: the test's pickle is a real threat
    pickle.loads(bad.read_bytes())
    assert marker.exists()


def test_an_allowed_class_name_cannot_be_called(tmp_path):
    """R3GAN's class names become inert records: a REDUCE that calls one (constructing an object with
    arguments, as a crafted pickle could) is refused; torch.save's zip files are refused as such."""
    import pickletools  # noqa: F401  (the opcodes below are protocol 2: GLOBAL, MARK, TUPLE, REDUCE)

    crafted = b"\x80\x02ctraining.networks\nGenerator\n(X\x02\x00\x00\x00hitR."
    f = tmp_path / "crafted.pkl"
    f.write_bytes(crafted)
    with pytest.raises(safepickle.UnsafePickle, match="calls class training.networks.Generator"):
        safepickle.load(str(f), importer.R3GAN_RECORDS)
    z = tmp_path / "zip.pkl"
    torch.save({"a": torch.ones(1)}, z)
    with pytest.raises(safepickle.UnsafePickle, match="torch.save's format"):
        safepickle.load(str(z), importer.R3GAN_RECORDS)
