"""GAT's alignment of D with a frozen DINOv2 (distgan/align.py, distgan/models/dinov2.py): the encoder
against a float64 forward written from DINOv2's definition, both published weight layouts, the loss and
the encoder's translation against their formulas, and training with it: the encoder frozen and never in a
checkpoint, exact resume, one-line refusals."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, assert_resumes_exactly, cli, read_metrics
from safetensors import safe_open
from safetensors.torch import save_file

from distgan import align, augment, config, variants
from distgan.errors import UserError
from distgan.models import dinov2

WIDTH, DEPTH, HIDDEN = 64, 2, 96  # one 64-dimensional head, as every DINOv2 size has


def meta_state(registers=0, seed=0, grid=37):
    """A DINOv2 state dict in Meta's layout (dinov2_vit*14*_pretrain.pth), random weights, tiny width."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, base=0.0):
        return base + 0.2 * torch.randn(*shape, generator=g)

    st = {
        "cls_token": r(1, 1, WIDTH),
        "pos_embed": r(1, 1 + grid * grid, WIDTH),
        "mask_token": r(1, WIDTH),
        "patch_embed.proj.weight": r(WIDTH, 3, 14, 14) / 10,
        "patch_embed.proj.bias": r(WIDTH),
        "norm.weight": r(WIDTH, base=1.0),
        "norm.bias": r(WIDTH),
    }
    if registers:
        st["register_tokens"] = r(1, registers, WIDTH)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        for name, shape in (
            ("norm1", (WIDTH,)),
            ("attn.qkv", (3 * WIDTH, WIDTH)),
            ("attn.proj", (WIDTH, WIDTH)),
            ("norm2", (WIDTH,)),
            ("mlp.fc1", (HIDDEN, WIDTH)),
            ("mlp.fc2", (WIDTH, HIDDEN)),
        ):
            st[p + name + ".weight"] = r(*shape, base=1.0 if name.startswith("norm") else 0.0)
            st[p + name + ".bias"] = r(shape[0])
        st[p + "ls1.gamma"], st[p + "ls2.gamma"] = r(WIDTH), r(WIDTH)
    return st


