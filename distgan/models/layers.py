"""Layers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn

import kernels


class MinibatchDiscrimination(nn.Module):
    """Minibatch discrimination (Salimans et al. 2016, section 3.2): lets D see how similar each
    sample is to the rest of its batch, which penalises a collapsed generator.

    M = x @ T, viewed as (B, num_kernels, kernel_dim); o[i, b] = sum_{j != i} exp(-||M[i,b] - M[j,b]||_1);
    returns cat([x, o]) of width in_features + num_kernels. T starts as N(0, 0.05^2), as in the
    paper's released code. The pairwise part runs in `kernels.minibatch_discrimination` (Triton on
    GPU, a memory-bounded PyTorch fallback elsewhere).
    """

    def __init__(
        self,
        in_features: int,
        num_kernels: int = 100,
        kernel_dim: int = 5,
        *,
        exclude_self: bool = True,
        group_size: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.in_features, self.num_kernels, self.kernel_dim = in_features, num_kernels, kernel_dim
        self.exclude_self, self.group_size, self.backend = exclude_self, group_size, backend
        self.T = nn.Parameter(torch.randn(in_features, num_kernels * kernel_dim) * 0.05)

    @property
    def out_features(self) -> int:
        return self.in_features + self.num_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = (x @ self.T).view(x.shape[0], self.num_kernels, self.kernel_dim)
        o = kernels.minibatch_discrimination(
            m, exclude_self=self.exclude_self, group_size=self.group_size, backend=self.backend
        )
        return torch.cat([x, o.to(x.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_kernels={self.num_kernels}, kernel_dim={self.kernel_dim}"


def discriminator_head(features: int, minibatch: tuple[int, int] | None) -> nn.Module:
    """D's last layer on flat features: a linear logit, after minibatch discrimination
    (num_kernels, kernel_dim) when asked."""
    if minibatch is None:
        return nn.Linear(features, 1)
    layer = MinibatchDiscrimination(features, num_kernels=minibatch[0], kernel_dim=minibatch[1])
    return nn.Sequential(layer, nn.Linear(layer.out_features, 1))


def apply_spectral_norm(module: nn.Module, scale: str = "weight") -> nn.Module:
    """kernels.spectral_norm on every conv and linear layer of `module`, grouped so that one forward
    runs the power iterations of all of them in 4 Triton launches (kernels.spectral_norm_all).
    `scale="output"` (train.sn_scale): Linear and Conv layers divide their outputs by sigma instead
    of using W / sigma (transposed convolutions keep W / sigma)."""
    direct = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    for m in list(module.modules()):
        if isinstance(m, direct):
            kernels.spectral_norm(m, scale=scale)
        elif isinstance(m, transposed):
            kernels.spectral_norm(m)
    return kernels.spectral_norm_all(module)
