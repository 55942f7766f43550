"""The standard metrics without the real weights: both Inception file formats (random weights),
the preprocessing, FID/KID/IS/precision-recall against independent formulas, cached reference
statistics, `distgan eval --inception` and `distgan stats`, and a 2-rank eval."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, run_main

from distgan.errors import UserError
from distgan.metrics import fid, inception, kid, standard
from distgan.metrics.inception_score import inception_score
from distgan.metrics.precision_recall import precision_recall


def random_inception(seed: int = 0) -> inception.FIDInception3:
    """pytorch-fid's architecture with random weights whose activations stay O(1) through its 94
    layers (the default init shrinks them to ~1e-8), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    net = inception.FIDInception3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=g))
        net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g) * 0.05)
        net.fc.bias.copy_(torch.randn(net.fc.bias.shape, generator=g))
    return net.eval()


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of a bilinear resize along one axis: half-pixel centres, edge
    clamped, no antialias; written from the formula, not with F.interpolate."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0.double()
    rows = torch.arange(n_out)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((rows, i0), 1 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m


class NvidiaInterface(torch.nn.Module):
    """The calling convention of NVIDIA's inception-2015-12-05.pt (stylegan2-ada-pytorch's metrics):
    uint8 NCHW of any size in, resized inside; return_features=True gives the 2048 pool features,
    no_output_bias=True the softmax over 1008 classes without the output bias. Its resize and input
    scaling are written here, independently of distgan's preprocess_pytorch_fid (two float64 matrix
    products); the network is the same weights in the same architecture by construction (NVIDIA's real
    file cannot be had here), so what the two formats must agree on is everything around it: loading,
    dispatch, preprocessing and outputs."""

    def __init__(self, net: inception.FIDInception3):
        super().__init__()
        self.net = net

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        x = img.double() / 255.0
        x = resize_matrix(x.shape[2], 299) @ x @ resize_matrix(x.shape[3], 299).t()
        feats = self.net.pool_features((x * 2 - 1).float())
        if return_features:
            return feats
        logits = feats @ self.net.fc.weight.T
        if not no_output_bias:
            logits = logits + self.net.fc.bias
        return F.softmax(logits, dim=1)


class TinyNvidiaFile(torch.nn.Module):
    """A stand-in with NVIDIA's calling convention and outputs (2048 non-negative features, a softmax
    over 1008 classes) but a few cheap layers at 32 x 32: the CLI, training and two-rank tests go
    through the same loading and evaluation code as with the real file, at a hundredth of the cost of
    the 299 x 299 graph (which test_both_file_formats_... runs)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Parameter(torch.randn(16, 3, 3, 3, generator=g) * 0.4)
        self.c2 = torch.nn.Parameter(torch.randn(32, 16, 3, 3, generator=g) * 0.15)
        self.proj = torch.nn.Parameter(torch.randn(32 * 16, 2048, generator=g) * 0.05)
        self.fc = torch.nn.Parameter(torch.randn(2048, 1008, generator=g) * 0.05)
        self.bias = torch.nn.Parameter(torch.randn(1008, generator=g))

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        x = F.interpolate(img.float() / 255.0, size=(32, 32), mode="bilinear", align_corners=False) * 2 - 1
        x = F.relu(F.conv2d(x, self.c1, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.c2, stride=2, padding=1))
        feats = F.relu(F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj)
        if return_features:
            return feats
        logits = feats @ self.fc
        if not no_output_bias:
            logits = logits + self.bias
        return F.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-inception") / "tiny.pt"
    torch.jit.save(torch.jit.script(TinyNvidiaFile(0)), str(path))
    return path


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """The same random weights as pytorch-fid's state dict and as an NVIDIA-style TorchScript file."""
    folder = tmp_path_factory.mktemp("inception")
    net = random_inception(0)
    torch.save(net.state_dict(), folder / "pt_inception.pth")
    torch.jit.save(torch.jit.script(NvidiaInterface(net)), str(folder / "inception.pt"))
    return folder / "pt_inception.pth", folder / "inception.pt"


def test_both_file_formats_load_by_content_and_give_the_same_features(weight_files, tmp_path):
    sd_path, ts_path = weight_files
    # the names say nothing: swap the suffixes
    (tmp_path / "a.pt").write_bytes(sd_path.read_bytes())
    (tmp_path / "b.pth").write_bytes(ts_path.read_bytes())
    a, b = inception.FeatureNet(tmp_path / "a.pt"), inception.FeatureNet(tmp_path / "b.pth")
    assert (a.kind, b.kind) == ("pytorch-fid", "nvidia-torchscript")
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    fa, la = a(images)
    fb, pb = b(images)
    assert fa.shape == fb.shape == (3, 2048) and la.shape == pb.shape == (3, 1008)
    assert fa.std() > 0.05  # not vanishing: the comparison below means something
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)
    # the pytorch-fid path's logits (without bias) and the TorchScript path's softmax agree
    e = np.exp(la - la.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), pb, rtol=1e-3, atol=1e-6)
    assert a.digest == inception.file_digest(sd_path) and len(a.digest) == 64
    # larger than 299: a downscale, where an antialiased resize would differ
    big = torch.randint(0, 256, (1, 3, 331, 347), dtype=torch.uint8)
    np.testing.assert_allclose(a(big, outputs=False)[0], b(big, outputs=False)[0], rtol=1e-4, atol=1e-5)