def hugging_face_state(meta):
    """The same weights under Hugging Face's Dinov2Model names (query, key, value split)."""
    hf = {
        "embeddings.cls_token": meta["cls_token"],
        "embeddings.mask_token": meta["mask_token"],
        "embeddings.position_embeddings": meta["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": meta["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": meta["patch_embed.proj.bias"],
        "layernorm.weight": meta["norm.weight"],
        "layernorm.bias": meta["norm.bias"],
    }
    if "register_tokens" in meta:
        hf["embeddings.register_tokens"] = meta["register_tokens"]
    for i in range(DEPTH):
        m, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = meta[m + f"attn.qkv.{kind}"].chunk(3)
            hf[h + f"attention.attention.query.{kind}"] = q
            hf[h + f"attention.attention.key.{kind}"] = k
            hf[h + f"attention.attention.value.{kind}"] = v
            hf[h + f"attention.output.dense.{kind}"] = meta[m + f"attn.proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[h + f"{name}.{kind}"] = meta[m + f"{name}.{kind}"]
        hf[h + "layer_scale1.lambda1"], hf[h + "layer_scale2.lambda1"] = meta[m + "ls1.gamma"], meta[m + "ls2.gamma"]
    return hf


def reference_forward(st, x, registers):
    """DINOv2's forward in float64 from its definition, the position grid already at x's size."""
    st = {k: v.double() for k, v in st.items()}
    x = x.double()
    tokens = F.conv2d(x, st["patch_embed.proj.weight"], st["patch_embed.proj.bias"], stride=14)
    tokens = tokens.flatten(2).transpose(1, 2)
    h = torch.cat([st["cls_token"].expand(len(x), -1, -1), tokens], 1) + st["pos_embed"]
    if registers:
        h = torch.cat([h[:, :1], st["register_tokens"].expand(len(x), -1, -1), h[:, 1:]], 1)

    def ln(t, name):
        return F.layer_norm(t, (WIDTH,), st[name + ".weight"], st[name + ".bias"], eps=1e-6)

    for i in range(DEPTH):
        p = f"blocks.{i}."
        q, k, v = F.linear(ln(h, p + "norm1"), st[p + "attn.qkv.weight"], st[p + "attn.qkv.bias"]).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(WIDTH), dim=-1) @ v  # one head of 64
        h = h + st[p + "ls1.gamma"] * F.linear(att, st[p + "attn.proj.weight"], st[p + "attn.proj.bias"])
        mid = F.gelu(F.linear(ln(h, p + "norm2"), st[p + "mlp.fc1.weight"], st[p + "mlp.fc1.bias"]))
        h = h + st[p + "ls2.gamma"] * F.linear(mid, st[p + "mlp.fc2.weight"], st[p + "mlp.fc2.bias"])
    h = ln(h, "norm")
    return h[:, 0], h[:, 1 + registers :]


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_matches_its_definition_in_both_weight_layouts(registers):
    torch.manual_seed(0)
    meta = meta_state(registers, grid=3)  # a 3x3 position grid: 42-pixel inputs, no resampling
    x = torch.randn(2, 3, 42, 42)
    want_cls, want_patches = reference_forward(meta, x, registers)
    for state in (meta, hugging_face_state(meta)):
        net = dinov2.from_state_dict(state, 42, "test").double()
        cls, patches = net(x.double())
        assert patches.shape == (2, 9, WIDTH)
        torch.testing.assert_close(cls, want_cls, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(patches, want_patches, rtol=1e-10, atol=1e-10)


def test_position_grid_is_resampled_once_to_the_input_size():
    meta = meta_state()
    net = dinov2.from_state_dict(meta, 224, "test")
    assert net.pos_embed.shape == (1, 1 + 16 * 16, WIDTH)
    torch.testing.assert_close(net.pos_embed[:, 0], meta["pos_embed"][:, 0])  # the class token's is kept
    grid = meta["pos_embed"][:, 1:].reshape(1, 37, 37, WIDTH).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, -1)
    torch.testing.assert_close(net.pos_embed[:, 1:], want)
    torch.testing.assert_close(dinov2.from_state_dict(meta, 518, "test").pos_embed, meta["pos_embed"])  # 37x37


def test_a_missing_or_foreign_encoder_file_is_refused_with_one_line(tmp_path):
    with pytest.raises(UserError, match=r"model.align.encoder .*'/nope.pth' does not exist"):
        align.Encoder("/nope.pth", 28)
    save_file({"features.0.weight": torch.zeros(2, 3, 3, 3)}, tmp_path / "vgg.safetensors")
    with pytest.raises(UserError, match="not a DINOv2 state dict"):
        align.Encoder(str(tmp_path / "vgg.safetensors"), 28)
    broken = meta_state()
    broken["blocks.1.attn.qkv.weight"] = broken["blocks.1.attn.qkv.weight"][:, :10]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="'blocks.1.attn.qkv.weight' missing, unexpected or of another shape"):
        align.Encoder(str(tmp_path / "broken.pth"), 28)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot be read"):
        align.Encoder(str(tmp_path / "junk.pth"), 28)


def test_alignment_loss_is_one_minus_cosine_of_class_and_mean_patch_tokens():
    torch.manual_seed(0)
    d_cls, d_patches = torch.randn(3, 8), torch.randn(3, 16, 8)
    e_cls, e_patches = torch.randn(3, 8), torch.randn(3, 16, 8)
    got = align.loss(d_cls, d_patches, e_cls, e_patches)

    def cos(a, b):
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    want = (1 - cos(d_cls, e_cls)) + (1 - cos(d_patches, e_patches)).mean(1)
    torch.testing.assert_close(got, want)
    zero = align.loss(e_cls, e_patches, e_cls * 2, e_patches * 3)  # the scale does not count
    torch.testing.assert_close(zero, torch.zeros(3), atol=1e-6, rtol=0)
    # an encoder grid (4x4) other than D's (2x2) is resized bicubically to D's
    small = align.loss(d_cls, d_patches[:, :4], e_cls, e_patches)
    grid = F.interpolate(e_patches.transpose(1, 2).reshape(3, 8, 4, 4), size=(2, 2), mode="bicubic")
    want = (1 - cos(d_cls, e_cls)) + (1 - cos(d_patches[:, :4], grid.reshape(3, 8, 4).transpose(1, 2))).mean(1)
    torch.testing.assert_close(small, want)


def test_the_encoders_image_gets_d_inputs_translation_scaled_to_its_size():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    ops = augment.parse("color,translation,cutout")
    draws = augment.draw(ops, x)
    raw = torch.rand(4, 3, 32, 32) * 2 - 1
    dy, dx = draws[1][1]
    got = align.translated(raw, ops, draws, 16)
    assert torch.equal(got, augment.translation(raw, (dy * 2, dx * 2)))  # twice the shift at twice the size
    assert torch.equal(align.translated(x, ops, draws, 16), augment.translation(x, (dy, dx)))  # no colour, cutout
    assert align.translated(raw, augment.parse("color"), draws[:1], 16) is raw


ALIGN_RUN = [
    "--preset",
    "digits-gat",
    "data.resolution=16",
    "data.batch_size=8",
    "data.num_workers=0",
    *TINY_VIT,
    "model.align.resolution=28",
    "model.align.proj_dim=16",
    "train.log_every=1",
    "train.sample_every=1000",
    "train.ckpt_every=1000",
    "tracking.wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny_pretrain.pth"
    torch.save(meta_state(registers=4), path)
    return path


def test_training_with_the_encoder_resumes_bitwise_and_never_trains_or_saves_it(encoder_file, tmp_path, capsys):
    common = [*ALIGN_RUN, f"model.align.encoder={encoder_file}"]
    before = torch.load(encoder_file, weights_only=True)
    step4, _ = assert_resumes_exactly(capsys, common, tmp_path, 2, 4)
    with safe_open(step4 / "model.safetensors", "pt") as st:
        keys = list(st.keys())
    assert any(k.startswith("D.proj.") for k in keys)  # D's projector is trained and saved
    assert not [k for k in keys if "patch_embed" in k or "ls1" in k or "register_tokens" in k]  # DINOv2's never
    after = torch.load(encoder_file, weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = [r for r in read_metrics(tmp_path / "full") if "loss/align" in r]
    assert len(rows) == 4 and all(0 < r["loss/align"] < 4 for r in rows)  # 1 - cos, class + patches: (0, 4)
    # a resume without the encoder is refused (D's projector would be left out)
    res = cli(capsys, "train", *ALIGN_RUN, "--out", tmp_path / "split", "train.steps=6", "--resume", "auto")
    assert res.returncode == 2 and "model.align.encoder=" in res.stderr


def test_the_variant_holds_the_encoder_frozen_outside_its_models(encoder_file):
    cfg = config.load_config("digits-gat", None, [*ALIGN_RUN[2:], f"model.align.encoder={encoder_file}"])
    variant = variants.get(cfg.variant.name)(cfg)
    enc = variant.aligner
    assert enc is not None and not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()  # the trainer's .train() calls leave it in eval mode
    assert not enc.training
    assert all(enc is not m and enc not in list(m.modules()) for m in variant.models.values())
    assert variant.models["D"].proj[-1].out_features == WIDTH


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d.arch=resnet", "aligns a vit D's tokens"),
        ("variant.penalty_mode=lazy", "does not combine with variant.penalty_mode=lazy"),
        ("model.align.resolution=30", "must be a multiple of 14"),
        ("variant.pack=2", "does not combine with variant.pack"),
    ],
)
def test_alignment_settings_that_cannot_work_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        config.load_config("digits-gat", None, ["model.align.encoder=/x.pth", override])
