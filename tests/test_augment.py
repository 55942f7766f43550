"""DiffAugment (distgan/augment.py): each op against its definition for a fixed draw, gradients,
the identity cases, and a training run with augmentation that resumes exactly."""

import pytest
import torch
from conftest import FAST, assert_resumed, cli, read_metrics, run_cli
from test_train import assert_bitwise_equal

from distgan import augment, checkpoint
from distgan.errors import UserError


def images(n=4, c=1, h=8, w=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, c, h, w, generator=g, dtype=dtype) * 2 - 1


def test_translation_matches_its_definition():
    x = images(n=4, h=16, w=8)  # shifts up to round(16/8) = 2 rows and round(8/8) = 1 column
    dy, dx = torch.tensor([-2, 0, 1, 2]), torch.tensor([1, -1, 0, 1])
    out = augment.translation(x, (dy, dx))
    want = torch.full_like(x, -1.0)
    for n in range(4):
        for i in range(16):
            for j in range(8):
                si, sj = i - int(dy[n]), j - int(dx[n])
                if 0 <= si < 16 and 0 <= sj < 8:
                    want[n, :, i, j] = x[n, :, si, sj]
    assert torch.equal(out, want)


def test_random_translation_stays_within_an_eighth():
    x = images(n=64, h=16, w=16)
    out = augment.translation(x)
    found = set()
    for n in range(64):
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                if torch.equal(
                    out[n : n + 1], augment.translation(x[n : n + 1], (torch.tensor([dy]), torch.tensor([dx])))
                ):
                    found.add((dy, dx))
                    break
            else:
                continue
            break
        else:
            raise AssertionError(f"image {n} is no shift of at most 2 pixels of its input")
    assert len(found) > 5  # the shifts vary from image to image


def test_cutout_matches_its_definition():
    x = images(n=3, c=3, h=8, w=8)
    cy, cx = torch.tensor([0, 4, 7]), torch.tensor([3, 4, 8])  # side 4: corner at (c - 2)
    out = augment.cutout(x, (cy, cx))
    want = x.clone()
    for n in range(3):
        for i in range(8):
            for j in range(8):
                if int(cy[n]) - 2 <= i < int(cy[n]) + 2 and int(cx[n]) - 2 <= j < int(cx[n]) + 2:
                    want[n, :, i, j] = 0
    assert torch.equal(out, want)
    assert (augment.cutout(images(n=200)) == 0).any(dim=1).flatten(1).sum(1).le(16).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_color_matches_its_definition(channels):
    x = images(n=2, c=channels)
    # three different draws per image: an op that takes another's draw gives other pixels
    b, s, c = (torch.tensor(v, dtype=x.dtype).view(2, 1, 1, 1) for v in ([0.1, 0.9], [0.3, 0.8], [0.95, 0.2]))
    out = augment.color(x, (b, s, c))
    for n in range(2):
        y = x[n] + (b[n] - 0.5)
        if channels == 3:
            y = (y - y.mean(0)) * (2 * s[n]) + y.mean(0)
        y = (y - y.mean()) * (c[n] + 0.5) + y.mean()
        assert torch.allclose(out[n], y, rtol=0, atol=1e-12)


