"""Pix2Pix, CycleGAN and SRGAN: shards, models, losses, metrics, training, resume, DDP, CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_resumed, run_cli
from test_ddp import launch, read
from test_train import assert_bitwise_equal

from distgan import cli, config, step, trainer
from distgan.data import builtin, shards, stream
from distgan.errors import UserError
from distgan.metrics import image as im
from distgan.variants import get
from distgan.variants.cyclegan import ImagePool
from distgan.variants.translation import tiled

# Tiny models and few steps: these check plumbing and behaviour, not quality (benchmarks/image2image.py does).
TINY = {
    "edges2photos-pix2pix": ["data.batch_size=4", "model.g.width=8", "model.d.width=8"],
    "photos-srgan-x4": [
        "data.batch_size=4",
        "model.g.width=8",
        "model.g.blocks=1",
        "model.d.width=4",
        "variant.pretrain_steps=2",
    ],
    "cyclegan-digits-thin2thick": [
        "data.batch_size=2",
        "model.g.width=8",
        "model.g.blocks=1",
        "model.d.width=8",
        "variant.pool_size=3",
    ],
}
QUIET = ["train.log_every=1", "train.sample_every=1000", "tracking.wandb.mode=disabled"]


def tiny_config(preset, *extra):
    return config.load_config(preset, overrides=[*TINY[preset], *QUIET, *extra])


# -- metrics ----------------------------------------------------------------------------------
def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(0)
    y = torch.rand(3, 3, 40, 40, generator=g) * 2 - 1
    x = (y + 0.2 * torch.randn(3, 3, 40, 40, generator=g)).clamp(-1, 1)
    for i in range(3):
        a, b = ((x[i] + 1) / 2).permute(1, 2, 0).double().numpy(), ((y[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        assert im.psnr(x, y)[i].item() == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1), abs=1e-6)
        ref = structural_similarity(
            b, a, data_range=1, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert im.ssim(x, y)[i].item() == pytest.approx(ref, abs=1e-6)
    assert im.ssim(y, y).allclose(torch.ones(3, dtype=torch.float64))
    assert torch.isinf(im.psnr(y, y)).logical_not().all() and (im.psnr(y, y) > 100).all()


def test_sharper_images_have_more_gradient_energy_and_drawn_edges_are_found():
    photos = builtin._patches(4, 64, seed=5, heldout=False)
    x = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 127.5 - 1
    blurred = F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    assert (im.gradient_energy(blurred) < 0.8 * im.gradient_energy(x)).all()
    edge_maps = torch.from_numpy(builtin.edges(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert im.edge_f1(blurred, edge_maps).mean() < im.edge_f1(x, edge_maps).mean()


def test_edge_f1_against_hand_drawn_edge_maps():
    """A white 20x20 square on black, and edge maps drawn by hand (not by Canny): its outline gives
    F1 1; its top and bottom sides alone give recall 1 and precision 44/76 (of the 76 outline pixels,
    both rows and the 4 side pixels within the 1-pixel tolerance), F1 2P/(1+P) = 0.733; a small
    square's outline away from it gives 0."""
    img = -torch.ones(1, 1, 48, 48)
    img[..., 14:34, 14:34] = 1.0

    def outline(top, left, sides=("top", "bottom", "left", "right"), size=20):
        e = torch.ones(1, 1, 48, 48)  # white, edges black
        b, r = top + size - 1, left + size - 1
        rows = {"top": (top, slice(left, r + 1)), "bottom": (b, slice(left, r + 1))}
        cols = {"left": (slice(top, b + 1), left), "right": (slice(top, b + 1), r)}
        for side in sides:
            e[0, 0][rows.get(side) or cols[side]] = -1.0
        return e

    assert im.edge_f1(img, outline(14, 14)).item() == pytest.approx(1.0, abs=0.02)
    precision = 44 / 76
    half = im.edge_f1(img, outline(14, 14, ("top", "bottom"))).item()
    assert half == pytest.approx(2 * precision / (1 + precision), abs=0.03)
    assert im.edge_f1(img, outline(1, 1, size=10)).item() == 0.0  # edges where the image has none


def test_bicubic_round_trip_is_the_sr_baseline():
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    lr = im.downscale_bicubic(hr, 4)
    assert lr.shape == (2, 3, 8, 8) and im.upscale_bicubic(lr, 4).shape == hr.shape


