"""GAT's training recipe around the transformer models: multi-level noise-perturbed guidance
(distgan/guidance.py) against its definition for fixed draws, gradient clipping on the device, AdamW and
width-aware learning rates."""

import math

import pytest
import torch
from conftest import TINY_VIT

from distgan import config, guidance, step, variants
from distgan.errors import UserError

TINY = [*TINY_VIT, "data.batch_size=4"]


def test_noise_levels_are_gats_schedule():
    # GAT's info_per_layer(4, 0.125) + 0.01: 1 - 0.125^(1 - i/3) + 0.01
    want = [1 - 0.125 + 0.01, 1 - 0.25 + 0.01, 1 - 0.5 + 0.01, 0.01]
    assert guidance.noise_levels(4, 0.125) == pytest.approx(want, abs=1e-12)
    assert guidance.noise_levels(2, 0.5) == pytest.approx([0.51, 0.01])


def _cumulative_from_the_definition(xs, eps, t):
    """The levels noised as GAT's apply_gaussian_list_cumulative walks them: from the last level to the
    first, the previous noise decayed and an increment of the missing variance added."""
    out = [None] * len(xs)
    noise, prev_t = torch.zeros_like(xs[0]), 0.0
    for i in reversed(range(len(xs))):
        decay = (1 - t[i]) / (1 - prev_t)
        increment = t[i] ** 2 - prev_t**2 * decay**2
        noise = noise * decay + eps[i] * math.sqrt(increment)
        out[i] = (1 - t[i]) * xs[i] + noise
        prev_t = t[i]
    return out


def test_stacked_levels_match_the_cumulative_definition_for_a_fixed_draw():
    torch.manual_seed(0)
    g = guidance.Guidance(4, 0.125)
    xs = torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)  # (B, L, C, H, W)
    eps = torch.randn(3, 4, 2, 5, 5, dtype=torch.float64)
    got = g.stack(xs, eps)
    want = _cumulative_from_the_definition(list(xs.unbind(1)), list(eps.unbind(1)), g.t)
    assert got.shape == (3, 8, 5, 5)  # levels stacked as channels, the earliest first
    torch.testing.assert_close(got, torch.cat(want, dim=1), rtol=1e-6, atol=1e-6)
    # a real image is repeated to every level before the noise
    real = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    rep = _cumulative_from_the_definition([real] * 4, list(eps.unbind(1)), g.t)
    torch.testing.assert_close(g.stack(real, eps), torch.cat(rep, dim=1), rtol=1e-6, atol=1e-6)


def test_each_levels_noise_has_variance_t_squared():
    torch.manual_seed(1)
    g = guidance.Guidance(4, 0.125)
    zeros = torch.zeros(20000, 4, 1, 1, 1)
    noise = g.stack(zeros).view(20000, 4)
    std = noise.std(dim=0)
    for got, t in zip(std.tolist(), g.t):
        assert got == pytest.approx(t, rel=0.03)
    # correlated: a coarser level's noise holds the finer one's, decayed: for i < j
    # corr(n_i, n_j) = (1 - t_i) t_j / ((1 - t_j) t_i)
    corr, t = torch.corrcoef(noise.T), g.t
    for i, j in ((0, 1), (1, 2), (0, 3)):
        assert corr[i, j].item() == pytest.approx((1 - t[i]) * t[j] / ((1 - t[j]) * t[i]), abs=0.02)


def test_the_variant_judges_gs_levels_and_repeated_reals_with_replayed_noise():
    cfg = config.load_config("digits-gat", None, TINY)
    v = variants.get("cgan")(cfg)
    G, D = v.models["G"], v.models["D"]
    assert D.patchify.in_channels == 2  # 1 channel x 2 levels
    torch.manual_seed(2)
    y, z = torch.arange(4), torch.randn(4, 64)
    fake = v.generate(G, z, y)
    assert fake.shape == (4, 2, 1, 16, 16)
    torch.testing.assert_close(fake[:, -1], G(z, y))  # the last level is the image
    real = torch.rand(4, 1, 16, 16) * 2 - 1
    side = v.judge(D, real, y)
    assert side.noise.shape == (4, 2, 1, 16, 16)
    # the same draws give the same logits (the penalties' critic replays them) ...
    torch.testing.assert_close(v.critic(D, side)(real), side.logits)
    # ... and D's input is the formula's: the augmented image (the preset's translation) repeated, then noised
    seen = v.augmented(real, side.draws)
    assert not torch.equal(seen, real)
    want = torch.cat(_cumulative_from_the_definition([seen, seen], list(side.noise.unbind(1)), v.guidance.t), 1)
    torch.testing.assert_close(v.d_input(real, side.draws, side.noise), want)
    # G's levels share each sample's augmentation draws
    levels = v.augmented(fake, side.draws)
    for i in range(2):
        torch.testing.assert_close(levels[:, i], v.augmented(fake[:, i], side.draws))
    twice = v.augmented(torch.stack([fake[:, 0], fake[:, 0]], dim=1))  # fresh draws, one per sample
    assert torch.equal(twice[:, 0], twice[:, 1]) and not torch.equal(twice[:, 0], fake[:, 0])
    # samples are the final level only
    assert v.sample(G, 4).shape == (4, 1, 16, 16)


