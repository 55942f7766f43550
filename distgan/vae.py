"""The frozen VAE of latent-space training (`data.kind=latents`, `model.vae`): a diffusers
`AutoencoderKL` (SD-VAE and its kin) read from a local folder in diffusers' layout, `config.json` beside
`diffusion_pytorch_model.safetensors` (what `save_pretrained` writes and the Hub's `vae/` folders hold).
Weights are read from safetensors only, nothing is downloaded, and the VAE is never trained and never
written into distgan's checkpoints (`model.vae` is a file key: never taken from a stored config).

Latents are the encoder's posterior mean, normalised as the diffusion and GAN recipes use them:
z = (mean - shift_factor) * scaling_factor (SD-VAE: shift 0, scale 0.18215), and decoded back by
x = D(z / scaling_factor + shift_factor), clamped to [-1, 1]. The latent shards' manifest records the
VAE's identity (the weights' sha256, scaling, shift, channels, downsampling), and training refuses a
model.vae whose identity differs from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from distgan import files
from distgan.errors import UserError

WEIGHTS = "diffusion_pytorch_model.safetensors"
# A small AutoencoderKL with random weights (seed 0), written to the cache on first use: what the latent
# pipeline does end to end on a CPU (digits-latents, the digits-gat-latent preset), not a useful VAE.
BUILTIN = "builtin:tiny-vae"
TINY_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
}


def builtin_folder() -> Path:
    """builtin:tiny-vae's folder in distgan's cache, written on first use."""
    folder = files.cache_root() / "vae" / "tiny-vae-v1"
    if not (folder / WEIGHTS).is_file():
        from diffusers import AutoencoderKL

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoencoderKL(**TINY_CONFIG)
        tmp = folder.with_name(folder.name + ".incomplete")
        model.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # a folder without its weights: an interrupted write
        tmp.replace(folder)
    return folder


def _folder(path: str) -> Path:
    if path == BUILTIN:
        return builtin_folder()
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".safetensors":
        p = p.parent
    if not p.is_dir():
        raise UserError(
            f"model.vae '{path}' does not exist: give a diffusers AutoencoderKL folder ({WEIGHTS} + config.json)"
        )
    missing = [n for n in ("config.json", WEIGHTS) if not (p / n).is_file()]
    if missing:
        raise UserError(
            f"model.vae '{path}' is not a diffusers AutoencoderKL folder: no {' or '.join(missing)} in it "
            "(save one with AutoencoderKL.save_pretrained, safetensors weights)"
        )
    return p


def _config(folder: Path, path: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"model.vae '{path}': config.json is unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"model.vae '{path}' does not hold an AutoencoderKL config")
    return config


_IDENTITIES: dict[tuple, dict] = {}  # (folder, weights' size and mtime) -> identity: the weights hashed once


def identity(path: str) -> dict:
    """What a latent shard set records of the VAE that made it, read from the folder without loading
    the model: the weights' sha256 and the config's normalisation and shapes (diffusers' defaults for
    keys it leaves out). Remembered per process while the weights file is unchanged (the trainer's
    check, the encoder and the decoder all ask)."""
    folder = _folder(path)
    st = (folder / WEIGHTS).stat()
    key = (str(folder.resolve()), st.st_size, st.st_mtime_ns, (folder / "config.json").stat().st_mtime_ns)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = _identity(folder, path)
    return dict(_IDENTITIES[key])


def _identity(folder: Path, path: str) -> dict:
    c = _config(folder, path)
    return {
        "sha256": files.sha256(folder / WEIGHTS),
        "scaling_factor": float(c.get("scaling_factor", 0.18215)),
        "shift_factor": float(c.get("shift_factor") or 0.0),
        "latent_channels": int(c.get("latent_channels", 4)),
        "image_channels": int(c.get("in_channels", 3)),
        "downsample": 2 ** (len(c.get("block_out_channels", [64])) - 1),
    }


def check_matches(path: str, recorded: dict, where: str, mine: dict | None = None) -> None:
    """Refuse the VAE of `path` when it is not the one the latents of `where` were encoded with."""
    mine = mine or identity(path)
    differ = [k for k in mine if k in recorded and recorded[k] != mine[k]]
    if differ:
        k = differ[0]
        raise UserError(
            f"model.vae '{path}' is not the VAE that encoded {where}: its {k} is {mine[k]!r}, the shards were "
            f"made with {recorded[k]!r}"
        )


class VAE:
    """A frozen AutoencoderKL and its latent normalisation."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        self.path = path
        self.info = identity(path)
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise UserError(
                "latent training reads its VAE with diffusers, which is not installed: pip install 'distgan[latent]'"
            ) from None
        try:
            model = AutoencoderKL.from_pretrained(_folder(path), use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"model.vae '{path}': cannot load it ({type(exc).__name__}: {str(exc)[:300]})") from None
        self.model = model.eval().requires_grad_(False).to(device)
        self.scale, self.shift = self.info["scaling_factor"], self.info["shift_factor"]
        self.channels, self.downsample = self.info["latent_channels"], self.info["downsample"]
        self.image_channels = self.info["image_channels"]

    def to(self, device) -> VAE:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, posterior: bool = False):
        """Images (B, C, H, W) in [-1, 1] -> normalised latents (B, latent C, H / f, W / f), fp32: the
        posterior's mean; with `posterior`, (mean, std) of the normalised latent's posterior."""
        dist = self.model.encode(images.to(self.device, torch.float32)).latent_dist
        mean = ((dist.mean - self.shift) * self.scale).float()
        return (mean, (dist.std * self.scale).float()) if posterior else mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1], in chunks of `chunk` (decoders are memory-hungry)."""
        out = []
        for z in latents.split(chunk):
            z = z.to(self.device, torch.float32) / self.scale + self.shift
            out.append(self.model.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(out).to(latents.device)