@pytest.mark.parametrize("tile, overlap", [(16, 4), (12, 2), (64, 8)])
def test_tiled_upscaling_equals_the_whole_image(tile, overlap):
    x = torch.randn(1, 3, 37, 50)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)  # receptive field 1 pixel: within any overlap

    def fn(t):
        return F.interpolate(conv(t), scale_factor=2, mode="nearest")

    with torch.no_grad():
        assert torch.allclose(tiled(fn, x, tile, overlap, 2), fn(x), atol=1e-6)


# -- data -------------------------------------------------------------------------------------
def test_paired_shards_stream_input_and_target(tmp_path):
    train, held = builtin.edges2photos(n=12, n_heldout=3, size=64)
    manifest = shards.write_arrays(train, None, [], tmp_path / "p", source="test", maxcount=5, progress=False)
    assert manifest["kind"] == "paired" and manifest["input_shape"] == [64, 64, 1]
    assert manifest["image_shape"] == [64, 64, 3]
    src = stream.resolve(str(tmp_path / "p"))
    fields = {"image": ("target.png", 3), "input": ("input.png", 1)}
    got = stream.read_all(src, resolution=64, channels=3, fields=fields)
    assert got["input"].shape == (12, 1, 64, 64) and got["image"].shape == (12, 3, 64, 64)
    # the stored pairs come back as written (PNG is lossless), in order
    assert torch.equal(
        ((got["image"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1), torch.from_numpy(train["target"])
    )
    assert torch.equal(
        ((got["input"] + 1) * 127.5).round().byte().permute(0, 2, 3, 1), torch.from_numpy(train["input"])
    )
    batch = next(iter(stream.ShardStream(src.urls, batch_size=4, resolution=64, channels=3, seed=0, fields=fields)))
    assert batch["input"].shape == (4, 1, 64, 64) and batch["image"].shape == (4, 3, 64, 64)


def test_builtin_sets_hold_out_a_strip_of_every_photo_and_half_the_digits(monkeypatch):
    # a photo whose pixels say which column they come from: 200 columns, cut at 150
    column = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (120, 200, 3))
    monkeypatch.setattr(builtin, "_photo", lambda name: column)
    train, held = builtin._patches(300, 32, seed=0, heldout=False), builtin._patches(100, 32, seed=1, heldout=True)
    assert train.max() < 150 <= held.min()  # no held-out pixel is ever in a training patch
    assert train.min() == 0 and held.max() == 199  # and both parts are covered to their edges
    monkeypatch.undo()
    train, _ = builtin.edges2photos(n=50, n_heldout=20)
    # edges are black (0) on white (255)
    assert set(np.unique(train["input"])) <= {0, 255} and (train["input"] == 0).mean() < 0.5
    thin, _ = builtin.digits_domain(False)
    thick, _ = builtin.digits_domain(True)
    assert thin.shape[1:] == thick.shape[1:] == (32, 32, 1)
    assert thick.mean() > 1.3 * thin.mean()  # dilation thickens the strokes


def test_builtin_image2image_shards_have_a_heldout_folder(tmp_path):
    manifest = shards.write_builtin("digits-thick", tmp_path / "b", progress=False)
    assert manifest["heldout"] == "heldout" and manifest["count"] == 808
    held = stream.heldout_source(str(tmp_path / "b"))
    assert held is not None and stream.read_all(held, resolution=32, channels=1)["image"].shape == (90, 1, 32, 32)


# -- variants ---------------------------------------------------------------------------------
class Ctx:
    """A single-process StepContext stand-in: plain backward and step, global_step settable."""

    def __init__(self, step=0):
        self.global_step, self.nonfinite = step, []

    def micro(self, model, batches):
        yield from batches

    def backward(self, loss):
        loss.backward()

    def step(self, opt):
        opt.step()
        return True

    def unwrap(self, m):
        return m

    def frozen(self, m):
        return step.StepContext.frozen(self, m)


def test_pix2pix_l1_only_baseline_follows_the_l1_gradient_and_leaves_d_alone():
    cfg = tiny_config("edges2photos-pix2pix", "variant.gan_weight=0", "model.g.width=4")
    torch.manual_seed(0)
    v = get("pix2pix")(cfg)
    G, D = v.models["G"], v.models["D"]
    G.eval()  # no dropout, batch statistics fixed: the step is deterministic
    batch = {"input": torch.rand(2, 1, 64, 64) * 2 - 1, "image": torch.rand(2, 3, 64, 64) * 2 - 1}
    d_before = [p.clone() for p in D.parameters()]
    ref = (G(batch["input"]) - batch["image"]).abs().mean() * cfg.variant.l1_weight
    expected = torch.autograd.grad(ref, list(G.parameters()))
    v.optimizers["G"] = torch.optim.SGD(G.parameters(), lr=0.0)  # keep weights: compare gradients
    stats = v.train_step([batch], Ctx())
    assert stats["loss/l1"].item() == pytest.approx(ref.item() / cfg.variant.l1_weight, rel=1e-5)
    for p, g in zip(G.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(d_before, D.parameters()))  # gan_weight=0: D never trains


def test_pix2pix_d_sees_input_and_image_stacked():
    cfg = tiny_config("edges2photos-pix2pix")
    v = get("pix2pix")(cfg)
    assert v.models["D"].net[0].in_channels == 1 + 3
    stats = v.train_step([{"input": torch.rand(2, 1, 64, 64), "image": torch.rand(2, 3, 64, 64)}], Ctx())
    assert stats["loss/d"] > 0 and stats["loss/g"] > 0


def test_srgan_pretrains_on_pixels_then_adds_the_adversarial_loss():
    cfg = tiny_config("photos-srgan-x4", "variant.pretrain_steps=5")
    v = get("srgan")(cfg)
    batch = {"image": torch.rand(2, 3, 96, 96) * 2 - 1}
    d_before = [p.clone() for p in v.models["D"].parameters()]
    stats = v.train_step([batch], Ctx(step=0))
    assert stats["train/adversarial_phase"] == 0 and stats["loss/d"] == 0
    assert all(torch.equal(a, b) for a, b in zip(d_before, v.models["D"].parameters()))
    stats = v.train_step([batch], Ctx(step=5))
    assert stats["train/adversarial_phase"] == 1 and stats["loss/d"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(d_before, v.models["D"].parameters()))
    # random 64 x 64 HR crops, LR 16 x 16
    assert v.crop(batch["image"]).shape == (2, 3, 64, 64)
    assert v.models["G"](torch.zeros(1, 3, 16, 16)).shape == (1, 3, 64, 64)


def test_srgan_perceptual_loss_loads_a_torchvision_layout_vgg19(tmp_path):
    from distgan.models.image2image import VGG19, VGGFeatures

    state, ch, idx = {}, 3, 0  # torchvision's vgg19().features numbering: conv, relu (, pool)
    for v in VGG19:
        if v == "M":
            idx += 1
            continue
        state[f"features.{idx}.weight"] = torch.randn(v, ch, 3, 3) * 0.01
        state[f"features.{idx}.bias"] = torch.zeros(v)
        ch, idx = v, idx + 2
    state["classifier.0.weight"] = torch.zeros(1)  # ignored
    torch.save(state, tmp_path / "vgg19.pth")
    vgg = VGGFeatures(str(tmp_path / "vgg19.pth"))
    assert vgg(torch.zeros(1, 1, 32, 32)).shape == (1, 512, 2, 2)
    cfg = tiny_config("photos-srgan-x4", f"variant.vgg_weights={tmp_path / 'vgg19.pth'}", "variant.pretrain_steps=0")
    stats = get("srgan")(cfg).train_step([{"image": torch.rand(1, 3, 96, 96) * 2 - 1}], Ctx(step=1))
    assert stats["loss/vgg"] > 0
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not a torchvision VGG19"):
        VGGFeatures(str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="does not exist"):
        VGGFeatures(str(tmp_path / "missing.pth"))


def test_image_pool_fills_then_swaps_half_and_round_trips():
    torch.manual_seed(0)
    pool = ImagePool(4, (1, 2, 2))
    first = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    assert torch.equal(pool.query(first), first) and pool.count == 4
    new = torch.arange(100.0, 300.0).view(200, 1, 1, 1).expand(200, 1, 2, 2)
    out = pool.query(new)
    swapped = (out != new).flatten(1).any(1)
    assert 60 < swapped.sum().item() < 140  # about half of the images come from the buffer once it is full
    # what comes back is either the image itself or an earlier one (from the buffer)
    assert all(out[i, 0, 0, 0] < new[i, 0, 0, 0] for i in torch.nonzero(swapped).flatten())
    state = pool.state("p")
    other = ImagePool(4, (1, 2, 2))
    other.load(state, "p")
    assert torch.equal(other.images, pool.images) and other.count == 4
    assert torch.equal(ImagePool(0, (1, 2, 2)).query(new), new)  # pool_size 0: off


def test_cyclegan_losses_and_a_step():
    cfg = tiny_config("cyclegan-digits-thin2thick")
    v = get("cyclegan")(cfg)
    assert set(v.models) == {"G_ab", "G_ba", "D_a", "D_b"} and v.ema == ("G_ab", "G_ba")
    batch = {"image_a": torch.rand(2, 1, 32, 32) * 2 - 1, "image_b": torch.rand(2, 1, 32, 32) * 2 - 1}
    with torch.no_grad():
        a, b = batch["image_a"], batch["image_b"]
        m = v.models
        cycle = (m["G_ba"](m["G_ab"](a)) - a).abs().mean() + (m["G_ab"](m["G_ba"](b)) - b).abs().mean()
    stats = v.train_step([batch], Ctx())
    assert stats["loss/cycle"].item() == pytest.approx(cycle.item(), rel=1e-5)
    assert v.pools["a"].count == 2 and v.pools["b"].count == 2


@pytest.mark.parametrize(
    "preset, bad, match",
    [
        ("edges2photos-pix2pix", ["data.kind=images"], "needs paired shards"),
        ("cyclegan-digits-thin2thick", ["data.shards_b=''"], "needs both domains"),
        ("photos-srgan-x4", ["variant.crop=62"], "multiple of variant.scale"),
        ("photos-srgan-x4", ["model.g.arch=dcgan"], "model.g.arch"),
    ],
)
def test_bad_image2image_configs_say_what_to_fix(preset, bad, match):
    with pytest.raises(UserError, match=match):
        cfg = tiny_config(preset, *bad)
        get(cfg.variant.name)(cfg)


# -- training through the trainer -------------------------------------------------------------
# photos-srgan-x4 (34 s) in `make test-all`: pix2pix and cyclegan keep the path in `make test`
@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=pytest.mark.slow) if p == "photos-srgan-x4" else p for p in TINY]
)
def test_presets_train_resume_exactly_and_evaluate(tmp_path, preset):
    common = [*TINY[preset], *QUIET, "train.ckpt_every=1000"]
    # evaluation in the uninterrupted run only: it must not disturb training either
    full = config.load_config(preset, overrides=[*common, "train.steps=6", "train.eval_every=3"])
    assert trainer.train(full, tmp_path / "full") == 0
    assert trainer.train(config.load_config(preset, overrides=[*common, "train.steps=3"]), tmp_path / "split") == 0
    cfg = config.load_config(preset, overrides=[*common, "train.steps=6"])
    assert trainer.train(cfg, tmp_path / "split", resume="auto") == 0
    assert_resumed(tmp_path / "split", 3)
    assert_bitwise_equal(
        tmp_path / "full" / "checkpoints" / "step-00000006", tmp_path / "split" / "checkpoints" / "step-00000006"
    )
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if any(k.startswith("eval/") for k in x)]
    assert [x["step"] for x in evals] == [3, 6]
    key = "eval/cycle_error_a" if "cyclegan" in preset else "eval/psnr"
    assert all(np.isfinite(x[key]) for x in evals)
    assert (tmp_path / "full" / "samples" / "latest.png").is_file()
    # distgan eval on the checkpoint gives the same figures as the run logged
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--ckpt", str(tmp_path / "full"), "--json", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())[key.split("/")[1]] == pytest.approx(evals[-1][key], rel=1e-6)


