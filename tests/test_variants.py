"""Losses against their formulas, the WGAN pieces, and short training runs of every variant preset."""

import math

import pytest
import torch
from conftest import FAST, cli, read_metrics
from test_train import tensors

from distgan import config, losses
from distgan.penalties import exact_gp, exact_sq_grad
from distgan.variants import get
from distgan.variants.gan import Judged
from distgan.variants.wgan import interpolate

REAL = torch.tensor([2.0, -1.0, 0.5])
FAKE = torch.tensor([-3.0, 0.0, 1.5])


def mean(f, xs):
    return sum(f(x) for x in xs.tolist()) / len(xs)


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    "kind, d_expected, g_expected",
    [
        (
            "ns",
            mean(lambda r: -math.log(sig(r)), REAL) + mean(lambda f: -math.log(1 - sig(f)), FAKE),
            mean(lambda f: -math.log(sig(f)), FAKE),
        ),
        (
            "minimax",
            mean(lambda r: -math.log(sig(r)), REAL) + mean(lambda f: -math.log(1 - sig(f)), FAKE),
            mean(lambda f: math.log(1 - sig(f)), FAKE),
        ),
        ("hinge", mean(lambda r: max(0, 1 - r), REAL) + mean(lambda f: max(0, 1 + f), FAKE), mean(lambda f: -f, FAKE)),
        (
            "ls",
            mean(lambda r: (r - 1) ** 2 / 2, REAL) + mean(lambda f: f**2 / 2, FAKE),
            mean(lambda f: (f - 1) ** 2 / 2, FAKE),
        ),
        ("wasserstein", mean(lambda f: f, FAKE) - mean(lambda r: r, REAL), mean(lambda f: -f, FAKE)),
    ],
)
def test_losses_match_their_formulas(kind, d_expected, g_expected):
    assert losses.d_loss(kind, REAL, FAKE).item() == pytest.approx(d_expected, rel=1e-6)
    assert losses.g_loss(kind, FAKE).item() == pytest.approx(g_expected, rel=1e-6)


def test_gradient_penalty_of_a_linear_critic():
    """D(x) = <a, x>: grad_x D = a everywhere, so the penalty is (|a| - 1)^2, and d/da is
    2 (|a| - 1) a / |a| through the create_graph backward."""
    a = torch.tensor([3.0, 4.0, 0.0, 0.0], requires_grad=True)
    D = lambda x: x.flatten(1) @ a  # noqa: E731
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    gp = exact_gp(D, interpolate(real, fake))
    assert gp.item() == pytest.approx((5.0 - 1.0) ** 2)
    gp.backward()
    torch.testing.assert_close(a.grad, 2 * (5.0 - 1.0) * a.detach() / 5.0)


def test_r1_penalty_of_a_quadratic_critic():
    """D(x) = c/2 |x|^2 per D input: grad_x D = c x, so R1 = c^2 E|x|^2 over D's inputs, and
    dR1/dc = 2 c E|x|^2 through the create_graph backward. Packing 2 samples per input adds their
    squared gradients, the mean is over the B/2 packed inputs."""
    c = torch.tensor(3.0, requires_grad=True)
    real = torch.randn(6, 2)
    sq = real.square().sum(1)
    r1 = exact_sq_grad(lambda x: c / 2 * x.square().sum(1), real)
    assert r1.item() == pytest.approx(9.0 * sq.mean().item(), rel=1e-6)
    r1.backward()
    assert c.grad.item() == pytest.approx(6.0 * sq.mean().item(), rel=1e-6)
    packed = exact_sq_grad(lambda x: c / 2 * x.reshape(3, 4).square().sum(1), real)
    assert packed.item() == pytest.approx(9.0 * sq.sum().item() / 3, rel=1e-6)


def test_r1_gamma_adds_the_weighted_penalty_to_d_loss():
    cfg = config.load_config("grid-gan", overrides=["variant.r1_gamma=0.5"])
    variant = get("gan")(cfg)
    D = lambda x: 2.0 * x.sum(1)  # noqa: E731  grad = (2, 2): |grad|^2 = 8
    real, fake = Judged(torch.randn(4, 2), None, None), Judged(torch.randn(4, 2), None, None)
    terms = variant.d_penalty(D, real, fake, None, "exact")
    assert terms["loss/r1"].item() == pytest.approx(0.5 / 2 * 8.0)
    assert get("gan")(config.load_config("grid-gan")).d_penalty(D, real, fake, None, "exact") == {}
    gp = get("wgan-gp")(config.load_config("digits-wgan-gp", overrides=["variant.r1_gamma=0.5"]))
    images = Judged(torch.randn(2, 1, 8, 8), None, None), Judged(torch.randn(2, 1, 8, 8), None, None)
    assert set(gp.d_penalty(lambda x: x.flatten(1).sum(1), *images, None, "exact")) == {"loss/r1", "loss/gp"}


