"""The BigGAN-style residual models (distgan/models/resnet.py), the losses and regularisers that came
with them (rpgan, R2, LeCam, orthogonal regularisation), and their presets through the trainer."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, assert_resumed, read_metrics, run_cli
from test_ddp import launch, read
from test_train import assert_bitwise_equal

from distgan import config, losses, models, variants
from distgan.errors import UserError
from distgan.models import resnet
from distgan.variants.gan import Judged

# the resnet presets at a width a CPU runs in seconds (2 x BigGAN's multipliers)
TINY = ["model.g.width=2", "model.d.width=2", "model.g.embed_dim=8", "data.batch_size=8"]
# Spectral norm on every layer through the Triton interpreter makes a step take seconds: the
# training runs here use the PyTorch fallback (the kernels are checked against it in test_kernels).
FALLBACK = {"TRITON_INTERPRET": "0"}


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_shapes_at_every_resolution(resolution):
    torch.manual_seed(0)
    blocks = len(resnet.LAYOUTS[resolution][0])
    z_dim = 4 * (blocks + 1)
    G = resnet.Generator(z_dim, 3, resolution, width=2, num_classes=3, embed_dim=4, hierarchical=True, attention=16)
    D = resnet.Discriminator(3, resolution, width=2, num_classes=3, attention=16)
    assert len(G.attn) == 1 and len(D.attn) == 1
    z, y = torch.randn(2, z_dim), torch.tensor([0, 2])
    x = G(z, y)
    assert x.shape == (2, 3, resolution, resolution) and x.abs().max() <= 1
    assert D(x, y).shape == (2,)
    # G's channel plan: the 4x4 map, then each block, are width x BigGAN's multipliers
    assert G.c0 == 2 * resnet.G_START[resolution]
    assert [b.conv2.out_channels for b in G.blocks] == [2 * m for m in resnet.LAYOUTS[resolution][0]]
    assert D.features == 2 * resnet.LAYOUTS[resolution][1][-1]


def test_bad_resolution_and_hierarchical_split_are_refused():
    with pytest.raises(UserError, match="data.resolution"):
        resnet.Generator(64, 1, 16)
    with pytest.raises(UserError, match="not a multiple of 4"):
        resnet.Generator(65, 1, 32, hierarchical=True)  # 3 blocks + 1: chunks of z_dim / 4
    with pytest.raises(UserError, match="model.g.attention"):
        config.load_config("digits-dcgan", None, ["model.g.attention=8"])


def pooled(D, x):
    """The resnet D's pooled features h (what its projection term multiplies)."""
    h = x
    for block in D.blocks:
        h = block(h)
    return F.relu(h).sum(dim=(2, 3))


def test_labels_change_g_and_the_projection_term_is_the_inner_product():
    torch.manual_seed(0)
    G = resnet.Generator(16, 1, 32, width=2, num_classes=10, embed_dim=4).eval()
    D = resnet.Discriminator(1, 32, width=2, num_classes=10)
    z = torch.randn(3, 16)
    with torch.no_grad():
        G.blocks[0].bn1.gain.weight.normal_()  # (conditional gains start orthogonal-random already)
        a, b = G(z, torch.tensor([1, 1, 1])), G(z, torch.tensor([7, 7, 7]))
    assert not torch.allclose(a, b)
    x = torch.randn(3, 1, 32, 32)
    y1, y2 = torch.tensor([0, 4, 9]), torch.tensor([3, 4, 1])
    h = pooled(D, x)
    want = ((D.embed.weight[y1] - D.embed.weight[y2]) * h).sum(1)
    assert torch.allclose(D(x, y1) - D(x, y2), want, atol=1e-4)
    assert (D(x, y1) - D(x, y2))[1] == 0  # same label, same logit


