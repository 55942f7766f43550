"""Latent-space training (distgan/vae.py, distgan/data/latents.py): a random-weight AutoencoderKL saved in
diffusers' layout, `distgan shards --encode` (its latents, scaling, resume), training on the latent shards
(exact resume, the VAE frozen and never in a checkpoint), samples decoded by the VAE, and the refusals."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, assert_resumes_exactly, cli
from safetensors import safe_open

from distgan import vae as vae_module
from distgan.data import latents, shards

pytest.importorskip("diffusers")  # (in distgan[latent] and [dev]: the suite always has it)


def _vae(folder, seed=0, scaling=0.5, shift=0.1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(
        **{**vae_module.TINY_CONFIG, "block_out_channels": [8, 16], "norm_num_groups": 4},
        scaling_factor=scaling,
        shift_factor=shift,
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny VAE, 60 digits as a class-folder of PNGs, and their latent shards (16 px images -> 8x8x4)."""
    from PIL import Image

    from distgan.data import builtin

    root = tmp_path_factory.mktemp("latent")
    vae_dir = _vae(root / "vae")
    x, y, _ = builtin.load("digits")
    images = root / "images"
    for i in range(60):
        (images / str(y[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i][..., 0]).resize((16, 16), Image.NEAREST).save(images / str(y[i]) / f"{i:03d}.png")
    out = root / "shards"
    encode(vae_dir, images, out)
    return root, vae_dir, images, out


def encode(vae_dir, images, out, maxcount=16):
    source = latents.folder_samples(str(images), 16)
    return latents.encode(
        str(vae_dir), source, f"images:{images}", str(out), resolution=16, maxcount=maxcount, progress=False
    )


def test_encode_writes_normalised_latents_and_the_vaes_identity(setup):
    root, vae_dir, images, out = setup
    manifest = shards.read_manifest(out)
    assert manifest["kind"] == "latents" and manifest["count"] == 60
    assert manifest["image_shape"] == [8, 8, 4] and manifest["image_resolution"] == 16
    assert manifest["vae"] == vae_module.identity(str(vae_dir))
    assert manifest["vae"]["scaling_factor"] == 0.5 and manifest["vae"]["shift_factor"] == pytest.approx(0.1)
    assert len(manifest["shards"]) == 4  # 16 + 16 + 16 + 12
    from distgan.data import tarstream

    first = next(tarstream.samples([str(out / manifest["shards"][0])], select=lambda n: True, max_member=1 << 20))
    z = np.load(io.BytesIO(first["npy"]))
    assert z.dtype == np.float16 and z.shape == (4, 8, 8)
    # the latent is (posterior mean - shift) * scale of the image, gray put in all three channels
    from PIL import Image

    vae = vae_module.VAE(str(vae_dir))
    path = sorted((images / first["cls"].decode()).glob("*.png"))[0]
    img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    img = img[None] / 127.5 - 1
    mean = vae.model.encode(img).latent_dist.mean
    torch.testing.assert_close(torch.from_numpy(z.astype(np.float32))[None], (mean - 0.1) * 0.5, atol=2e-3, rtol=2e-3)
    # decoding undoes the normalisation: decode(encode(x)) is the VAE's own reconstruction of x
    recon = vae.model.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(vae.encode(img)), recon, atol=1e-5, rtol=1e-5)


def test_an_interrupted_encode_goes_on_after_its_last_complete_shard(setup, tmp_path):
    root, vae_dir, images, out = setup
    again = tmp_path / "again"
    again.mkdir()
    # what an encode killed while writing its third shard leaves: two shards, a partial one, the progress
    for name in shards.read_manifest(out)["shards"][:2]:
        (again / name).write_bytes((out / name).read_bytes())
    (again / ".latents-000002.tar.incomplete").write_bytes(b"partial")
    settings = {"source": f"images:{images}", "vae": vae_module.identity(str(vae_dir))["sha256"]}
    settings |= {"resolution": 16, "maxcount": 16, "flips": False, "done_shards": 2}
    (again / latents.PROGRESS).write_text(json.dumps(settings))
    encode(vae_dir, images, again)
    for name in shards.read_manifest(out)["shards"]:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert not (again / latents.PROGRESS).exists() and not list(again.glob(".*.incomplete"))
    # other settings are refused rather than mixed into the same folder
    (again / "manifest.json").unlink()
    (again / latents.PROGRESS).write_text(json.dumps({**settings, "maxcount": 8}))
    with pytest.raises(Exception, match="interrupted encode with other settings"):
        encode(vae_dir, images, again)


