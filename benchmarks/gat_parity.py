"""Parameter parity of distgan's vit G and D with GAT's own networks (hse1032/GAT, `models/`), size by size.

GAT's model files import two timm classes (PatchEmbed, Mlp) and einops; timm does not install beside this
project's torch, so a stand-in with timm's parameters (one strided conv; two linear layers) is put on the
path. GAT's networks are built on the meta device (no memory) with GAT's ImageNet-256 settings (32x32x4
latents, 1000 classes, qk-norm, no DINOv2 projector), and their parameters are grouped by module, as are
distgan's `gat-*2-imagenet256` templates'. GAT keeps its fixed sin-cos positions as a frozen Parameter
(distgan: a buffer) and builds a noise-patch embedder in G that its forward multiplies by 0; both are
counted apart.

    pip install --target /tmp/gatdeps einops
    git clone https://github.com/hse1032/GAT /tmp/gat     (or `fetch` it)
    python benchmarks/gat_parity.py --gat /tmp/gat --deps /tmp/gatdeps

Writes results/gat_parity-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

SIZES = {"S": "gat-s2-imagenet256", "B": "gat-b2-imagenet256", "L": "gat-l2-imagenet256", "XL": "gat-xl2-imagenet256"}
UNUSED = {"G": ("pos_embed", "x_embedder"), "D": ("pos_embed",)}  # frozen positions; G's noise patches x 0


def timm_stand_in() -> None:
    """`timm.models.vision_transformer` with PatchEmbed and Mlp as timm defines their parameters."""
    from torch import nn

    class PatchEmbed(nn.Module):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, **_):
            super().__init__()
            self.patch_size = (patch_size, patch_size)
            self.num_patches = (img_size // patch_size) ** 2
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, bias=True, **_):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden_features or in_features, bias=bias)
            self.act = act_layer()
            self.fc2 = nn.Linear(hidden_features or in_features, out_features or in_features, bias=bias)

    vt = types.ModuleType("timm.models.vision_transformer")
    vt.PatchEmbed, vt.Mlp = PatchEmbed, Mlp
    for name, module in (("timm", types.ModuleType("timm")), ("timm.models", types.ModuleType("timm.models"))):
        sys.modules.setdefault(name, module)
    sys.modules["timm.models.vision_transformer"] = vt


def count(model, skip=()) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gat", required=True, help="a checkout of hse1032/GAT (its models/ folder is imported)")
    p.add_argument("--deps", help="a folder with einops (pip install --target DIR einops)")
    args = p.parse_args()
    sys.path[:0] = [args.gat] + ([args.deps] if args.deps else [])
    timm_stand_in()
    import torch
    from models.discriminator import GATD_models
    from models.generator import GAT_models

    from distgan import config, variants

    rows = []
    for size, preset in SIZES.items():
        kwargs = dict(input_size=32, num_classes=1000, z_dims=[0], qk_norm=True, fused_attn=True)
        with torch.device("meta"):
            theirs = {"G": GAT_models[f"GAT-{size}/2"](**kwargs), "D": GATD_models[f"GAT-{size}/2"](**kwargs)}
            ours = variants.get("cgan")(config.load_config(preset, None, [])).models
        for name in ("G", "D"):
            used = count(theirs[name], UNUSED[name])
            rows.append(
                {
                    "size": f"{size}/2",
                    "model": name,
                    "GAT": count(theirs[name]),
                    "GAT without unused": used,
                    "distgan": count(ours[name]),
                    "equal": used == count(ours[name]),
                }
            )
            print(rows[-1], flush=True)
    command = "python benchmarks/gat_parity.py " + " ".join(sys.argv[1:])
    common.write(
        "gat_parity",
        rows,
        ["size", "model", "GAT", "GAT without unused", "distgan", "equal"],
        f"Command: `{command}`. Parameters of GAT's networks (hse1032/GAT models/, ImageNet-256 settings, "
        "no DINOv2 projector) and of distgan's gat-*2-imagenet256 templates' G and D. 'without unused': "
        "less GAT's frozen sin-cos position Parameter (G and D) and G's noise-patch embedder, which its "
        "forward multiplies by 0 (distgan has neither).",
        {"command": command},
    )


if __name__ == "__main__":
    main()
