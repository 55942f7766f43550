"""DINOv2's vision transformer (Oquab et al. 2023, facebookresearch/dinov2), inference only: the frozen
encoder that GAT's (and REPA's) alignment term reads features from (distgan/align.py).

The network is built from the shapes in a state dict, in either published layout:
- Meta's (`dinov2_vit{s,b,l,g}14[_reg]_pretrain.pth`, what `torch.hub.load("facebookresearch/dinov2")`
  downloads, or the same tensors as safetensors): `patch_embed.proj`, `cls_token`, `pos_embed`,
  `register_tokens`, `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 (or
  mlp.w12, mlp.w3: ViT-g's SwiGLU), ls2.gamma}`, `norm`;
- Hugging Face's (`facebook/dinov2-*`, `model.safetensors`): `embeddings.*`, `encoder.layer.N.*` with
  separate query/key/value, `layernorm`; converted to Meta's names on load.

Tokens: a 14-pixel patch embedding, a class token, the position embeddings, then the register tokens
(if any); pre-norm blocks (LayerNorm, multi-head attention with 64-dimensional heads, LayerScale;
LayerNorm, MLP, LayerScale); a final LayerNorm. `forward` gives the normalised class token (B, E)
and patch tokens (B, T, E): DINOv2's `x_norm_clstoken` and `x_norm_patchtokens`.

The position embeddings (trained for a 37 x 37 grid) are resampled once, when the model is built, to
the grid of the input resolution (bicubic with antialiasing, as GAT does with timm's
`resample_abs_pos_embed`): the encoder takes one input size, `resolution`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from distgan.errors import UserError
from distgan.models import attention

PATCH = 14
HEAD_DIM = 64  # every DINOv2 size: S 384 / 6 heads, B 768 / 12, L 1024 / 16, g 1536 / 24


class Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.heads = width // HEAD_DIM
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(attention.attend(q, k, v).transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12, self.w3 = nn.Linear(width, 2 * hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, width: int, hidden: int, swiglu: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width)
        self.mlp = (SwiGLU if swiglu else MLP)(width, hidden)
        self.ls1, self.ls2 = LayerScale(width), LayerScale(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    def __init__(self, width: int, depth: int, hidden: int, registers: int, side: int, swiglu: bool = False):
        super().__init__()
        self.side, self.registers = side, registers
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + side * side, width))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, width)) if registers else None
        self.blocks = nn.ModuleList(Block(width, hidden, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, side * 14, side * 14), ImageNet-normalised -> (class token (B, E), patches (B, side^2, E))."""
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        if self.register_tokens is not None:
            h = torch.cat([h[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), h[:, 1:]], dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return h[:, 0], h[:, 1 + self.registers :]


def _from_hugging_face(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face's Dinov2Model names -> Meta's (query, key and value concatenated into qkv)."""
    renames = [
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
        (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
        (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
        (r"^layernorm\.", "norm."),
    ]
    out, qkv = {}, {}
    for key, value in state.items():
        m = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        for pattern, new in renames:
            if re.match(pattern, key):
                key = re.sub(pattern, new, key)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def from_state_dict(state: dict[str, torch.Tensor], resolution: int, what: str) -> DINOv2:
    """A DINOv2 for `resolution`-pixel inputs with the weights of `state` (either layout); anything
    missing, unexpected or of another shape is refused in one line naming `what`."""
    if resolution % PATCH:
        raise UserError(f"{what}: the encoder's input resolution {resolution} is not a multiple of {PATCH}")
    if "embeddings.cls_token" in state:
        state = _from_hugging_face(state)
    state = {k: v for k, v in state.items() if k not in ("mask_token", "head.weight", "head.bias")}
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight")
    absent = [k for k in need if k not in state]
    if absent:
        raise UserError(f"{what}: not a DINOv2 state dict (no '{absent[0]}'; Meta's or Hugging Face's layout)")
    width = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = state["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[1 if swiglu else 0]
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    if width % HEAD_DIM or state["patch_embed.proj.weight"].shape[-1] != PATCH:
        raise UserError(f"{what}: width {width} / patch {state['patch_embed.proj.weight'].shape[-1]} is not DINOv2's")
    side = resolution // PATCH
    net = DINOv2(width, depth, hidden, registers, side, swiglu)
    state["pos_embed"] = resample_positions(state["pos_embed"], side)
    own = net.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape] + [k for k in state if k not in own]
    if wrong:
        raise UserError(f"{what}: not a DINOv2 state dict ('{wrong[0]}' missing, unexpected or of another shape)")
    net.load_state_dict(state)
    return net


def resample_positions(pos: torch.Tensor, side: int) -> torch.Tensor:
    """(1, 1 + n^2, E) position embeddings (the class token's first) -> (1, 1 + side^2, E): the grid
    resampled bicubically with antialiasing."""
    n = math.isqrt(pos.shape[1] - 1)
    if n * n != pos.shape[1] - 1:
        raise UserError(f"DINOv2 position embeddings of {pos.shape[1] - 1} patches are not a square grid")
    if n == side:
        return pos
    grid = pos[:, 1:].float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:, :1].float(), grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1).to(pos.dtype)