def test_cyclegan_pools_are_saved_per_rank(tmp_path):
    cfg = tiny_config("cyclegan-digits-thin2thick", "train.steps=4")
    assert trainer.train(cfg, tmp_path / "run") == 0
    state, _ = read(tmp_path / "run" / "checkpoints" / "step-00000004" / "state.safetensors")
    assert state["variant.pool_a.images"].shape == (1, 3, 1, 32, 32)
    assert state["variant.pool_a.count"].tolist() == [[3]]
    assert state["data.a.positions"].shape == state["data.b.positions"].shape == (1, 1)


@pytest.mark.slow  # 16 s; 2-rank bitwise resume: tests/test_ddp.py in `make test`
def test_cyclegan_under_two_rank_ddp_resumes_bitwise(tmp_path):
    run = tmp_path / "run"
    common = [
        "--preset",
        "cyclegan-digits-thin2thick",
        *TINY["cyclegan-digits-thin2thick"],
        *QUIET,
        "train.ckpt_every=1000",
    ]
    r = launch(*common, "--out", run, "train.steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    # stopped at 2 and resumed: both domains' streams, per-rank pools and RNG continue exactly
    split = tmp_path / "split"
    for extra in (["train.steps=2"], ["train.steps=4", "--resume", "auto"]):
        r = launch(*common, "--out", split, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed(split, 2)
    assert_bitwise_equal(run / "checkpoints" / "step-00000004", split / "checkpoints" / "step-00000004")
    state, meta = read(run / "checkpoints" / "step-00000004" / "state.safetensors")
    assert len(meta["fingerprints"]) == 2 and meta["fingerprints"][0] == meta["fingerprints"][1]
    pools = state["variant.pool_a.images"]
    assert pools.shape == (2, 3, 1, 32, 32) and not torch.equal(pools[0], pools[1])  # each rank its own buffer
    for k in ("a", "b"):  # each domain's shards split between the ranks
        read_by = state[f"data.{k}.shards_read"].bool()
        assert read_by[0].any() and read_by[1].any() and not (read_by[0] & read_by[1]).any()


# -- the command line -------------------------------------------------------------------------
def test_sample_input_translates_files_and_folders(tmp_path, capsys):
    from PIL import Image

    sr = tmp_path / "sr"
    assert trainer.train(tiny_config("photos-srgan-x4", "train.steps=1"), sr) == 0
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(folder / "b.jpg")
    r = run_cli("sample", "--ckpt", sr, "--input", folder, "--out", tmp_path / "out")  # as a user runs it
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out" / "a.png").size == (280, 200)  # x4, tiled
    assert Image.open(tmp_path / "out" / "b.png").size == (120, 80)
    for args, message in [
        (["--input", folder / "a.png", "--out", tmp_path / "one.npy"], "must end in .png"),
        (["--input", tmp_path / "missing.png", "--out", tmp_path / "x.png"], "does not exist"),
        (["--input", folder, "--out", tmp_path / "x.png"], "must be a folder too"),
        (["--out", tmp_path / "x.png"], "--input"),
    ]:
        assert cli.main(["sample", "--ckpt", str(sr), *map(str, args)]) == 2
        assert message in capsys.readouterr().err


def test_shards_from_users_pairs_and_flat_folders(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "edges" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    pairs = {}
    for name in ("a", "b", "sub/c"):
        edge, photo = rng.integers(0, 256, (20, 24), np.uint8), rng.integers(0, 256, (20, 24, 3), np.uint8)
        Image.fromarray(edge).save(tmp_path / "edges" / f"{name}.png")
        Image.fromarray(photo).save(tmp_path / "photos" / f"{name}.png")
        pairs[name] = (edge, photo)
    out = tmp_path / "paired"
    assert (
        cli.main(["shards", "--pairs", str(tmp_path / "edges"), str(tmp_path / "photos"), "--out", str(out), "--rgb"])
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "paired" and manifest["count"] == 3
    assert manifest["input_shape"] == [20, 24, 1] and manifest["image_shape"] == [20, 24, 3]
    got = stream.read_all(
        stream.resolve(str(out)),
        resolution=20,
        channels=3,
        fields={"image": ("target.png", 3), "input": ("input.png", 1)},
    )
    assert got["image"].shape == (3, 3, 20, 20) and got["input"].shape == (3, 1, 20, 20)  # 20x24 resized
    # every sample holds its own input with its own target, losslessly (read with tarfile, not our reader)
    import io
    import tarfile

    members: dict = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    seen = set()
    for sample in members.values():
        name = json.loads(sample["json"])["file"]
        edge, photo = (np.asarray(Image.open(io.BytesIO(sample[f"{k}.png"]))) for k in ("input", "target"))
        assert np.array_equal(edge, pairs[name][0]) and np.array_equal(photo, pairs[name][1]), name
        seen.add(name)
    assert seen == set(pairs)
    # a missing partner is an error, not a silently dropped image
    (tmp_path / "photos" / "b.png").unlink()
    assert (
        cli.main(
            ["shards", "--pairs", str(tmp_path / "edges"), str(tmp_path / "photos"), "--out", str(tmp_path / "p2")]
        )
        == 2
    )
    assert "no partner, e.g. the input 'b'" in capsys.readouterr().err
    # images beside class subfolders would belong to no class: an error, not a silent drop
    assert cli.main(["shards", "--images", str(tmp_path / "photos"), "--out", str(tmp_path / "mixed")]) == 2
    assert "also images directly in it" in capsys.readouterr().err
    # a flat folder of images (SR, one CycleGAN domain): unlabelled shards
    assert (
        cli.main(["shards", "--images", str(tmp_path / "photos" / "sub"), "--out", str(tmp_path / "flat"), "--rgb"])
        == 0
    )
    flat = json.loads((tmp_path / "flat" / "manifest.json").read_text())
    assert flat["count"] == 1 and flat["classes"] == [] and flat["kind"] == "images"
