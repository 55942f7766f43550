"""The gradient-penalty modes (distgan/penalties.py): the finite-difference estimator against D's whose
input gradient is known in closed form, lazy regularisation's gradients and Adam rescaling against
StyleGAN2's formula, fp32 under autocast, the attention backend, and compiled training with approx
and lazy penalties (Inductor on the CPU) against eager, resumed bitwise."""

import math

import pytest
import torch
from conftest import FAST

from distgan import config, penalties, step, trainer, variants
from distgan.errors import UserError
from distgan.models import attention, resnet

N = 200_000  # draws of eps for the Monte-Carlo checks


def _quadratic(dim=4, seed=0):
    """D(x) = 1/2 x^T A x + w^T x per row, A symmetric: grad = A x + w."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    a, w = (b + b.t()) / 2, torch.randn(dim, generator=g, dtype=torch.float64)
    return a, w, lambda x: 0.5 * ((x @ a) * x).sum(1) + x @ w


@pytest.mark.parametrize("sigma", [0.01, 0.3])
def test_approx_r1_is_exact_plus_the_formulas_bias_on_a_quadratic_d(sigma):
    """a = (D(x + s e) - D(x)) / s = g.e + s/2 e^T A e, so E a^2 = |g|^2 + s^2/4 ((tr A)^2 + 2 |A|_F^2):
    the mean over 200 000 draws agrees with that within 4 standard errors, and with the exact |g|^2
    (exact_sq_grad) once the bias is taken off; at s = 0.01 the bias is below the Monte-Carlo error."""
    torch.manual_seed(0)
    a, w, D = _quadratic()
    x0 = torch.randn(1, 4, dtype=torch.float64)
    x = x0.expand(N, 4).contiguous()
    exact = penalties.exact_sq_grad(D, x0).item()
    assert exact == pytest.approx((x0 @ a + w).square().sum().item(), rel=1e-6)
    torch.manual_seed(10)
    fd = penalties.finite_difference(D, x, sigma).double()
    est, se = fd.square().mean().item(), fd.square().std().item() / math.sqrt(N)
    bias = sigma**2 / 4 * (torch.trace(a) ** 2 + 2 * a.square().sum()).item()
    assert abs(est - (exact + bias)) < 4 * se, (est, exact, bias, se)
    torch.manual_seed(10)
    assert penalties.approx_sq_grad(D, x, sigma).item() == pytest.approx(est, rel=1e-5)
    if sigma == 0.01:
        assert bias < se and abs(est - exact) < 4 * se
    else:
        assert bias > 8 * se  # the large step's bias is really there, and measured


def test_approx_r1_gradient_in_ds_parameters_is_unbiased():
    """D(x) = <w, x>: a = w.e exactly, a^2's gradient in w is 2 (w.e) e, whose mean is 2 w, the
    gradient of the exact penalty |w|^2."""
    torch.manual_seed(1)
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    penalties.approx_sq_grad(lambda x: x @ w, torch.randn(N, 3), 0.01).backward()
    torch.testing.assert_close(w.grad, 2 * w.detach(), atol=0.06, rtol=0)  # the MC error: ~0.013 per coordinate


def test_approx_wgan_gp_is_unbiased():
    """A linear critic with |grad| = 5: E[a^2 - sqrt(2 pi) |a| + 1] = (5 - 1)^2 = 16 (exact_gp: 16),
    while sqrt(a^2), the naive estimate of |grad|, would give (5 sqrt(2/pi) - 1)^2 = 9.0."""
    torch.manual_seed(2)
    w = torch.tensor([3.0, 4.0])
    x = torch.randn(N, 2)
    assert penalties.exact_gp(lambda x: x @ w, x[:8]).item() == pytest.approx(16.0)
    a = penalties.finite_difference(lambda x: x @ w, x, 0.01).double()
    samples = a.square() - math.sqrt(2 * math.pi) * a.abs() + 1
    se = samples.std().item() / math.sqrt(N)
    torch.manual_seed(2)
    torch.randn(N, 2)
    assert penalties.approx_gp(lambda x: x @ w, x, 0.01).item() == pytest.approx(samples.mean().item(), rel=1e-4)
    assert abs(samples.mean().item() - 16.0) < 4 * se


TINY = ["model.g.width=2", "model.d.width=2", "model.g.embed_dim=8", "data.batch_size=8"]


def test_approx_r1_on_a_resnet_d_matches_exact_r1():
    """A real D (digits-r3gan's residual D, 32 px): per image, the mean of a^2 over 512 draws of eps
    agrees with the exact |grad_x D|^2 within 4 standard errors of the draws."""
    torch.manual_seed(3)
    cfg = config.load_config("digits-r3gan", None, TINY)
    D = variants.get(cfg.variant.name)(cfg).models["D"]
    x = torch.randn(3, 1, 32, 32)
    for i in range(3):
        exact = penalties.exact_sq_grad(D, x[i : i + 1]).item()
        a = penalties.finite_difference(D, x[i : i + 1].expand(512, -1, -1, -1).contiguous(), 0.01).double()
        est, se = a.square().mean().item(), a.square().std().item() / math.sqrt(512)
        assert abs(est - exact) < 4 * se, (i, est, exact, se)
        assert se < 0.15 * exact  # a test with power: the error bar is a small part of the value


def test_approx_shares_the_augmentation_draws_between_its_two_d_evaluations():
    """With DiffAugment (color, translation, cutout: affine in the image) and a linear D, D(aug(x)) is
    affine in x, so the finite difference is exactly g.e when both evaluations use the same draws
    (and O(1/sigma) if they did not): its mean square over many draws equals the exact R1 taken
    through the same draws."""
    torch.manual_seed(4)
    cfg = config.load_config("digits-dcgan", None, [*TINY, "data.augment=color,translation,cutout"])
    v = variants.get("gan")(cfg)
    w = torch.randn(1, 1, 8, 8)
    D = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731
    x = torch.rand(1, 1, 8, 8).expand(4096, -1, -1, -1).contiguous() * 2 - 1
    side = v.judge(D, x, None)
    exact = penalties.exact_sq_grad(v.critic(D, side), x).item()
    a = penalties.finite_difference(v.critic(D, side), x, 0.01).double()
    se = a.square().std().item() / math.sqrt(len(a))
    assert abs(a.square().mean().item() - exact) < 4 * se, (a.square().mean().item(), exact, se)


def test_approx_d_evaluations_run_in_fp32_under_bf16_autocast():
    """StepContext.full_precision takes Accelerate's bf16 autocast off a prepared model: inside it the
    linear layer gives the fp32 result, outside it a bf16-rounded one."""
    import accelerate
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # whatever an earlier test in this process made
    try:
        acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        torch.manual_seed(5)
        model = acc.prepare(torch.nn.Linear(64, 8))
        x = torch.randn(16, 64)
        want = torch.nn.functional.linear(x, model.weight, model.bias)
        ctx = step.StepContext(acc, accum=1)
        assert ctx.mixed_precision
        assert not torch.allclose(model(x), want, atol=1e-4)  # autocast: bf16 inside
        with ctx.full_precision(model):
            torch.testing.assert_close(model(x), want)
        assert not torch.allclose(model(x), want, atol=1e-4)  # and back after the block
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


class LinearD(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, math.prod(shape)).view(1, *shape))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


class ZeroG(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape, self.b = shape, torch.nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return torch.zeros(z.size(0), *self.shape) + self.b


class Recording(step.StepContext):
    """A StepContext that keeps D's gradient at every D optimizer step."""

    def __init__(self, *args, D, **kw):
        super().__init__(*args, **kw)
        self.D, self.grads = D, []

    def step(self, optimizer):
        if optimizer.param_groups[0]["params"][0] is self.D.w:
            self.grads.append(self.D.w.grad.detach().clone())
        super().step(optimizer)


@pytest.mark.parametrize("n_critic", [1, 2])
def test_lazy_regularisation_steps_carry_k_times_the_exact_penalty_and_adam_is_rescaled(n_critic):
    """penalty_mode=lazy, k = 4, over 8 D steps (8 / n_critic steps) with lr 0 (D fixed): a
    regularisation step follows the D steps 0 and 4 only (counted over D steps, not steps); its gradient is k times the exact R1 + R2 gradient (for D = <w, x>:
    (r1 + r2) w per step), the other optimizer steps carry D's loss alone, so over k steps the penalty
    gradient sums to what k exact steps give. D's Adam has lr * k/(k+1) and betas ** (k/(k+1))
    (StyleGAN2's mb_ratio), G's is untouched."""
    import accelerate
    from accelerate.state import AcceleratorState

    shape = (1, 32, 32)
    grads = {}
    for mode in ("exact", "lazy"):
        cfg = config.load_config(
            "digits-r3gan",
            None,
            [*TINY, "variant.r1_gamma=0.1", "variant.r2_gamma=0.3", f"variant.penalty_mode={mode}"]
            + ["variant.penalty_every=4", "train.lr_d=0", "train.lr_g=0", f"variant.n_critic={n_critic}"],
        )
        v = variants.get(cfg.variant.name)(cfg)
        if mode == "lazy":
            r = 4 / 5
            d, g = v.optimizers["D"].param_groups[0], v.optimizers["G"].param_groups[0]
            assert d["betas"] == pytest.approx((0.0, 0.99**r)) and g["betas"] == (0.0, 0.99)
            lazy = ["variant.penalty_mode=lazy", "variant.penalty_every=4", "train.lr_d=1e-3"]
            cfg2 = config.load_config("digits-r3gan", None, [*TINY, *lazy])
            assert variants.get("gan")(cfg2).optimizers["D"].param_groups[0]["lr"] == pytest.approx(1e-3 * r)
        D = v.models["D"] = LinearD(shape)
        v.models["G"] = ZeroG(shape)
        v.optimizers = {n: torch.optim.Adam(v.models[n].parameters(), lr=0.0) for n in ("G", "D")}
        try:
            ctx = Recording(accelerate.Accelerator(cpu=True), accum=1, D=D)
            for s in range(8 // n_critic):
                ctx.global_step = s
                seeds = range(s * n_critic, (s + 1) * n_critic)
                reals = [torch.randn(4, *shape, generator=torch.Generator().manual_seed(i)) for i in seeds]
                v.train_step([{"image": real, "label": None} for real in reals], ctx)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        grads[mode] = ctx.grads
    w = D.w.detach()
    exact, lazy = grads["exact"], grads["lazy"]
    assert len(exact) == 8 and len(lazy) == 10  # D steps, plus regularisation steps after D steps 0 and 4
    penalty = (0.1 + 0.3) * w  # d/dw of r1/2 |w|^2 + r2/2 |w|^2
    mains = [lazy[0], *lazy[2:5], lazy[5], *lazy[7:10]]
    for s in range(8):
        torch.testing.assert_close(exact[s] - mains[s], penalty, rtol=1e-4, atol=1e-7)  # mains: no penalty
    for i in (1, 6):
        torch.testing.assert_close(lazy[i], 4 * penalty, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lazy[1], sum(exact[s] - mains[s] for s in range(4)), rtol=1e-4, atol=1e-6)


class SameDimAttentionD(torch.nn.Module):
    """A D with one multi-head attention over its 16 pixels as tokens (head dim = value dim, the shape
    of a transformer D's attention, which the CPU's flash kernel takes)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(1, 3 * 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # (B, 16, 1)
        q, k, v = self.qkv(t).view(x.size(0), 16, 3, 2, 4).permute(2, 0, 3, 1, 4)  # each (B, 2 heads, 16, 4)
        o = attention.attend(q, k, v).transpose(1, 2).reshape(x.size(0), 16, 8)
        return self.head(o.mean(1)).squeeze(1)


def test_exact_penalties_run_attention_on_the_math_backend():
    """SDPA's fused CPU kernel has no double backward; the exact penalties select the math backend
    themselves (attention.math_only), and the approximate ones need none (first derivatives only)."""
    torch.manual_seed(6)
    D, x = SameDimAttentionD(), torch.randn(4, 1, 4, 4)
    penalties.exact_sq_grad(D, x).backward()  # differentiated twice through attention
    penalties.exact_gp(D, x).backward()
    assert torch.isfinite(D.qkv.weight.grad).all() and D.qkv.weight.grad.abs().sum() > 0
    penalties.approx_sq_grad(D, x, 0.01).backward()  # whatever backend PyTorch picks


def test_sagan_attention_through_sdpa_equals_the_hand_written_formula():
    """resnet.SelfAttention now calls SDPA (scale 1, as SAGAN); on the same weights it gives what the
    earlier hand-written softmax(theta^T phi) g gave, so checkpoints from before give the same images.
    Its exact R1 runs (math backend) and so does the approximate one."""
    torch.manual_seed(7)
    layer = resnet.SelfAttention(16)
    torch.nn.init.normal_(layer.gamma, 0, 1)
    x = torch.randn(2, 16, 8, 8)
    n, c, h, w = x.shape
    theta = layer.theta(x).flatten(2)
    phi = torch.nn.functional.max_pool2d(layer.phi(x), 2).flatten(2)
    g = torch.nn.functional.max_pool2d(layer.g(x), 2).flatten(2)
    attn = torch.softmax(theta.transpose(1, 2) @ phi, dim=-1)
    want = x + layer.gamma * layer.out((g @ attn.transpose(1, 2)).view(n, g.size(1), h, w))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    D = lambda x: layer(x).flatten(1).sum(1)  # noqa: E731
    penalties.exact_sq_grad(D, x).backward()
    penalties.approx_sq_grad(D, x, 0.01).backward()


def test_compile_is_refused_with_exact_penalties_only():
    for preset, extra, name in (("digits-dcgan", ["variant.r1_gamma=1"], "gan"), ("digits-wgan-gp", [], "wgan-gp")):
        with pytest.raises(UserError, match=f"cannot train {name} with exact gradient penalties") as err:
            config.load_config(preset, overrides=[*FAST, "train.compile=true", *extra])
        assert "variant.penalty_mode=approx" in str(err.value) and "variant.penalty_mode=lazy" in str(err.value)
        for mode in ("approx", "lazy"):
            config.load_config(preset, overrides=[*FAST, "train.compile=true", *extra, f"variant.penalty_mode={mode}"])
    with pytest.raises(UserError, match="unrolled D steps"):
        config.load_config("digits-unrolled", overrides=[*FAST, "train.compile=true", "variant.penalty_mode=approx"])
    with pytest.raises(UserError, match="penalty_mode"):
        config.load_config("digits-dcgan", overrides=["variant.penalty_mode=fast"])


GRID = ["data.batch_size=32", "model.g.width=16", "model.d.width=16", "train.log_every=1", "train.ckpt_every=1000"]
# (no lr decay: its schedule depends on train.steps, which the split run's first part sets to 3)
GRID += ["train.sample_every=1000", "tracking.wandb.mode=disabled", "train.seed=3", "train.lr_decay=none"]


@pytest.mark.parametrize("mode", ["approx", "lazy"])
def test_compiled_training_with_approx_and_lazy_penalties_matches_eager_and_resumes_exactly(tmp_path, mode):
    """grid-r3gan (RpGAN + R1 + R2) with train.compile=true (Inductor on the CPU): 6 steps within
    tolerance of eager (D's loss and R1 term at every step, rtol 1e-3; lazy's weights too, atol 3e-4), and 3 steps then a resume to 6 equal, bitwise, to 6 in one
    go. lazy: k = 4, so the resume at step 3 is in the middle of an interval, and the regularisation
    steps (after D steps 0 and 4) run D uncompiled."""
    from conftest import read_metrics

    from distgan import checkpoint

    extra = [*GRID, f"variant.penalty_mode={mode}", "variant.penalty_every=4"]
    runs, losses = {}, {}
    for name, compiled, plan in (("eager", False, [6]), ("compiled", True, [6]), ("split", True, [3, 6])):
        for steps in plan:
            cfg = config.load_config(
                "grid-r3gan", overrides=[*extra, f"train.steps={steps}", f"train.compile={str(compiled).lower()}"]
            )
            assert trainer.train(cfg, tmp_path / name, resume="auto" if steps != plan[0] else None) == 0
        ckpt = checkpoint.load(checkpoint.list_steps(tmp_path / name)[-1])
        runs[name] = {f"{n}.{k}": v for n in ("G", "D") for k, v in ckpt.model_state(n).items()}
        losses[name] = [(m["loss/d"], m["loss/r1"]) for m in read_metrics(tmp_path / name) if "loss/d" in m]
    # G's linear biases in front of a BatchNorm, and D's output bias (RpGAN and the penalties see only
    # differences of D's outputs), have a zero gradient up to rounding, which Adam turns into full steps
    # of noise: compiled and eager rounding differ, so they are left out. The finite difference divides
    # rounding by sigma (x 100), and Adam turns a near-zero gradient of either sign into a full lr-sized
    # step, so approx's weights are compared through the losses below, not one by one; lazy's agree to
    # 3e-4 (BatchNorm running means).
    noise = {f"G.net.{i}.bias" for i in (0, 3, 6, 9)} | {"D.head.bias"}
    for k, v in runs["eager"].items():
        if v.is_floating_point() and k not in noise and mode == "lazy":
            torch.testing.assert_close(runs["compiled"][k], v, rtol=0, atol=3e-4, msg=k)
        assert torch.equal(runs["split"][k], runs["compiled"][k]), k
    assert len(losses["compiled"]) == 6
    torch.testing.assert_close(torch.tensor(losses["compiled"]), torch.tensor(losses["eager"]), rtol=1e-3, atol=1e-5)
    if mode == "lazy":  # logged on the regularisation steps only (x k), zero on the others
        assert [r > 0 for _, r in losses["eager"]] == [True, False, False, False, True, False]