def test_ops_are_differentiable():
    x = images(n=2, c=3, h=8, w=8).requires_grad_(True)
    params = {
        "color": tuple(torch.tensor([0.3, 0.7], dtype=x.dtype).view(2, 1, 1, 1) for _ in range(3)),
        "translation": (torch.tensor([1, -1]), torch.tensor([0, 1])),
        "cutout": (torch.tensor([2, 5]), torch.tensor([6, 1])),
    }
    torch.manual_seed(0)
    for op in augment.GATED:  # StyleGAN2-ADA's ops: a fixed draw of their matrices
        params[op] = tuple(t.double() for t in augment.DRAWS[op](x, 1.0))
    for op, fn in augment.FUNCTIONS.items():
        assert torch.autograd.gradcheck(lambda t, fn=fn, op=op: fn(t, params[op]), (x,)), op
    ops = augment.parse("color,translation,cutout")
    augment.apply(ops, x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_identity_cases_and_probability():
    x = images(n=500, h=16, w=16, dtype=torch.float32)
    assert augment.apply((), x) is x
    assert torch.equal(augment.apply(augment.parse("color,translation,cutout"), x, p=0.0), x)
    torch.manual_seed(0)
    out = augment.apply(augment.parse("cutout"), x, p=0.25)
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert 0.18 < changed < 0.32, changed  # about a quarter of the images, each cut or not


@pytest.mark.parametrize("policy", ["crop", "color,color", "color translation"])
def test_bad_policy_is_refused(policy, capsys):
    with pytest.raises(UserError, match="data.augment"):
        augment.parse(policy)


def split_run_resumes_exactly(tmp_path, common, total, at):
    """Train `total` steps in one run and in two (`at`, then --resume auto): the final checkpoints
    are bitwise equal and the second run resumed from step `at`. Returns the full run's last step."""
    for out, steps, more in (("full", total, []), ("split", at, []), ("split", total, ["--resume", "auto"])):
        r = run_cli("train", *common, "--out", tmp_path / out, f"train.steps={steps}", *more)
        assert r.returncode == 0, r.stderr
    full, split = (tmp_path / d / "checkpoints" / f"step-{total:08d}" for d in ("full", "split"))
    assert_bitwise_equal(full, split)
    assert_resumed(tmp_path / "split", at)
    return full


@pytest.mark.slow  # 15 s; the adaptive-p resume test below runs the same ops and resumes bitwise
def test_training_with_augmentation_resumes_exactly(tmp_path, digits_shards):
    common = [*FAST, f"data.shards={digits_shards}", "data.augment=color,translation,cutout", "train.ckpt_every=1000"]
    split_run_resumes_exactly(tmp_path, common, total=6, at=3)
    # augmentation changes training: the same run without it ends elsewhere
    r = run_cli("train", *FAST, f"data.shards={digits_shards}", "--out", tmp_path / "plain", "train.steps=6")
    assert r.returncode == 0, r.stderr
    with pytest.raises(AssertionError):
        assert_bitwise_equal(
            tmp_path / "full" / "checkpoints" / "step-00000006", tmp_path / "plain" / "checkpoints" / "step-00000006"
        )


def test_augmentation_is_refused_where_unused(tmp_path, capsys):
    r = cli(capsys, "config", "--preset", "edges2photos-pix2pix", "data.augment=translation")
    assert r.returncode == 2 and "data.augment" in r.stderr, r.stderr


def test_adaptive_p_moves_toward_its_target_and_carries_its_state():
    ada = augment.Adaptive(target=0.6, interval=4, kimg=1.0)  # 1000 real images from p = 0 to 1
    for step in range(1, 9):  # D calls every real image real: r_t = 1 > 0.6, p rises
        ada.observe(torch.tensor([2.0, 1.0, 3.0, 0.5]), images=25)
        ada.update(step)
        assert float(ada.p) == pytest.approx(0.1 * (step // 4))  # 4 steps x 25 images / 1000, every 4 steps
    assert float(ada.r_t) == 1.0
    ada.observe(torch.tensor([1.0, -1.0, -2.0, float("nan")]), images=25)  # a partial interval, then saved
    copy = augment.Adaptive(target=0.6, interval=4, kimg=1.0)
    copy.load_state(ada.state(), "cpu")
    for a in (ada, copy):
        for step in range(10, 13):
            a.observe(torch.tensor([-1.0, -1.0, -1.0, 1.0]), images=25)
            a.update(step)
    assert float(ada.p) == float(copy.p) == pytest.approx(0.1)  # r_t = (-1 - 6) / 16 < 0.6: p fell back by 0.1
    for _ in range(40):  # never below 0
        ada.observe(torch.tensor([-1.0]), images=100)
        ada.update(4)
    assert float(ada.p) == 0.0


def test_adaptive_p_sums_over_ranks():
    ada = augment.Adaptive(target=0.6, interval=1, kimg=1.0)
    ada.observe(torch.tensor([1.0, 1.0]), images=2)  # this rank alone: r_t = 1
    ada.update(1, reduce=lambda t: t + torch.tensor([-2.0, 2.0, 2.0]))  # the other rank: two -1 logits
    assert float(ada.r_t) == 0.0 and float(ada.p) == 0.0  # (2 - 2) / 4 = 0 < 0.6: p stays at 0


def test_training_with_adaptive_p_resumes_exactly_and_saves_p(tmp_path, digits_shards):
    common = [
        *FAST,
        f"data.shards={digits_shards}",
        "data.augment=translation,cutout",
        "data.augment_p=auto",
        "data.augment_target=0.2",
        "train.ckpt_every=1000",
        "train.log_every=1",
    ]
    full = split_run_resumes_exactly(tmp_path, common, total=10, at=6)
    ps = [m["augment/p"] for m in read_metrics(tmp_path / "full") if "augment/p" in m]
    assert len(ps) == 10 and ps[0] == 0.0 and all(p >= 0 for p in ps)
    assert len(set(ps[i] for i in range(0, 10, 4))) > 1  # p moved (every 4 steps, by 16 * 4 / 500k)
    state = checkpoint.load(full).state
    assert state["variant.shared.augment_p"][0, 0].item() == pytest.approx(ps[-1])


# -- StyleGAN2-ADA's pipeline (data.augment=ada: ada-geometric, ada-color, cutout) -----------------------


def _only(monkeypatch, table: dict, name: str) -> None:
    """Every transform of `table` (augment.GEOMETRIC or COLOR) off but `name`, which is always on at p = 1."""
    for k in table:
        monkeypatch.setitem(table, k, 1.0 if k == name else 0.0)


def test_ada_geometric_transforms_match_their_definitions(monkeypatch):
    x = images(n=32, c=3, h=8, w=8, dtype=torch.float32)
    _only(monkeypatch, augment.GEOMETRIC, "xflip")
    out = augment.ada_geometric(x, augment.draw_ada_geometric(x, 1.0))
    flips = [torch.allclose(o, i, atol=1e-5) or torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    assert all(flips) and 0 < sum(torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)) < 32
    _only(monkeypatch, augment.GEOMETRIC, "rotate90")
    out = augment.ada_geometric(x, augment.draw_ada_geometric(x, 1.0))
    seen = set()
    for o, i in zip(out, x):
        k = [q for q in range(4) if torch.allclose(o, torch.rot90(i, q, dims=(1, 2)), atol=1e-5)]
        assert len(k) == 1
        seen.add(k[0])
    assert seen == {0, 1, 2, 3}
    _only(monkeypatch, augment.GEOMETRIC, "xint")  # a whole-pixel shift of at most 1/8 of the size
    x16 = images(n=16, c=1, h=16, w=16, dtype=torch.float32)
    (theta,) = augment.draw_ada_geometric(x16, 1.0)
    out = augment.ada_geometric(x16, (theta,))
    for o, i, t in zip(out, x16, theta):
        dx, dy = (round(float(v) * 8) for v in t[:, 2])  # [-1, 1] units -> pixels (size 16)
        assert abs(dx) <= 2 and abs(dy) <= 2
        inner = i[:, 3:13, 3:13]
        torch.testing.assert_close(o[:, 3 - dy : 13 - dy, 3 - dx : 13 - dx], inner, atol=1e-5, rtol=0)


def test_ada_color_transforms_match_their_definitions(monkeypatch):
    x = images(n=16, c=3, h=4, w=4, dtype=torch.float32)
    gray = x[:, :1].expand(-1, 3, -1, -1)
    _only(monkeypatch, augment.COLOR, "brightness")
    (c,) = augment.draw_ada_color(x, 1.0)
    torch.testing.assert_close(augment.ada_color(x, (c,)), x + c[:, :, 3, None, None])
    assert torch.equal(c[:, 0, 3], c[:, 1, 3]) and c[:, 0, 3].std() > 0.05  # the same shift on R, G, B
    _only(monkeypatch, augment.COLOR, "lumaflip")  # grey pixels flip sign, or stay
    out = augment.ada_color(gray, augment.draw_ada_color(gray, 1.0))
    signs = [torch.allclose(o, g, atol=1e-6) or torch.allclose(o, -g, atol=1e-6) for o, g in zip(out, gray)]
    assert all(signs)
    for name in ("hue", "saturation"):  # neither moves a grey pixel; both move colours
        _only(monkeypatch, augment.COLOR, name)
        torch.testing.assert_close(augment.ada_color(gray, augment.draw_ada_color(gray, 1.0)), gray, atol=1e-5, rtol=0)
        assert (augment.ada_color(x, augment.draw_ada_color(x, 1.0)) - x).abs().max() > 0.1
    _only(monkeypatch, augment.COLOR, "contrast")
    (c,) = augment.draw_ada_color(x, 1.0)
    torch.testing.assert_close(augment.ada_color(x, (c,)), x * c[:, 0, 0, None, None, None])
    one = images(n=16, c=1, h=4, w=4, dtype=torch.float32)  # one channel: the same contrast
    torch.testing.assert_close(augment.ada_color(one, (c,)), one * c[:, 0, 0, None, None, None])


def test_ada_pipeline_identity_replay_probability_and_double_derivative():
    ops = augment.parse("ada")
    assert ops == ("ada-geometric", "ada-color", "cutout")
    x = images(n=8, c=3, h=8, w=8)
    assert torch.equal(augment.apply(ops, x, 0.0), x)
    torch.manual_seed(0)
    draws = augment.draw(ops, x, 0.7)
    assert torch.equal(augment.apply(ops, x, 0.7, draws), augment.apply(ops, x, 0.7, draws))
    torch.manual_seed(0)
    assert torch.equal(augment.apply(ops, x, 0.7), augment.apply(ops, x, 0.7, draws))
    # a device p (ADA's adaptive) at 0 draws every gate off: the identity, to resampling's rounding
    torch.testing.assert_close(augment.apply(ops, x, torch.tensor(0.0, dtype=torch.float64)), x)
    # twice differentiable in the image: the exact R1 penalty through the pipeline, checked numerically
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    small = images(n=2, c=3, h=6, w=6)
    torch.manual_seed(1)
    small_draws = augment.draw(ops, small, 1.0)

    def d_of(img):
        return torch.nn.functional.conv2d(augment.apply(ops, img, 1.0, small_draws), w).tanh().sum()

    xi = small.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(d_of, (xi,), eps=1e-6, atol=1e-5)


def test_ada_multipliers_are_a_config_key_and_gate_each_transform():
    """data.ada_multipliers: everything off but brightness at p = 1 leaves brightness alone; a bad name or
    value is refused with the key named."""
    from distgan import config

    off = ",".join(f"{k}=0" for k in [*augment.GEOMETRIC, *augment.COLOR] if k != "brightness") + ",brightness=1"
    mult = augment.multipliers(off)
    x = images(n=16, c=3, h=4, w=4, dtype=torch.float32)
    torch.manual_seed(0)
    draws = augment.draw(augment.parse("ada-geometric,ada-color"), x, 1.0, mult)
    (theta,), (c,) = draws[0][1], draws[1][1]
    assert torch.equal(theta, torch.eye(3)[:2].expand(16, 2, 3))  # no geometric transform drawn on
    torch.testing.assert_close(augment.ada_color(x, (c,)), x + c[:, :, 3, None, None])  # brightness only
    assert c[:, 0, 3].abs().min() > 0  # ... on for every image
    assert augment.multipliers("")["brightness"] == 0.5 and augment.multipliers("hue=1")["hue"] == 1.0
    from distgan import variants  # the variant's draws follow the config key

    cfg = config.load_config(
        "digits-r3gan-net", None, ["data.augment=ada", "data.augment_p=1.0", f"data.ada_multipliers={off}"]
    )
    side = variants.get(cfg.variant.name)(cfg).side(x[:, :1], None)
    assert torch.equal(side.draws[0][1][0], torch.eye(3)[:2].expand(16, 2, 3))
    for bad in ("sharpness=1", "hue=-1", "hue=lots"):
        with pytest.raises(UserError, match="data.ada_multipliers"):
            config.load_config("digits-r3gan-net", None, [f"data.ada_multipliers={bad}"])