def test_wgan_clips_the_critic_and_takes_n_critic_batches():
    cfg = config.load_config("digits-wgan", overrides=[*FAST, "variant.clip=0.005"])
    variant = get("wgan")(cfg)
    assert variant.data_per_step == 5
    assert isinstance(variant.optimizers["D"], torch.optim.RMSprop)
    D = variant.models["D"]
    with torch.no_grad():
        for p in D.parameters():
            p.mul_(100)
    variant.after_d_step(D)
    assert max(p.abs().max().item() for p in D.parameters()) <= 0.005


def test_wgan_needs_the_wasserstein_loss():
    from distgan.errors import UserError

    with pytest.raises(UserError, match="needs variant.loss=wasserstein"):
        get("wgan-gp")(config.load_config("digits-wgan-gp", overrides=["variant.loss=ns"]))


@pytest.mark.parametrize(
    "preset, extra",
    [
        ("digits-wgan", []),
        ("digits-wgan-gp", []),
        ("digits-wgan-gp", ["model.d.minibatch_discrimination=true", "model.d.mbd_kernels=8"]),
        ("digits-lsgan", []),
        ("digits-cgan", []),
        ("digits-cgan", ["model.d.conditioning=concat"]),
        ("digits-dcgan", ["variant.pack=2"]),
        ("digits-wgan-gp", ["variant.pack=4"]),
        ("digits-unrolled", ["variant.unroll_steps=2"]),
    ],
)
def test_variant_presets_train(tmp_path, digits_shards, preset, extra, capsys):
    run = tmp_path / "run"
    r = cli(
        capsys,
        "train",
        "--preset",
        preset,
        *FAST,
        f"data.shards={digits_shards}",
        "--out",
        run,
        "train.steps=2",
        "variant.n_critic=2",
        *extra,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [m for m in read_metrics(run) if "loss/d" in m]
    assert logged and all(math.isfinite(m["loss/d"]) and math.isfinite(m["loss/g"]) for m in logged)
    assert ("loss/gp" in logged[-1]) == (preset == "digits-wgan-gp")
    model, _ = tensors(run / "checkpoints" / "step-00000002" / "model.safetensors")
    if preset == "digits-wgan":
        assert max(v.abs().max().item() for k, v in model.items() if k.startswith("D.")) <= 0.01
    # a D step per real batch: n_critic=2 x 2 steps x 16 samples were read
    state, _ = tensors(run / "checkpoints" / "step-00000002" / "state.safetensors")
    assert int(state["data.positions"].sum()) == 2 * 2 * 16


def test_pacgan_packs_consecutive_samples_along_channels():
    cfg = config.load_config("digits-dcgan", overrides=[*FAST, "variant.pack=2"])
    variant = get("gan")(cfg)
    assert variant.models["D"].net[0].in_channels == 2
    seen = []
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16)
    variant.discriminate(lambda packed: seen.append(packed) or packed.mean((1, 2, 3)), x, None)
    assert seen[0].shape == (2, 2, 16, 16)
    assert seen[0][:, :, 0, 0].tolist() == [[0.0, 1.0], [2.0, 3.0]]  # real with real, in pairs
    from distgan.errors import UserError

    with pytest.raises(UserError, match="multiple of variant.pack=3"):
        get("gan")(config.load_config("digits-dcgan", overrides=[*FAST, "variant.pack=3"]))