LATENT_RUN = [
    "--preset",
    "digits-gat-latent",
    "data.resolution=8",
    "data.batch_size=8",
    "data.num_workers=0",
    *TINY_VIT,
    "train.log_every=1",
    "train.sample_every=3",
    "train.n_samples=10",
    "train.ckpt_every=1000",
    "tracking.wandb.mode=disabled",
]


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "ram-cache"])
def test_training_on_latents_resumes_bitwise_decodes_samples_and_never_saves_the_vae(setup, tmp_path, capsys, cache):
    root, vae_dir, images, out = setup
    common = [*LATENT_RUN, f"data.shards={out}", f"model.vae={vae_dir}"]
    if cache:  # the RAM cache keeps decoded latents: the resume must stay exact with it
        common.append("data.cache=ram")
    before = {k: v.clone() for k, v in vae_module.VAE(str(vae_dir)).model.state_dict().items()}
    step6, _ = assert_resumes_exactly(capsys, common, tmp_path, 3, 6)
    for f in step6.glob("*.safetensors"):  # G, D, EMA, optimizers: nothing of the VAE
        with safe_open(f, "pt") as st:
            assert not [k for k in st.keys() if "decoder" in k or "encoder" in k or "quant" in k], f
    after = vae_module.VAE(str(vae_dir)).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the file is untouched
    # the grid and `distgan sample` show decoded images: 3 channels at the VAE's 16 px
    from PIL import Image

    grid = Image.open(tmp_path / "full" / "samples" / "latest.png")
    assert grid.mode == "RGB"
    res = cli(capsys, "sample", "--ckpt", tmp_path / "full", "--n", "4", "--out", tmp_path / "s.png")
    assert res.returncode != 0 and "model.vae" in res.stderr  # a file key: never taken from the checkpoint
    res = cli(
        capsys, "sample", "--ckpt", tmp_path / "full", "--n", "4", "--out", tmp_path / "s.png", f"model.vae={vae_dir}"
    )
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "s.png").mode == "RGB"


def test_another_vae_or_a_missing_one_is_refused_with_one_line(setup, tmp_path, capsys):
    root, vae_dir, images, out = setup
    other = _vae(tmp_path / "other", seed=1)
    res = cli(capsys, "train", *LATENT_RUN, f"data.shards={out}", f"model.vae={other}", "--out", tmp_path / "r")
    assert res.returncode == 2 and "is not the VAE that encoded the shards: its sha256" in res.stderr
    res = cli(
        capsys, "train", *LATENT_RUN, f"data.shards={out}", f"model.vae={tmp_path / 'nope'}", "--out", tmp_path / "r"
    )
    assert res.returncode == 2 and "does not exist: give a diffusers AutoencoderKL folder" in res.stderr
    res = cli(capsys, "train", *LATENT_RUN, f"data.shards={out}", "model.vae=", "--out", tmp_path / "r")
    assert res.returncode == 2 and "data.kind=latents needs model.vae" in res.stderr
    res = cli(
        capsys,
        "train",
        *LATENT_RUN,
        f"data.shards={out}",
        f"model.vae={vae_dir}",
        "data.resolution=16",
        "--out",
        tmp_path / "r",
    )
    assert res.returncode == 2 and "hold latents of shape (8, 8, 4)" in res.stderr


def test_inception_metrics_of_a_latent_run_decode_its_samples_against_the_images_statistics(setup, tmp_path, capsys):
    from test_inception import TinyNvidiaFile

    root, vae_dir, images, out = setup
    net = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyNvidiaFile(0)), str(net))
    run = tmp_path / "run"
    common = [*LATENT_RUN, f"data.shards={out}", f"model.vae={vae_dir}", "train.steps=2"]
    assert cli(capsys, "train", *common, "--out", run).returncode == 0
    image_shards = tmp_path / "image-shards"
    shards.write_folder(str(images), image_shards, rgb=True, progress=False)
    ref = tmp_path / "ref.npz"
    res = cli(capsys, "stats", "--shards", image_shards, "--inception", net, "--out", ref)
    assert res.returncode == 0, res.stderr
    evaluate = ["eval", "--ckpt", run, "--inception", net, "--n", "20", "--metrics", "fid", f"model.vae={vae_dir}"]
    res = cli(capsys, *evaluate, "--ref", ref, "--json", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["fid"] > 0 and np.isfinite(result["fid"])
    res = cli(capsys, *evaluate, f"data.shards={out}")  # latent shards hold no images to take statistics from
    assert res.returncode == 2 and "latent shards hold no images" in res.stderr


def test_alignment_reads_the_images_kept_beside_the_latents(setup, tmp_path, capsys):
    """`--keep-images` stores each encoded image as KEY.png; the stream reads it into the batch's "raw"
    for model.align.encoder, and shards without images are refused in one line."""
    from PIL import Image
    from test_align import meta_state

    from distgan.data import stream

    root, vae_dir, images, out = setup
    kept = tmp_path / "kept"
    source = latents.folder_samples(str(images), 16)
    manifest = latents.encode(
        str(vae_dir), source, "images", str(kept), resolution=16, maxcount=16, keep_images=True, progress=False
    )
    assert manifest["images"] is True
    urls = sorted(str(p) for p in kept.glob("*.tar"))
    ds = stream.ShardStream(urls[:1], batch_size=4, resolution=8, channels=4, seed=0, latents=True, raw_resolution=16)
    batch = next(iter(ds))
    assert batch["image"].shape == (4, 4, 8, 8) and batch["raw"].shape == (4, 3, 16, 16)
    first, _ = next(iter(latents.folder_samples(str(images), 16)[0]))  # the first image, as it was encoded
    with tarfile.open(urls[0]) as tar:
        png = tar.extractfile("00000000.png").read()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), first)
    assert batch["raw"].min() >= -1 and batch["raw"].max() <= 1
    enc = tmp_path / "dinov2.pth"
    torch.save(meta_state(), enc)
    common = [
        *LATENT_RUN,
        f"model.vae={vae_dir}",
        f"model.align.encoder={enc}",
        "model.align.resolution=28",
        "model.align.proj_dim=16",
        "train.steps=2",
    ]
    res = cli(capsys, "train", *common, f"data.shards={kept}", "--out", tmp_path / "r")
    assert res.returncode == 0, res.stderr
    from conftest import read_metrics

    assert [r["loss/align"] for r in read_metrics(tmp_path / "r") if "loss/align" in r]
    res = cli(capsys, "train", *common, f"data.shards={out}", "--out", tmp_path / "r2")
    assert res.returncode == 2 and "encode them with `distgan shards --encode VAE ... --keep-images`" in res.stderr


