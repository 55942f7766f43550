"""R3GAN's networks (distgan/models/r3gan.py) against modules of R3GAN's structure written from the
architecture's description (tests/r3gan_like.py, float64, odd widths and cardinalities), the two
grouped-conv forms against each other to second order, the templates' parameter counts against
R3GAN's own, and `distgan import --from r3gan` (distgan/importer.py, distgan/safepickle.py): the same
images as the pickled G, the optimizer states mapped, nothing in a hostile pickle run."""

import hashlib
import math
import os
import pickle
import re

import numpy as np
import pytest
import r3gan_like
import torch
import torch.nn.functional as F
from conftest import assert_resumed, cli, read_metrics
from test_train import assert_bitwise_equal

import distgan
from distgan import checkpoint, config, importer, safepickle, step, variants
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


def test_g_and_d_trace_to_one_graph_without_breaks():
    """Everything is plain PyTorch that torch.compile takes whole: conditional, an fp32 stage inside bf16
    autocast, and the block-diagonal form (Dynamo's trace only; the compiled training runs are in
    tests/test_penalties.py)."""
    G = r3gan.Generator(8, 3, 16, [8, 8, 8], [2, 2, 2], [1, 1, 1], num_classes=3, fp32_stages=1)
    D = r3gan.Discriminator(
        3, 16, [8, 8, 8], [2, 2, 2], [1, 1, 1], num_classes=3, fp32_stages=1, grouped_conv="block_diagonal"
    )
    y = torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for model, x in ((G, torch.randn(2, 8)), (D, torch.randn(2, 3, 16, 16))):
            found = torch._dynamo.explain(model)(x, y)
            assert (found.graph_count, found.graph_break_count) == (1, 0), found.break_reasons


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
    uncond = ["model.num_classes=0", "variant.name=gan", "variant.fake_labels=uniform"]
    extra = uncond if kind == "uncond" and preset == "r3gan-cifar" else []
    res = cli(capsys, "config", "--preset", preset, "--params", *extra)
    assert res.returncode == 0, res.stderr
    g, d = COUNTS[preset, kind]
    found = [
        re.fullmatch(r"(G|D): ([\d,]+) parameters, [\d.]+ GFLOP per image forward", x) for x in res.stdout.splitlines()
    ]
    assert [(m.group(1), int(m.group(2).replace(",", ""))) for m in found] == [("G", g), ("D", d)]