def test_to_uint8_rounds_half_up_and_clamps():
    k = torch.arange(256, dtype=torch.float32)
    x = (k / 127.5 - 1).view(1, 1, 16, 16)  # exactly the uint8 values a decoded PNG gives
    assert torch.equal(inception.to_uint8(x)[0, 0].flatten().long(), k.long())
    assert inception.to_uint8(x).shape == (1, 3, 16, 16)  # grayscale repeated to RGB
    y = torch.tensor([-2.0, -1.0, 1.0, 3.0, (0.5 + 0.5) / 127.5 - 1, (10.49) / 127.5 - 1]).view(1, 1, 1, 6)
    assert inception.to_uint8(y.expand(1, 3, 1, 6))[0, 0, 0].tolist() == [0, 0, 255, 255, 1, 10]
    with pytest.raises(UserError, match="1- or 3-channel"):
        inception.to_uint8(torch.zeros(1, 2, 4, 4))


def _bilinear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """Bilinear resize, half-pixel centres (align_corners=False), edge-clamped, no antialias: written
    out per output pixel."""
    h, w = img.shape
    res = np.empty((out, out))
    for i in range(out):
        sy = max((i + 0.5) * h / out - 0.5, 0.0)
        y0 = min(int(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out):
            sx = max((j + 0.5) * w / out - 0.5, 0.0)
            x0 = min(int(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            res[i, j] = top * (1 - fy) + bottom * fy
    return res


def test_pytorch_fid_preprocessing_is_a_bilinear_resize_of_x_over_255_then_2x_minus_1():
    img = torch.randint(0, 256, (1, 3, 17, 23), dtype=torch.uint8)
    got = inception.preprocess_pytorch_fid(img)
    assert got.shape == (1, 3, 299, 299)
    want = 2 * _bilinear_reference(img[0, 1].double().numpy() / 255.0, 299) - 1
    np.testing.assert_allclose(got[0, 1].double().numpy(), want, atol=1e-5)
    # a 299 x 299 input is not resized
    same = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(inception.preprocess_pytorch_fid(same), same.float() / 127.5 - 1)


def test_wrong_or_missing_weights_files_give_a_clear_error(tmp_path, weight_files):
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth") as e:
        inception.resolve_path(str(tmp_path / "nope.pth"))
    assert "inception-2015-12-05.pt" in str(e.value) and "does not exist" in str(e.value)
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(UserError, match="neither NVIDIA's TorchScript file nor a readable state dict"):
        inception.FeatureNet(tmp_path / "text.pth")
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="not pytorch-fid's FID Inception state dict: missing Conv2d_1a_3x3"):
        inception.FeatureNet(tmp_path / "other.pth")
    sd = torch.load(weight_files[0], weights_only=True)
    sd["fc.weight"] = sd["fc.weight"][:1000]  # torchvision's 1000-class Inception, not the FID graph's 1008
    torch.save(sd, tmp_path / "tv.pth")
    with pytest.raises(UserError, match="size mismatch"):
        inception.FeatureNet(tmp_path / "tv.pth")
    wrong = torch.jit.script(torch.nn.Linear(3, 4))
    torch.jit.save(wrong, str(tmp_path / "wrong.pt"))
    with pytest.raises(UserError, match="fails on a 299x299 image"):
        inception.FeatureNet(tmp_path / "wrong.pt")


# -- the scores against independent formulas ---------------------------------------------------


def test_fid_is_zero_for_identical_sets_and_matches_the_eigenvalue_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    assert abs(fid.fid(a, a)) < 1e-8
    b = rng.standard_normal((400, 6)) * 2 + 1
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a.T), np.cov(b.T)
    # tr (S1 S2)^(1/2) = sum of the square roots of the eigenvalues of S1 S2 (real and >= 0)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    want = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.fid(a, b) == pytest.approx(want, rel=1e-8)
    # and pytorch-fid's form, scipy's sqrtm of the product
    from scipy import linalg

    sqrtm_form = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid.fid(a, b) == pytest.approx(sqrtm_form, rel=1e-10)


def test_kid_is_unbiased_on_two_samples_of_one_gaussian_and_matches_the_mmd_formula():
    rng = np.random.default_rng(1)
    # unbiased: over independent pairs of samples of one Gaussian, the mean is zero within 3 standard
    # errors; the biased estimate (the kernel's diagonal kept) is not
    trials = [(rng.standard_normal((30, 5)), rng.standard_normal((30, 5))) for _ in range(400)]
    est = np.array([kid.kid(a, b, subsets=1, size=30) for a, b in trials])
    se = est.std() / np.sqrt(len(est))
    assert abs(est.mean()) < 3 * se

    def biased(a, b):
        k = lambda u, v: (u @ v.T / 5 + 1) ** 3  # noqa: E731
        return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()

    assert np.mean([biased(a, b) for a, b in trials]) > 10 * se
    a, b = trials[0]
    assert kid.kid(a, b + 1.0, subsets=5, size=30) > 10 * se
    # one subset holding everything, written out pair by pair
    x, y = a[:20], b[:30] + 0.3
    k = lambda u, v: (u @ v / 5 + 1) ** 3  # noqa: E731
    m = 20
    y = y[:m]
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert kid.kid(x, y, subsets=1, size=m) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_inception_score_of_constant_logits_is_one_and_of_confident_balanced_classes_is_their_number():
    assert inception_score(np.zeros((100, 1008))) == pytest.approx((1.0, 0.0))
    logits = np.full((1000, 10), -50.0)
    logits[np.arange(1000), np.arange(1000) % 10] = 50.0  # each split holds every class equally
    mean, std = inception_score(logits)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    # from probabilities, against exp(E KL) written out for one split
    p = np.random.default_rng(2).dirichlet(np.ones(7), size=40)
    want = np.exp(np.mean([(q * np.log(q / p.mean(0))).sum() for q in p]))
    assert inception_score(p, splits=1, logits=False)[0] == pytest.approx(want, rel=1e-10)


def test_precision_recall_match_a_brute_force_knn_computation():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((60, 4))
    fake = rng.standard_normal((50, 4)) * 1.5 + 0.7
    k = 3

    def brute(ref, pts):
        d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=2)
        radii = np.sort(d_ref, axis=1)[:, k]  # [:, 0] is the point itself
        d = np.linalg.norm(pts[:, None] - ref[None], axis=2)
        return np.mean([(d[i] <= radii).any() for i in range(len(pts))])

    precision, recall = precision_recall(real, fake, k=k, batch=7)
    assert precision == pytest.approx(brute(real, fake)) and recall == pytest.approx(brute(fake, real))
    assert 0 < precision < 1 and 0 < recall < 1
    assert precision_recall(real, real.copy()) == (1.0, 1.0)