def test_minibatch_discrimination_in_the_resnet_d_sees_the_batch_and_leaves_the_projection():
    torch.manual_seed(0)
    D = resnet.Discriminator(1, 32, width=2, num_classes=10, minibatch=(8, 3))
    plain = resnet.Discriminator(1, 32, width=2, num_classes=10)
    assert D.linear.in_features == plain.linear.in_features + 8
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        D.mbd.T.mul_(0.1)  # distances small enough that exp(-L1) is not 0 for every pair
        out = D(x, y)
        x2 = x.clone()
        x2[3] = x2[0]  # sample 3 becomes a duplicate of sample 0: samples 0 and 1 see a different batch
        out2 = D(x2, y)
    assert out.shape == (4,)
    assert not torch.allclose(out[1], out2[1])  # sample 1 itself is unchanged, its batch is not
    # the projection term is <embed(y), h> still: label changes move the logit by exactly that
    y2 = torch.tensor([5, 1, 2, 3])
    with torch.no_grad():
        h = pooled(D, x)
        delta = D(x, y) - D(x, y2)
    assert torch.allclose(delta[0], ((D.embed.weight[0] - D.embed.weight[5]) * h[0]).sum(), atol=1e-4)
    assert torch.equal(delta[1:], torch.zeros(3))


def test_resnet_d_with_minibatch_discrimination_builds_from_the_config_and_backpropagates():
    cfg = config.load_config(
        "digits-biggan",
        None,
        [*TINY, "model.d.minibatch_discrimination=true", "model.d.mbd_kernels=4", "model.d.mbd_kernel_dim=3"],
    )
    v = variants.get(cfg.variant.name)(cfg)
    D = v.models["D"]
    assert D.mbd is not None and D.mbd.num_kernels == 4
    D(torch.randn(8, 1, 32, 32), torch.arange(8)).sum().backward()
    assert D.mbd.T.grad is not None and D.mbd.T.grad.abs().sum() > 0


def count_layers(module):
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    normed = [m for m in layers if hasattr(m, "parametrizations") and "weight" in m.parametrizations]
    return len(layers), len(normed)


def test_spectral_norm_on_every_layer_of_g_and_d():
    cfg = config.load_config("digits-biggan", None, TINY)
    v = variants.get(cfg.variant.name)(cfg)
    for name in ("G", "D"):
        total, normed = count_layers(v.models[name])
        assert total == normed and total > 10, (name, total, normed)
    # and none without the flags
    cfg = config.load_config("digits-r3gan", None, TINY)
    v = variants.get(cfg.variant.name)(cfg)
    assert count_layers(v.models["G"])[1] == 0 and count_layers(v.models["D"])[1] == 0


def test_normalisation_free_g_starts_every_block_as_its_shortcut():
    G = resnet.Generator(16, 1, 32, width=2, normalize=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    block = G.blocks[1]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    assert torch.equal(block(x, None), block.shortcut(F.interpolate(x, scale_factor=2, mode="nearest")))


def test_orthogonal_penalty_matches_its_formula():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(5, 2))
    want = 0.0
    for w in (net[0].weight.flatten(1), net[1].weight):
        gram = w @ w.t()
        want += sum(gram[i, j] ** 2 for i in range(len(gram)) for j in range(len(gram)) if i != j)
    assert torch.allclose(resnet.orthogonal_penalty(net), want)
    models.apply_spectral_norm(net)  # under spectral norm: the raw weight, not W / sigma
    assert torch.allclose(resnet.orthogonal_penalty(net), want)


def test_rpgan_and_lecam_match_their_formulas():
    real = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    fake = torch.tensor([0.2, 0.3, -1.0], dtype=torch.float64)
    want_d = np.mean([np.log1p(np.exp(-(r - f))) for r, f in zip(real.tolist(), fake.tolist())])
    want_g = np.mean([np.log1p(np.exp(-(f - r))) for r, f in zip(real.tolist(), fake.tolist())])
    assert losses.d_loss("rpgan", real, fake).item() == pytest.approx(want_d, abs=1e-12)
    assert losses.g_loss("rpgan", fake, real).item() == pytest.approx(want_g, abs=1e-12)
    with pytest.raises(ValueError, match="real_logits"):
        losses.g_loss("rpgan", fake)
    a_r, a_f = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    want = np.mean([(r + 0.4) ** 2 for r in real.tolist()]) + np.mean([(f - 0.7) ** 2 for f in fake.tolist()])
    assert losses.lecam(real, fake, a_r, a_f).item() == pytest.approx(want, abs=1e-12)


def test_r2_is_r1_on_the_fakes_and_both_enter_d_loss():
    cfg = config.load_config("digits-r3gan", None, TINY)
    v = variants.get(cfg.variant.name)(cfg)
    D = v.models["D"]
    real, fake = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    terms = v.d_penalty(D, Judged(real, None, None), Judged(fake, None, None), None, "exact")
    for name, x in (("loss/r1", real), ("loss/r2", fake)):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(D(x).sum(), x)  # per-sample gradients: D's outputs are independent
        assert terms[name].item() == pytest.approx(0.1 / 2 * g.square().sum().item() / 4, rel=1e-5), name


