"""The Inception-v3 feature network of FID, KID, IS and precision/recall, from a local weights file.

Every published FID since 2017 is computed on the 2048-d pool features of one network: the
Inception-v3 graph TensorFlow released on 2015-12-05. Two ports of it are what the field trusts,
and `load` takes either, recognised by the file's content (never its name):

- NVIDIA's TorchScript file ``inception-2015-12-05.pt`` (stylegan2-ada-pytorch's and StyleGAN3's
  metrics, clean-fid). It takes uint8 NCHW images of any size and resizes them itself:
  ``net(x, return_features=True)`` gives the pool features, ``net(x, no_output_bias=True)`` the
  1008-way softmax without the last layer's bias (what their IS uses). A TorchScript file holds
  code, so it is loaded only because the user named it (`--inception`, `DISTGAN_INCEPTION`).
- pytorch-fid's state dict ``pt_inception-2015-12-05-6726825d.pth`` (torch-fidelity's copy has the
  same keys, but torch-fidelity resizes and scales its input its own way: docs/evaluation.md). Its architecture is `FIDInception3` below: torchvision's Inception3 with the
  blocks pytorch-fid swaps in to match the TF graph (average pools that do not count padding,
  a max pool in the last block). It is read with ``torch.load(weights_only=True)``: no code runs.

Neither file can be downloaded at run time (clusters are often offline): `missing_message` says
where each is published. Both take the same images, quantised as `to_uint8` does.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distgan import files
from distgan.errors import UserError

ENV = "DISTGAN_INCEPTION"
NVIDIA_FILE_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FEATURES = 2048
CLASSES = 1008


def missing_message(given: str | None = None) -> str:
    what = f"Inception weights file '{given}' does not exist" if given else "no Inception weights file given"
    return (
        f"{what}. Standard FID/KID/IS/precision-recall need one of the two published ports of the "
        f"2015-12-05 Inception-v3 graph, downloaded once by you (distgan never downloads): NVIDIA's "
        f"TorchScript file inception-2015-12-05.pt ({NVIDIA_FILE_URL}) or pytorch-fid's state dict "
        f"pt_inception-2015-12-05-6726825d.pth ({PYTORCH_FID_URL}); pass it with --inception FILE or "
        f"{ENV}=FILE"
    )


# -- the architecture of pytorch-fid's port (torchvision's Inception3 layer names) ---------------


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # pytorch-fid: TF's average pools do not count the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(d))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (average pool without padding) or, with `max_pool`, _2 (the
    TF graph's last block pools with a max)."""

    def __init__(self, cin: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInception3(nn.Module):
    """pytorch-fid's `fid_inception_v3()`: the parameter names of its .pth file, 1008 classes, no
    auxiliary head. `forward` takes uint8 (N, 3, H, W) and returns (pool features (N, 2048), logits
    (N, 1008) without the output bias); preprocessing as pytorch-fid's `InceptionV3` does it."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, CLASSES)

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """float (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.pool_features(preprocess_pytorch_fid(images))
        return feats, feats @ self.fc.weight.T  # IS on the logits without the bias, as the references do


def preprocess_pytorch_fid(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the input pytorch-fid's InceptionV3 gives its blocks: x / 255 (its
    images come through ToTensor), bilinear resize to 299 x 299 (F.interpolate, align_corners=False,
    no antialias: `resize_input=True`), then 2x - 1 (`normalize_input=True`)."""
    x = images.float() / 255.0
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


# -- images to the networks' input ---------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1], (N, C, H, W) -> uint8 RGB: floor((x + 1) * 127.5 + 0.5) clamped
    to 0..255 (rounding half up: stylegan2-ada's `(x * 127.5 + 128).clamp(0, 255).to(uint8)`, and
    the PNGs torchvision's save_image writes for pytorch-fid); one channel repeated to three, as
    both references do for grayscale."""
    x = torch.floor((images.float() + 1) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1] != 3:
        raise UserError(f"Inception features need 1- or 3-channel images; got {x.shape[1]} channels")
    return x


# -- loading -------------------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    return files.sha256(path)


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive holds the module's code (code/ and constants.pkl); a torch.save state
    dict (zip or legacy pickle) does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


class FeatureNet:
    """One of the two ports, on a device: `__call__(uint8 (N, 3, H, W))` -> (features (N, 2048),
    logits or probabilities (N, 1008)) as float32 numpy arrays, as the network computes them (the
    metrics take them to float64). `kind` says which port, `digest` is
    the file's sha256 (part of the reference statistics' cache key)."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        self.path, self.device = str(path), torch.device(device)
        self.digest = file_digest(path)
        if is_torchscript(path):
            self.kind = "nvidia-torchscript"
            try:
                self.net = torch.jit.load(self.path, map_location=self.device).eval()
            except Exception as exc:
                raise UserError(f"Inception file '{path}' is a TorchScript archive that does not load: {exc}") from None
            self.probabilities = True  # its IS output is a softmax already
        else:
            self.kind = "pytorch-fid"
            self.net = _load_state_dict(self.path).to(self.device).eval()
            self.probabilities = False
        self._check()

    def _check(self) -> None:
        x = torch.zeros(1, 3, 299, 299, dtype=torch.uint8)
        try:
            f, p = self._run(x)
        except Exception as exc:
            raise UserError(f"Inception file '{self.path}' ({self.kind}) fails on a 299x299 image: {exc}") from None
        if f.shape != (1, FEATURES) or p.shape != (1, CLASSES):
            raise UserError(
                f"Inception file '{self.path}' ({self.kind}) gives outputs of shape {tuple(f.shape)} and "
                f"{tuple(p.shape)}; expected (1, {FEATURES}) and (1, {CLASSES})"
            )

    def _run(self, x: torch.Tensor, outputs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.to(self.device)
        with torch.no_grad():
            if self.kind == "nvidia-torchscript":
                # stylegan2-ada-pytorch's metrics: return_features=True for FID/KID/PR,
                # no_output_bias=True for IS (a softmax over the 1008 classes): a second pass
                return self.net(x, return_features=True), self.net(x, no_output_bias=True) if outputs else None
            return self.net(x)

    def __call__(self, images_uint8: torch.Tensor, outputs: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, class outputs); without `outputs` (IS not wanted) the second is None."""
        f, p = self._run(images_uint8, outputs)
        return f.float().cpu().numpy(), p.float().cpu().numpy() if outputs else None

    def describe(self) -> str:
        return f"Inception-v3 2015-12-05 pool3 ({self.kind}: {Path(self.path).name}, sha256 {self.digest[:12]})"


def _load_state_dict(path: str) -> FIDInception3:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"Inception file '{path}' is neither NVIDIA's TorchScript file nor a readable state dict "
            f"(pytorch-fid's .pth): {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Inception file '{path}' holds no state dict of tensors")
    net = FIDInception3()
    expected = set(net.state_dict())
    counters = {k for k in expected if k.endswith("num_batches_tracked")}  # absent from older files: fine
    keys = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(expected - keys - counters), sorted(keys - expected)
    if missing or extra:
        raise UserError(
            f"Inception file '{path}' is not pytorch-fid's FID Inception state dict: "
            + (f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "")
        )
    try:
        net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(f"Inception file '{path}': {str(exc).splitlines()[-1].strip()}") from None
    return net


def resolve_path(given: str | None) -> str | None:
    """--inception, else $DISTGAN_INCEPTION, else None; a named file that does not exist is an error."""
    path = given or os.environ.get(ENV) or None
    if path and not Path(path).is_file():
        raise UserError(missing_message(path))
    return path