# -- reference statistics and the CLI ----------------------------------------------------------


@pytest.fixture()
def small_shards(tmp_path):
    from distgan.data import shards

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    shards.write_arrays(x, None, [], tmp_path / "s", source="test", maxcount=5, progress=False)
    return tmp_path / "s"


def test_reference_stats_are_cached_and_recomputed_when_a_shard_changes(tiny_file, small_shards, tmp_path):
    from distgan.data import shards

    net = inception.FeatureNet(tiny_file)
    kw = dict(resolution=16, channels=1, net=net, split=standard.Split(chunk=4), progress=False)
    first, origin = standard.reference_stats(str(small_shards), **kw)
    assert origin.startswith("computed, cached in ") and first.n == 10 and first.features.shape == (10, 2048)
    cached = origin.split(" ")[-1]
    again, origin2 = standard.reference_stats(str(small_shards), **kw)
    assert origin2 == f"cached {cached}"
    np.testing.assert_array_equal(again.sigma, first.sigma)
    # the same statistics as features computed directly, in one batch
    direct = net(inception.to_uint8(torch.from_numpy(np.stack(list(_images(small_shards)))).float() / 127.5 - 1))[0]
    np.testing.assert_allclose(first.mu, direct.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    # a rewritten shard set (other pixels, same names): a new key, recomputed
    x = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    shards.write_arrays(x, None, [], small_shards, source="test", maxcount=5, progress=False, overwrite=True)
    third, origin3 = standard.reference_stats(str(small_shards), **kw)
    assert origin3.startswith("computed, cached in ") and origin3.split(" ")[-1] != cached
    assert not np.allclose(third.mu, first.mu)
    # the first N only: another key
    _, origin4 = standard.reference_stats(str(small_shards), limit=6, **kw)
    assert origin4.startswith("computed") and standard.reference_stats(str(small_shards), limit=6, **kw)[0].n == 6


def _images(folder):
    import io
    import tarfile

    from PIL import Image

    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    yield np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))[None]


