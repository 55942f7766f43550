"""Adversarial losses as pure functions of discriminator logits (computed in fp32).

With D(x) = sigmoid(logit):
- ns (non-saturating, Goodfellow et al. 2014, the seed's BCE):
    L_D = -log D(x) - log(1 - D(G(z))) = softplus(-real) + softplus(fake)
    L_G = -log D(G(z))                  = softplus(-fake)
- minimax (the original saturating game): same L_D, L_G = log(1 - D(G(z))) = -softplus(fake)
- hinge (Lim & Ye 2017; Miyato et al. 2018, SNGAN):
    L_D = relu(1 - real) + relu(1 + fake),  L_G = -fake
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ns", "minimax", "hinge")


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    if kind == "hinge":
        return F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean()
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind == "ns":
        return F.softplus(-fake_logits.float()).mean()
    if kind == "minimax":
        return -F.softplus(fake_logits.float()).mean()
    if kind == "hinge":
        return -fake_logits.float().mean()
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