def test_posterior_latents_are_drawn_from_the_stored_std_and_resume_exactly(setup, tmp_path, capsys):
    """`--posterior` stores each latent's posterior std (KEY.std.npy, normalised as the mean);
    data.posterior=true reads mean + std * eps with eps fixed by (seed, rank, worker, position), so two
    streams draw the same and a resumed run is bitwise the uninterrupted one (with the RAM cache too);
    shards without the std are refused in one line."""
    from distgan.data import stream, tarstream

    root, vae_dir, images, out = setup
    post = tmp_path / "post"
    source = latents.folder_samples(str(images), 16)
    manifest = latents.encode(
        str(vae_dir), source, "images", str(post), resolution=16, maxcount=16, posterior=True, progress=False
    )
    assert manifest["posterior"] is True and shards.read_manifest(out)["posterior"] is False
    first = next(tarstream.samples([str(post / manifest["shards"][0])], select=lambda n: True, max_member=1 << 20))
    plain = next(tarstream.samples([str(out / manifest["shards"][0])], select=lambda n: True, max_member=1 << 20))
    assert first["npy"] == plain["npy"]  # the mean, as without --posterior
    std = np.load(io.BytesIO(first["std.npy"]))
    assert std.dtype == np.float16 and std.shape == (4, 8, 8)
    from PIL import Image

    path = sorted((images / first["cls"].decode()).glob("*.png"))[0]
    img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    want = vae_module.VAE(str(vae_dir)).model.encode(img / 127.5 - 1).latent_dist.std * 0.5
    torch.testing.assert_close(torch.from_numpy(std.astype(np.float32))[None], want, atol=2e-3, rtol=2e-3)

    urls = sorted(str(p) for p in post.glob("*.tar"))

    def first_batch(posterior):
        ds = stream.ShardStream(
            urls, batch_size=16, resolution=8, channels=4, seed=0, latents=True, posterior=posterior
        )
        return next(iter(ds))

    drawn, again, means = first_batch(True), first_batch(True), first_batch(False)
    assert torch.equal(drawn["image"], again["image"]) and torch.equal(drawn["label"], means["label"])

    # (mean + std * eps - mean) / std: standard normal draws
    def load(member):
        return np.load(io.BytesIO(member)).astype(np.float32)

    every = tarstream.samples(urls, select=lambda n: True, max_member=1 << 20)
    std_of = {load(s["npy"]).tobytes(): load(s["std.npy"]) for s in every}  # each sample's std, by its mean
    stds = torch.from_numpy(np.stack([std_of[m.numpy().tobytes()] for m in means["image"]]))
    eps = (drawn["image"] - means["image"]) / stds
    assert abs(eps.mean().item()) < 0.15 and 0.85 < eps.std().item() < 1.15

    common = [*LATENT_RUN, f"data.shards={post}", f"model.vae={vae_dir}", "data.posterior=true", "data.cache=ram"]
    from distgan import config

    cfg = config.load_config("digits-gat-latent", None, common[2:])
    assert (
        stream.from_config(cfg, urls, seed=0).posterior
        and not stream.from_config(cfg, urls, seed=0, fixed=True).posterior
    )
    assert_resumes_exactly(capsys, common, tmp_path / "run", 3, 6)
    res = cli(capsys, "train", *LATENT_RUN, f"data.shards={out}", f"model.vae={vae_dir}", "data.posterior=true")
    assert res.returncode == 2 and "--posterior" in res.stderr and res.stderr.count("\n") == 1
    res = cli(capsys, "shards", "--builtin", "digits", "--out", tmp_path / "img", "--posterior")
    assert res.returncode == 2 and "--posterior: for latent shards only (with --encode VAE)" in res.stderr