@pytest.mark.parametrize("mode", ["uniform", "real"])
def test_fake_labels_real_pairs_each_fake_with_a_real_of_its_class(mode):
    """variant.fake_labels=real (GAT): in D's step and in G's, the fakes are drawn and judged with the
    labels of the real micro-batch beside them, so rpgan's pairs share a class; uniform draws its own."""
    import accelerate

    cfg = config.load_config("digits-gat", None, [*TINY, f"variant.fake_labels={mode}", "variant.n_critic=1"])
    v = variants.get("cgan")(cfg)
    G, D = v.models["G"], v.models["D"]
    to_g, to_d = [], []
    G.register_forward_pre_hook(lambda m, args: to_g.append(args[1].clone()))
    D.register_forward_pre_hook(lambda m, args: to_d.append(args[1].clone()))
    torch.manual_seed(0)
    labels = [torch.tensor([3, 3, 7, 1, 0, 9, 9, 2]), torch.tensor([5, 4, 4, 8, 6, 6, 1, 0])]
    batches = [{"image": torch.rand(8, 1, 16, 16) * 2 - 1, "label": y} for y in labels]
    ctx = step.StepContext(accelerate.Accelerator(cpu=True), accum=1, grad_clip=1.0)
    v.train_step(batches, ctx)  # two micro-batches: D's step on both, then G's on both
    assert len(to_g) == 4  # a fake batch per micro-batch and step
    for i, g_labels in enumerate(to_g):
        assert torch.equal(g_labels, labels[i % 2]) == (mode == "real")
    # D judged each fake batch with the labels G drew it with
    assert all(any(torch.equal(d, g) for d in to_d) for g in to_g)


def test_multilevel_needs_a_vit_g():
    with pytest.raises(UserError, match="variant.multilevel judges a vit G"):
        config.load_config("digits-gat", None, [*TINY, "model.g.arch=dcgan", "model.d.arch=dcgan"])
    with pytest.raises(UserError, match="model.vit.levels >= 2"):
        config.load_config("digits-gat", None, [*TINY, "model.vit.levels=1"])


def test_gradient_clipping_matches_torchs_clip_grad_norm_():
    import accelerate

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    opt2 = torch.optim.Adam(twin.parameters(), lr=0.1, fused=True)
    ctx = step.StepContext(accelerate.Accelerator(cpu=True), accum=1, grad_clip=0.5)
    x = torch.randn(16, 8) * 10
    for m in (model, twin):
        m(x).square().mean().backward()
    before = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    assert before > 0.5  # the clip is active
    ctx.step(opt)
    opt2.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    # a small gradient is left as it is
    grads = [torch.full((3,), 0.01)]
    clipped = [grads[0].clone()]
    step.clip_gradients(clipped, torch.stack(torch._foreach_norm(clipped)), 0.5)
    torch.testing.assert_close(clipped[0], grads[0])


def test_weight_decay_makes_adamw_and_lr_ref_width_scales_vit_lrs():
    cfg = config.load_config(
        "digits-gat", None, [*TINY, "train.weight_decay=0.05", "train.lr_ref_width=64", "model.d.arch=dcgan"]
    )
    v = variants.get("cgan")(cfg)
    opt_g, opt_d = v.optimizers["G"], v.optimizers["D"]
    assert isinstance(opt_g, torch.optim.AdamW) and opt_g.defaults["weight_decay"] == 0.05
    assert opt_g.param_groups[0]["lr"] == pytest.approx(cfg.train.lr_g * 64 / 16)  # vit G of width 16
    assert opt_d.param_groups[0]["lr"] == pytest.approx(cfg.train.lr_d)  # a dcgan D: unscaled
    with pytest.raises(UserError, match="train.lr_ref_width scales"):
        config.load_config("digits-dcgan", None, ["train.lr_ref_width=768"])
    with pytest.raises(UserError, match="set train.weight_decay=0"):
        config.load_config("digits-dcgan", None, ["variant.name=unrolled", "train.weight_decay=0.1"])