def test_stats_files_round_trip_and_pytorch_fid_layout_gives_fid_only(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((30, 2048)).astype(np.float32)
    ref = standard.RefStats.of(feats, {"shards": "x"})
    ref.save(tmp_path / "ours.npz")
    back = standard.RefStats.load(tmp_path / "ours.npz")
    assert back.n == 30 and back.meta == {"shards": "x"}
    np.testing.assert_array_equal(back.features, feats)
    np.savez(tmp_path / "pytorch_fid.npz", mu=ref.mu, sigma=ref.sigma)
    only = standard.RefStats.load(tmp_path / "pytorch_fid.npz")
    fake = rng.standard_normal((30, 2048)).astype(np.float32)
    out = standard.compute(fake, np.zeros((30, 1008)), only, ["fid", "kid", "pr"], probabilities=False)
    assert out["fid"] == pytest.approx(standard.compute(fake, None, back, ["fid"], False)["fid"])
    assert "kid" not in out and "mu and sigma" in out["missing"]
    np.savez(tmp_path / "bad.npz", m=ref.mu)
    with pytest.raises(UserError, match="no 'mu' and 'sigma'"):
        standard.RefStats.load(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_shards):
    from distgan.cli import main

    run = tmp_path_factory.mktemp("inc-run") / "run"
    code = main(
        ["train", "--preset", "digits-cgan", *FAST, f"data.shards={digits_shards}", "--out", str(run), "train.steps=1"]
    )
    assert code == 0
    return run


def test_eval_with_inception_reports_every_standard_metric_with_its_n(
    weight_files, tiny_file, digits_run, digits_shards, tmp_path, capsys
):
    # in this process (the CLI's own code, without a process start per command)
    code, out, err = run_main(
        capsys,
        "eval",
        "--ckpt",
        digits_run,
        "--inception",
        tiny_file,
        "--n",
        "12",
        "--ref-n",
        "16",
        "--chunk",
        "8",
        "--json",
        tmp_path / "e.json",
        f"data.shards={digits_shards}",
    )
    assert code == 0, err[-3000:]
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["n"] == 12 and res["n_ref"] == 16 and res["pr_n"] == 12 and res["kid_subsets"] == "100 of 12"
    for k in ("fid", "kid", "is", "precision", "recall", "digits"):
        assert k in res, k
    assert res["fid"] > 0 and 1 <= res["is"] <= 1008 and 0 <= res["precision"] <= 1
    assert "nvidia-torchscript" in res["feature_space"] and "one process, in chunks of 8" in res["computed"]
    assert "fid" in out and "precision" in out
    # the same reference from `distgan stats`, written elsewhere: the same numbers
    code, out, err = run_main(
        capsys,
        "stats",
        "--shards",
        digits_shards,
        "--inception",
        tiny_file,
        "--resolution",
        "16",
        "--channels",
        "1",
        "--n",
        "16",
        "--out",
        tmp_path / "ref.npz",
    )
    assert code == 0 and "reference statistics of 16 images" in out, err[-2000:]
    code, out, err = run_main(
        capsys,
        "eval",
        "--ckpt",
        digits_run,
        "--inception",
        tiny_file,
        "--ref",
        tmp_path / "ref.npz",
        "--n",
        "12",
        "--chunk",
        "8",
        "--metrics",
        "fid,is",
        "--json",
        tmp_path / "f.json",
    )
    # (no data.shards: with --ref the training shards are not read)
    assert code == 0, err[-3000:]
    other = json.loads((tmp_path / "f.json").read_text())
    assert other["fid"] == pytest.approx(res["fid"], rel=1e-6) and other["is"] == pytest.approx(res["is"], rel=1e-6)
    # pytorch-fid's file through the CLI: the full 299 x 299 graph (test_both_file_formats_... compares
    # its features with the TorchScript path's)
    code, out, err = run_main(
        capsys,
        "eval",
        "--ckpt",
        digits_run,
        "--inception",
        weight_files[0],
        "--n",
        "6",
        "--ref-n",
        "6",
        "--metrics",
        "fid",
        "--json",
        tmp_path / "p.json",
        f"data.shards={digits_shards}",
    )
    assert code == 0, err[-3000:]
    res = json.loads((tmp_path / "p.json").read_text())
    assert "pytorch-fid" in res["feature_space"] and res["n"] == 6 and res["fid"] > 0


def test_eval_without_inception_falls_back_and_says_so(digits_run, digits_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTGAN_INCEPTION", "")
    code, out, err = run_main(
        capsys,
        "eval",
        "--ckpt",
        digits_run,
        "--n",
        "50",
        "--metrics",
        "fid",
        "--json",
        tmp_path / "e.json",
        f"data.shards={digits_shards}",
    )
    assert code == 0, err[-3000:]
    res = json.loads((tmp_path / "e.json").read_text())
    assert "digits MLP" in res["feature_space"] and "pt_inception-2015-12-05" in res["inception"]
    assert "note: not given" in err
    code, out, err = run_main(capsys, "eval", "--ckpt", digits_run, "--metrics", "is", f"data.shards={digits_shards}")
    assert code == 2 and "need --inception FILE" in err
    code, out, err = run_main(
        capsys, "eval", "--ckpt", digits_run, "--inception", tmp_path / "nope.pth", f"data.shards={digits_shards}"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "inception-2015-12-05.pt" in err


def test_a_two_rank_eval_equals_the_single_process_one(
    tiny_file, digits_run, digits_shards, tmp_path, capsys, monkeypatch
):
    from test_ddp import launch

    args = [
        "--ckpt",
        str(digits_run),
        "--inception",
        str(tiny_file),
        "--n",
        "12",
        "--ref-n",
        "12",
        "--chunk",
        "4",
        "--metrics",
        "fid,kid,is,pr",
        f"data.shards={digits_shards}",
    ]
    monkeypatch.setenv("DISTGAN_CACHE", str(tmp_path / "c1"))
    code, out, err = run_main(capsys, "eval", *args, "--json", tmp_path / "one.json")
    assert code == 0, err[-3000:]
    r = launch(*args, "--json", str(tmp_path / "two.json"), command="eval", env={"DISTGAN_CACHE": str(tmp_path / "c2")})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert "split over 2 ranks in chunks of 4" in two["computed"]
    for k in ("fid", "kid", "is", "precision", "recall"):
        assert two[k] == pytest.approx(one[k], rel=1e-6, abs=1e-9), k


def test_training_evaluations_log_the_standard_metrics_and_keep_the_best_fid_checkpoint(tiny_file, tmp_path, capsys):
    from conftest import read_metrics

    from distgan import checkpoint
    from distgan.data import builtin, shards

    x, y, classes = builtin.digits()
    shards.write_arrays(x[:16], y[:16], classes, tmp_path / "d", source="test", maxcount=8, progress=False)
    run = tmp_path / "run"
    common = [
        *FAST,
        f"data.shards={tmp_path / 'd'}",
        "--out",
        run,
        "train.eval_every=2",
        "train.eval_n=10",
        f"train.eval_inception={tiny_file}",
        "train.keep_best=fid",
        "train.keep_last=1",
        "train.ckpt_every=100",
    ]
    code, out, err = run_main(capsys, "train", *common, "train.steps=4")
    assert code == 0, err[-3000:]
    assert "reference statistics: computed, cached in" in err
    code, out, err = run_main(capsys, "train", *common, "train.steps=6", "--resume", "auto")
    assert code == 0, err[-3000:]
    evals = [m for m in read_metrics(run) if "eval/fid" in m]
    assert [m["step"] for m in evals] == [2, 4, 6]
    assert all(m["eval/fid"] > 0 and m["eval/is"] >= 1 and "eval/precision" in m for m in evals)
    best = checkpoint.read_best(run, "best-fid")
    fids = {m["step"]: m["eval/fid"] for m in evals}
    # the lowest FID over both runs: the resumed run knew the first run's best
    assert best["fid"] == pytest.approx(min(fids.values())) and best["step"] == min(fids, key=fids.get)
    kept = checkpoint.load(run / "checkpoints" / "best-fid")
    assert kept.step == best["step"]
    assert [p.name for p in checkpoint.list_steps(run)] == ["step-00000006"]  # keep_last=1; best-fid beside it
    code, out, err = run_main(
        capsys, "sample", "--ckpt", run / "checkpoints" / "best-fid", "--n", "4", "--out", tmp_path / "s.png"
    )
    assert code == 0, err[-2000:]
    code, out, err = run_main(capsys, "train", *FAST, "--out", tmp_path / "r2", "train.keep_best=fid")
    assert code == 2 and "needs evaluations" in err
    code, out, err = run_main(
        capsys,
        "train",
        "--preset",
        "grid-gan-r1",
        "--out",
        tmp_path / "r3",
        "train.keep_best=fid",
        "train.eval_every=5",
    )
    assert code == 2 and "no fid applies to this run" in err  # before the first step