class LinearD(torch.nn.Module):
    """D(x) = <w, x>: its logits are known in closed form and grad_x D = w everywhere."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, int(np.prod(shape)), dtype=torch.float32).view(1, *shape))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


class ZeroG(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def forward(self, z):
        return torch.zeros(z.size(0), *self.shape)


def test_d_step_adds_r1_r2_and_lecam_to_d_loss_with_the_papers_anchors_and_emas():
    """GAN.d_step through a real StepContext, with D(x) = <w, x> and fakes that are 0: D's loss is
    RpGAN + r1_gamma/2 |w|^2 + r2_gamma/2 |w|^2 + LeCam's w_l (E(D(x) - a_F)^2 + E(D(G(z)) - a_R)^2),
    a_R and a_F moving as a <- decay a + (1 - decay) mean(D(.)), over two steps (the second with
    non-zero anchors)."""
    import accelerate
    from accelerate.state import AcceleratorState

    from distgan import step

    cfg = config.load_config(
        "digits-r3gan",
        None,
        [*TINY, "variant.r1_gamma=0.1", "variant.r2_gamma=0.3", "variant.lecam_weight=0.5", "variant.lecam_decay=0.9"],
    )
    v = variants.get(cfg.variant.name)(cfg)
    shape = (1, 32, 32)
    v.models["D"], v.models["G"] = LinearD(shape), ZeroG(shape)
    w2 = v.models["D"].w.detach().double().square().sum().item()
    try:
        ctx = step.StepContext(accelerate.Accelerator(cpu=True), accum=1)
        a_r = a_f = 0.0
        for seed in (0, 1):
            real = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))
            stats = {k: torch.zeros(()) for k in ("loss/d", "loss/g", "d/real", "d/fake")}
            v.d_step([{"image": real, "label": None}], ctx, stats)
            r = (real * v.models["D"].w.detach()).flatten(1).sum(1).double()
            rp = torch.nn.functional.softplus(-r).mean().item()  # RpGAN with D(G(z)) = 0
            lecam = 0.5 * (((r - a_f) ** 2).mean().item() + (0 - a_r) ** 2)
            want = rp + 0.1 / 2 * w2 + 0.3 / 2 * w2 + lecam
            assert stats["loss/lecam"].item() == pytest.approx(lecam, rel=1e-5), seed
            assert stats["loss/d"].item() == pytest.approx(want, rel=1e-5), seed
            a_r, a_f = 0.9 * a_r + 0.1 * r.mean().item(), 0.9 * a_f + 0.1 * 0.0
            torch.testing.assert_close(
                v.lecam_ema.double(), torch.tensor([a_r, a_f], dtype=torch.float64), rtol=1e-5, atol=1e-6
            )
        assert a_r != 0  # the second step had an anchor to swap
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


RESUME = [
    ("digits-biggan", [*TINY]),
    ("digits-r3gan", [*TINY, "variant.lecam_weight=0.3"]),
    ("grid-r3gan", ["data.batch_size=32", "model.g.width=16", "model.d.width=16"]),
    ("stacked-digits-r3gan", ["model.g.width=8", "model.d.width=8", "data.batch_size=16"]),
]


# In `make test-all`: stacked-digits-r3gan (17 s), the same recipe as digits-r3gan on another data set,
# and grid-r3gan (40 s), whose exact resume in the approx and lazy penalty modes make test checks
# (tests/test_penalties.py), as it does the exact mode's on digits-r3gan here.
@pytest.mark.parametrize(
    "preset, extra",
    [pytest.param(p, e, marks=pytest.mark.slow) if p.startswith(("stacked", "grid")) else (p, e) for p, e in RESUME],
    ids=[p for p, _ in RESUME],
)
def test_new_presets_resume_exactly(tmp_path, preset, extra):
    common = ["--preset", preset, *FAST[3:], *extra, "train.ckpt_every=3", "train.log_every=1", "train.steps=6"]
    # (learning-rate schedules depend on train.steps: the second run resumes from the full run's step 3)
    for out, more in (("full", []), ("split", ["--resume", tmp_path / "full" / "checkpoints" / "step-00000003"])):
        r = run_cli("train", *common, "--out", tmp_path / out, *more, env=FALLBACK)
        assert r.returncode == 0, r.stderr[-3000:]
    step = "step-00000006"
    assert_bitwise_equal(tmp_path / "full" / "checkpoints" / step, tmp_path / "split" / "checkpoints" / step)
    assert_resumed(tmp_path / "split", 3)
    logged = [m for m in read_metrics(tmp_path / "full") if "loss/d" in m]
    assert all(np.isfinite(m["loss/d"]) and np.isfinite(m["loss/g"]) for m in logged)
    if "lecam_weight" in " ".join(extra):
        assert all("loss/lecam" in m for m in logged)


@pytest.mark.slow  # 8 s; `sample --class` is tested on cgan in test_variants
def test_biggan_samples_by_class(tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--preset", "digits-biggan", *FAST[3:], *TINY, "--out", run, "train.steps=2", env=FALLBACK)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("sample", "--ckpt", run, "--class", "all", "--n", "2", "--out", tmp_path / "s.npy")
    assert r.returncode == 0, r.stderr[-3000:]
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (20, 1, 32, 32) and np.isfinite(x).all()


def test_biggan_on_two_ranks_keeps_identical_models(tmp_path, digits_shards):
    run = tmp_path / "run"
    r = launch(
        "--preset",
        "digits-biggan",
        *FAST[3:],
        *TINY,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "train.steps=4",
        env=FALLBACK,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    _, meta = read(run / "checkpoints" / "step-00000004" / "state.safetensors")
    assert meta["data"]["world_size"] == 2
    assert meta["fingerprints"][0] == meta["fingerprints"][1]


def test_ema_copy_takes_the_live_batchnorm_statistics():
    """The EMA generator averages weights and copies the live G's buffers (BatchNorm running stats,
    spectral norm's u, v): its BN statistics are the live G's, not recomputed (docs/variants.md)."""
    import copy

    from distgan.step import ema_update

    torch.manual_seed(0)
    G = resnet.Generator(16, 1, 32, width=2, num_classes=3, embed_dim=4)
    models.apply_spectral_norm(G)
    ema = copy.deepcopy(G).eval()
    G(torch.randn(8, 16), torch.randint(0, 3, (8,)))  # train mode: running stats (and u, v) move
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, G, 0.9)
    for b_ema, b in zip(ema.buffers(), G.buffers()):
        assert torch.equal(b_ema, b)
    for p_ema, p0, p in zip(ema.parameters(), before, G.parameters()):
        assert torch.allclose(p_ema, 0.9 * p0 + 0.1 * p)


def test_standing_statistics_average_the_batch_statistics_of_g_itself():
    """models.standing_stats: each BN's running mean/var become the plain average of its per-batch
    mean/var over the batches drawn (BigGAN's standing stats); weights and spectral norm's vectors
    stay; G ends in eval mode with its momentum back."""
    torch.manual_seed(0)
    G = resnet.Generator(16, 1, 32, width=2, num_classes=3, embed_dim=4)
    models.apply_spectral_norm(G)
    G(torch.randn(8, 16), torch.randint(0, 3, (8,)))  # train mode: the stats move off their defaults
    G.eval()
    bn = next(m for m in G.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    bn.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach().double()))
    before = {k: v.clone() for k, v in G.state_dict().items() if "running" not in k and "num_batches" not in k}
    gen = torch.Generator().manual_seed(1)
    draw = lambda: G(torch.randn(6, 16, generator=gen), torch.randint(0, 3, (6,), generator=gen))  # noqa: E731
    assert models.standing_stats(G, draw, 3) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    assert len(seen) == 3
    mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen]).mean(0)
    var = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen]).mean(0)  # unbiased, as BN keeps it
    assert torch.allclose(bn.running_mean.double(), mean, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-5)
    assert not G.training and bn.momentum == 0.1
    after = G.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # weights, SN's u and sigma untouched
    # eval-mode output now uses the recomputed statistics, deterministically
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 0])
    out = G(z, y)
    gen.manual_seed(1)
    models.standing_stats(G, draw, 3)
    assert torch.equal(G(z, y), out)
    assert models.standing_stats(resnet.Generator(16, 1, 32, width=2, normalize=False), draw, 3) == 0
    with pytest.raises(UserError, match="at least 1 batch"):
        models.standing_stats(G, draw, 0)