def test_forward_flops_count_each_layer_from_its_shapes():
    """One block at 8x8, width 12, expansion 2, 3 groups: 2 x 64 positions x (12 x 24 + 24 x 8 x 9 + 24 x 12)."""
    block = r3gan.Block(12, 3, 2, total_blocks=1, grouped_conv="native")
    want = 2 * 64 * (12 * 24 + 24 * 8 * 9 + 24 * 12)
    assert r3gan.forward_flops(block, torch.randn(5, 12, 8, 8)) == want
    up = r3gan.Resample(up=True)  # 16 taps per output pixel of the transposed conv, 4 of them non-zero
    assert r3gan.forward_flops(up, torch.randn(1, 3, 4, 4)) == 2 * 3 * 8 * 8 * 4


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
    assert meta["imported"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # hashed as it was read
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


# -- schedules (train.schedule_images): R3GAN's cosine ramps as functions of the images seen ----------

SCHEDULED = [
    "train.schedule_images=48",  # 6 steps of 8 images: the whole ramp inside the test
    "train.ema_halflife_images=16",
    "train.lr_end_factor=0.25",
    "train.beta2_start=0.9",
    "variant.gamma_end_factor=0.1",
    "data.augment=ada",  # StyleGAN2-ADA's pipeline, under the exact R1/R2 (differentiated twice)
    "data.augment_p=0.5",
]


def _scheduled_cfg():
    return config.load_config("digits-r3gan-net", None, [*SCHEDULED, "data.batch_size=8"])


def test_schedules_follow_r3gans_cosine_and_hold_after_the_horizon():
    """R3GAN's cosine_decay_with_warmup (no warm-up): base + (1 - (1 + cos(pi t / T)) / 2) (final - base)."""
    cfg = _scheduled_cfg()

    def r3gan_cosine(base, final, t, total):
        return final if t > total else base + (1 - 0.5 * (1 + math.cos(math.pi * t / total))) * (final - base)

    for step_, world in ((0, 1), (2, 1), (3, 1), (1, 2), (6, 1), (9, 1)):
        s = step.schedule(cfg, step_, world)
        t = step_ * 8 * world
        assert s.images == t
        assert s.lr_factor == pytest.approx(r3gan_cosine(1.0, 0.25, t, 48))
        assert s.beta2 == pytest.approx(r3gan_cosine(0.9, 0.99, t, 48))
        assert s.gamma_factor == pytest.approx(r3gan_cosine(1.0, 0.1, t, 48))
        assert s.augment_factor == pytest.approx(r3gan_cosine(0.0, 1.0, t, 48))
        halflife = r3gan_cosine(0.0, 16.0, t, 48)
        assert s.ema_beta == pytest.approx(0.5 ** (8 * world / max(halflife, 1e-8)))
    assert step.schedule(cfg, 3, 1).lr_factor == pytest.approx(0.625)  # half-way: the mean of the ends
    with pytest.raises(UserError, match="cannot combine with train.lr_decay"):
        config.load_config("digits-r3gan-net", None, [*SCHEDULED, "train.lr_decay=linear"])
    with pytest.raises(UserError, match="ramps the EMA over train.schedule_images, which is 0"):
        config.load_config("digits-r3gan-net", None, ["train.ema_halflife_images=1000"])


def test_scheduled_run_resumes_bitwise_and_logs_its_schedule(tmp_path, capsys, digits_shards):
    common = [
        "--preset",
        "digits-r3gan-net",
        f"data.shards={digits_shards}",
        *SCHEDULED,
        "data.batch_size=8",
        "data.num_workers=0",
        "model.r3gan.widths=[8,8,8,8]",
        "model.r3gan.cardinalities=[2,2,2,2]",
        "model.g.z_dim=8",
        "train.log_every=1",
        "train.ckpt_every=1000",
        "train.sample_every=1000",
        "tracking.wandb.mode=disabled",
    ]
    assert cli(capsys, "train", *common, "--out", tmp_path / "full", "train.steps=6").returncode == 0
    assert cli(capsys, "train", *common, "--out", tmp_path / "split", "train.steps=3").returncode == 0
    res = cli(capsys, "train", *common, "--out", tmp_path / "split", "train.steps=6", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert "optimizer settings differ" not in res.stderr  # the scheduled beta2 is not a config change
    assert_resumed(tmp_path / "split", 3)
    assert_bitwise_equal(*(tmp_path / r / "checkpoints" / "step-00000006" for r in ("full", "split")))
    a, b = (checkpoint.load(tmp_path / r / "checkpoints" / "step-00000006") for r in ("full", "split"))
    assert a.optimizer_meta == b.optimizer_meta
    logged = {m["step"]: m for m in read_metrics(tmp_path / "split") if "schedule/beta2" in m}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for s in (1, 4, 6):  # the value used in step s (0-based s - 1), as the schedule gives it
        want = step.schedule(_scheduled_cfg(), s - 1, 1)
        assert logged[s]["schedule/beta2"] == pytest.approx(want.beta2, rel=1e-6)
        assert logged[s]["lr/factor"] == pytest.approx(want.lr_factor, rel=1e-6)
        assert logged[s]["schedule/gamma_factor"] == pytest.approx(want.gamma_factor, rel=1e-6)
    betas = [g["betas"] for g in a.optimizer_meta["G"]["param_groups"]]
    assert betas[0][1] == pytest.approx(step.schedule(_scheduled_cfg(), 5, 1).beta2)  # step 6's, saved


def test_the_trainer_hands_the_schedule_to_the_penalties_and_augmentation(tmp_path, capsys, digits_shards):
    """gamma x 1 at step 0, x 0 once the 8 images of train.schedule_images=8 are seen: R1/R2 vanish from
    the second step's loss; a fixed augment p scales the same way (0 at the start, p at the end)."""
    res = cli(
        capsys,
        "train",
        "--preset",
        "digits-r3gan-net",
        f"data.shards={digits_shards}",
        "--out",
        tmp_path / "run",
        "train.schedule_images=8",
        "variant.gamma_end_factor=0",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.r3gan.widths=[8,8,8,8]",
        "model.r3gan.cardinalities=[2,2,2,2]",
        "train.steps=2",
        "train.log_every=1",
        "tracking.wandb.mode=disabled",
    )
    assert res.returncode == 0, res.stderr
    logged = {m["step"]: m for m in read_metrics(tmp_path / "run") if "loss/r1" in m}
    assert logged[1]["loss/r1"] > 0 and logged[1]["loss/r2"] > 0
    assert logged[2]["loss/r1"] == 0 and logged[2]["loss/r2"] == 0
    cfg = config.load_config("digits-r3gan-net", None, ["data.augment=translation", "data.augment_p=0.5"])
    variant = variants.get(cfg.variant.name)(cfg)
    variant.set_schedule(step.Scheduled(0, None, None, gamma_factor=0.3, augment_factor=0.5))
    assert variant.augment_strength() == pytest.approx(0.25)