def test_cgan_samples_a_class_or_a_row_per_class(tmp_path, digits_shards, capsys):
    run = tmp_path / "run"
    r = cli(
        capsys, "train", "--preset", "digits-cgan", *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=2"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(capsys, "sample", "--ckpt", run, "--class", "all", "--n", "3", "--out", tmp_path / "all.npy")
    assert r.returncode == 0, r.stderr
    import numpy as np

    assert np.load(tmp_path / "all.npy").shape == (30, 1, 16, 16)
    r = cli(capsys, "sample", "--ckpt", run, "--class", "3", "--n", "5", "--out", tmp_path / "three.png")
    assert r.returncode == 0 and (tmp_path / "three.png").stat().st_size > 0
    r = cli(capsys, "sample", "--ckpt", run, "--class", "10", "--n", "5", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "--class must be in 0..9" in r.stderr
    # the conditioning is real: with the same noise, two classes give different images
    cfg = config.load_config("digits-cgan", overrides=[*FAST])
    v = get("cgan")(cfg)
    g = torch.Generator().manual_seed(0)
    a = v.sample(v.models["G"], 4, generator=g.manual_seed(0), labels=torch.full((4,), 1))
    b = v.sample(v.models["G"], 4, generator=g.manual_seed(0), labels=torch.full((4,), 7))
    assert not torch.allclose(a, b)


def test_sample_class_needs_a_conditional_model(tmp_path, digits_shards, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *FAST, f"data.shards={digits_shards}", "--out", run, "train.steps=1").returncode == 0
    r = cli(capsys, "sample", "--ckpt", run, "--class", "3", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "--class needs a conditional model" in r.stderr


def test_unrolled_critic_equals_d_after_k_real_adam_steps():
    """unroll_grad=false: the critic G is judged by equals a copy of D after k steps of D's actual
    Adam optimizer on the same real batch and the same fakes."""
    import copy

    cfg = config.load_config(
        "digits-unrolled", overrides=[*FAST, "variant.unroll_steps=3", "variant.unroll_grad=false"]
    )
    v = get("unrolled")(cfg)
    D, G = v.models["D"], v.models["G"]
    real = torch.rand(8, 1, 16, 16) * 2 - 1
    probe = torch.rand(5, 1, 16, 16) * 2 - 1
    torch.manual_seed(5)
    critic = v.g_critic(D, {"image": real})
    with torch.no_grad():
        ours = critic(probe)

    D2 = copy.deepcopy(D)
    opt = torch.optim.Adam(D2.parameters(), lr=cfg.train.lr_d, betas=(cfg.train.beta1, cfg.train.beta2))
    torch.manual_seed(5)
    for _ in range(3):
        with torch.no_grad():
            fake = G(v.noise(8, "cpu"))
        opt.zero_grad()
        losses.d_loss("ns", D2(real), D2(fake)).backward()
        opt.step()
    with torch.no_grad():
        theirs = D2(probe)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # and D itself was not touched
    with torch.no_grad():
        assert not torch.allclose(D(probe), theirs, rtol=1e-4, atol=1e-5)


H = 1e-7  # central-difference step: small enough that no ReLU kink or Adam step changes side (1e-5 does)


@pytest.mark.parametrize("full", [True, False])
def test_unrolled_generator_gradient_matches_finite_differences(full):
    """G's gradient through 2 unrolled Adam steps of D equals central differences of the same loss
    in float64, along a random direction: with unroll_grad (the paper's full version), of
    L_G(D_theta_k(G)(G(z))), theta_k moving with G; without, with theta_k held where it was."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = config.load_config(
            "digits-unrolled",
            overrides=[
                *FAST,
                "variant.unroll_steps=2",
                "model.g.arch=mlp",
                "model.d.arch=mlp",
                f"variant.unroll_grad={str(full).lower()}",
            ],
        )
        torch.manual_seed(0)
        v = get("unrolled")(cfg)
        G, D = v.models["G"], v.models["D"]
        real = torch.rand(8, 1, 16, 16) * 2 - 1
        # one real D step first, so that the unrolled Adam steps continue from nonzero moments
        losses.d_loss("ns", D(real), D(G(v.noise(8, "cpu")).detach())).backward()
        v.optimizers["D"].step()
        v.optimizers["D"].zero_grad(set_to_none=True)
        zs = [torch.randn(8, cfg.model.g.z_dim) for _ in range(3)]  # 2 unrolled steps' fakes, then G's

        def g_loss(critic=None):
            z = iter(zs)
            v.noise = lambda n, device, generator=None: next(z)
            if critic is None:
                critic = v.g_critic(D, {"image": real})
            else:  # theta_k held: skip the unrolled steps' draws
                next(z), next(z)
            return losses.g_loss("ns", critic(G(next(z)))), critic

        G.zero_grad()
        loss, critic = g_loss()
        loss.backward()
        assert all(p.grad is None for p in D.parameters())
        params = list(G.parameters())
        direction = [torch.randn_like(p) for p in params]
        analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
        h, sides = H, []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(sign * h * d)
            sides.append(g_loss(None if full else critic)[0].item())  # full: theta_k recomputed for this G
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(sign * h * d)
        numeric = (sides[0] - sides[1]) / (2 * h)
        assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-9), (numeric, analytic)
    finally:
        torch.set_default_dtype(previous)
