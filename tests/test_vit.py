"""The GAT-style transformer G and D (distgan/models/vit.py): 2-D RoPE's relative-position property,
attention against its formula in float64, the multi-level outputs, conditioning, one Dynamo graph, and
a training run with the approximate penalties that resumes bitwise."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, assert_resumes_exactly

from distgan import config, models
from distgan.errors import UserError
from distgan.models import vit


def test_rope_scores_depend_only_on_the_offset_between_tokens():
    torch.manual_seed(0)
    side, dim = 4, 8
    rope = vit.RoPE2D(dim, side).double()
    q = torch.randn(dim, dtype=torch.float64).expand(1, 1, side * side, dim)
    k = torch.randn(dim, dtype=torch.float64).expand(1, 1, side * side, dim)
    s = (rope(q) @ rope(k).transpose(-1, -2))[0, 0]  # (T, T)

    def at(r, c):
        return r * side + c

    assert s[at(0, 0), at(1, 2)] == pytest.approx(s[at(2, 1), at(3, 3)].item(), abs=1e-6)  # (fp32 cos, sin)
    assert s[at(3, 0), at(1, 1)] == pytest.approx(s[at(2, 2), at(0, 3)].item(), abs=1e-6)
    assert s[at(0, 0), at(0, 1)] != pytest.approx(s[at(0, 0), at(1, 0)].item(), abs=1e-3)  # rows and columns differ
    x = torch.randn(2, 3, 1 + side * side, dim, dtype=torch.float64)  # with a class token in front: untouched
    out = vit.RoPE2D(dim, side, prefix=1).double()(x)
    assert torch.equal(out[:, :, 0], x[:, :, 0]) and torch.allclose(out[:, :, 1:], rope(x[:, :, 1:]))
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_attention_matches_its_formula_in_float64():
    torch.manual_seed(0)
    layer = vit.SelfAttention(16, 2, vit.RoPE2D(8, 3)).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    q, k, v = layer.qkv(x).reshape(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = layer.rope(layer.q_norm(q)), layer.rope(layer.k_norm(k))
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    want = layer.proj((weights @ v).transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_g_sums_its_levels_and_is_conditioned_d_projects_on_the_class():
    torch.manual_seed(0)
    G = vit.Generator(8, 3, 8, width=16, depth=4, heads=2, patch=2, num_classes=5, embed_dim=4, levels=2)
    z, y = torch.randn(3, 8), torch.tensor([0, 1, 4])
    levels = G(z, y, levels=True)
    assert len(levels) == 2 and levels[-1].shape == (3, 3, 8, 8)
    assert torch.equal(G(z, y), levels[-1]) and not torch.equal(levels[0], levels[1])
    assert not torch.allclose(G(z, torch.tensor([2, 2, 2])), levels[-1])  # the label matters
    with pytest.raises(ValueError, match="needs labels"):
        G(z)
    D = vit.Discriminator(3, 8, width=16, depth=2, heads=2, patch=2, num_classes=5, cmap=8)
    x = torch.randn(3, 3, 8, 8)
    logits = D(x, y)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    feat = D.head(_tokens(D, x)[:, 0])
    torch.testing.assert_close(logits, (feat * D.embed(y)).sum(1) / 8**0.5)
    # class_map: GAT's LabelEmbedder, the embedding through two linear layers at a 0.01 lr multiplier
    D = vit.Discriminator(3, 8, width=16, depth=2, heads=2, patch=2, num_classes=5, cmap=8, class_map=True)
    feat = D.head(_tokens(D, x)[:, 0])
    a, b = D.embed_map[0], D.embed_map[2]
    e = D.embed(y)
    mapped = F.linear(F.silu(F.linear(e, a.weight * 0.01, a.bias * 0.01)), b.weight * 0.01, b.bias * 0.01)
    torch.testing.assert_close(D(x, y), (feat * mapped).sum(1))


def _tokens(D, x):
    h = D.patchify(x).flatten(2).transpose(1, 2) + D.positions
    h = torch.cat([D.cls.expand(x.shape[0], -1, -1), h], dim=1)
    for block in D.blocks:
        h = block(h)
    return h


def test_g_and_d_trace_to_one_graph_and_bad_shapes_are_refused():
    G = vit.Generator(8, 1, 8, width=16, depth=2, heads=2, num_classes=3, embed_dim=4, levels=2)
    D = vit.Discriminator(1, 8, width=16, depth=2, heads=2, num_classes=3, cmap=8)
    y = torch.tensor([0, 2])
    for model, x in ((G, torch.randn(2, 8)), (D, torch.randn(2, 1, 8, 8))):
        found = torch._dynamo.explain(model)(x, y)
        assert (found.graph_count, found.graph_break_count) == (1, 0), found.break_reasons
    with pytest.raises(UserError, match="multiple of 4"):
        config.load_config("digits-gat", None, ["model.vit.width=24", "model.vit.heads=4"])
    with pytest.raises(UserError, match="not a multiple of model.vit.patch 3"):
        config.load_config("digits-gat", None, ["model.vit.patch=3"])


def test_digits_gat_trains_with_approx_penalties_and_resumes_bitwise(tmp_path, capsys, digits_shards):
    common = [
        "--preset",
        "digits-gat",
        f"data.shards={digits_shards}",
        "data.batch_size=8",
        "data.num_workers=0",
        *TINY_VIT,
        "train.log_every=1",
        "train.ckpt_every=1000",
        "train.sample_every=1000",
        "tracking.wandb.mode=disabled",
    ]
    assert_resumes_exactly(capsys, common, tmp_path, 2, 4)


def _rms(x, weight=None, eps=1e-6):
    out = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    return out * weight if weight is not None else out


def _swiglu(mlp, x):
    a, b = (x @ mlp.w12.weight.T + mlp.w12.bias).chunk(2, dim=-1)
    return (a * torch.sigmoid(a) * b) @ mlp.w3.weight.T + mlp.w3.bias


def test_blocks_match_their_definitions_in_float64_and_zero_modulation_is_the_identity():
    torch.manual_seed(0)
    width, heads = 16, 2
    x = torch.randn(3, 9, width, dtype=torch.float64)
    w = torch.randn(3, width, dtype=torch.float64)
    g = vit.GBlock(width, heads, 4.0, vit.RoPE2D(8, 3)).double()
    # x += gate_a * Attn(RMS(x) (1 + scale_a)); x += gate_m * SwiGLU(RMS(x) (1 + scale_m)),
    # (scale_a, gate_a, scale_m, gate_m) = Linear(SiLU(w))
    mod = (w * torch.sigmoid(w)) @ g.ada.weight.T + g.ada.bias
    scale_a, gate_a, scale_m, gate_m = (m[:, None] for m in mod.chunk(4, dim=-1))
    want = x + gate_a * g.attn(_rms(x) * (1 + scale_a))
    want = want + gate_m * _swiglu(g.mlp, _rms(want) * (1 + scale_m))
    torch.testing.assert_close(g(x, w), want, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # adaLN's modulation at zero: both gates shut, the block passes x through
        g.ada.weight.zero_()
        g.ada.bias.zero_()
    assert torch.equal(g(x, w), x)
    # GAT's own initialisation is a tenth of Xavier's gain, not zero: a fresh block is near the identity
    fresh = vit.Generator(8, 1, 6, width=width, depth=2, heads=heads, levels=2).blocks[0].double()
    assert 0 < (fresh(x, w) - x).abs().max() < 0.5 * x.abs().max()
    d = vit.DBlock(width, heads, 4.0, vit.RoPE2D(8, 3, prefix=1)).double()
    xd = torch.randn(3, 10, width, dtype=torch.float64)
    # x += ls_a * Attn(RMS_affine(x)); x += ls_m * SwiGLU(RMS_affine(x)), layer-scales starting at 0.1
    want = xd + d.attn(_rms(xd, d.norm1.weight)) * d.scale_a
    want = want + _swiglu(d.mlp, _rms(want, d.norm2.weight)) * d.scale_m
    torch.testing.assert_close(d(xd), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d.scale_a.detach(), torch.full((width,), 0.1, dtype=torch.float64))


def test_the_mapping_lr_multiplier_scales_its_adam_steps_and_not_the_initial_function():
    """model.vit.map_lr_mult: G's mapping MLP computes the same function at init for any multiplier,
    and an Adam step moves its effective weights (stored weight x multiplier) by lr x multiplier."""
    out, moved = {}, {}
    for mult in (0.01, 1.0):
        torch.manual_seed(4)
        G = vit.Generator(z_dim=8, channels=1, resolution=8, width=16, depth=2, heads=2, levels=2, map_lr_mult=mult)
        z = torch.randn(3, 8)
        out[mult] = G(z)
        first = G.mapping[0]
        before = (first.weight * first.lr_mult).detach().clone()
        opt = torch.optim.Adam(G.parameters(), lr=1e-3)
        G(z).square().mean().backward()
        opt.step()
        moved[mult] = ((first.weight * first.lr_mult).detach() - before).abs().max().item()
    torch.testing.assert_close(out[0.01], out[1.0], rtol=1e-4, atol=1e-5)
    assert moved[1.0] == pytest.approx(1e-3, rel=1e-3)  # Adam's first step: lr per weight
    assert moved[0.01] == pytest.approx(1e-5, rel=1e-2)  # (fp32 rounding of weights stored x 100)


def test_minibatch_std_matches_its_definition_in_float64_and_sees_only_its_group():
    torch.manual_seed(0)
    h = torch.randn(6, 5, 8, dtype=torch.float64)
    # groups of 3 (6 is divisible): samples 0-2 and 3-5
    got = vit.group_std(h, 3)
    x = _rms(h)
    for first in (0, 3):
        want = x[first : first + 3].std(dim=0, unbiased=False).mean(dim=0)
        for i in range(first, first + 3):
            torch.testing.assert_close(got[i], want, rtol=1e-7, atol=1e-7)
    # a group of 4 does not divide 6: its largest divisor below 4 (3) is used
    torch.testing.assert_close(vit.group_std(h, 4), got)
    # D with it: a sample's logit moves with the other members of its group and with no other sample
    D = vit.Discriminator(1, 8, width=16, depth=2, heads=2, num_classes=3, cmap=8, mbstd=2)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    before = D(x, y)
    moved = x.clone()
    moved[1] += 1.0
    after = D(moved, y)
    assert after[0] != before[0] and torch.equal(after[2:], before[2:])
    # identical samples: the term is (almost) nothing, the logit that of D without it
    same = x[:1].expand(4, -1, -1, -1)
    feat = D.head(_tokens(D, same)[:, 0])
    torch.testing.assert_close(D(same, y), (feat * D.embed(y)).sum(1) / 8**0.5, atol=1e-3, rtol=0)
    # the config key reaches the model
    cfg = config.load_config("digits-gat", None, ["model.vit.mbstd=4"])
    assert models.build_discriminator(cfg, num_classes=10).mbstd == 4
