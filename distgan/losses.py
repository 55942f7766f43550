"""Adversarial losses as pure functions of discriminator logits (computed in fp32).

With D(x) = sigmoid(logit):
- ns (non-saturating, Goodfellow et al. 2014, the seed's BCE):
    L_D = -log D(x) - log(1 - D(G(z))) = softplus(-real) + softplus(fake)
    L_G = -log D(G(z))                  = softplus(-fake)
- minimax (the original saturating game): same L_D, L_G = log(1 - D(G(z))) = -softplus(fake)
- hinge (Lim & Ye 2017; Miyato et al. 2018, SNGAN):
    L_D = relu(1 - real) + relu(1 + fake),  L_G = -fake
- ls (LSGAN, Mao et al. 2017, targets a=0, b=c=1):
    L_D = (real - 1)^2 / 2 + fake^2 / 2,    L_G = (fake - 1)^2 / 2
- wasserstein (WGAN, Arjovsky et al. 2017; D is a critic, unbounded scores):
    L_D = fake - real,                      L_G = -fake
- rpgan (relativistic pairing, Jolicoeur-Martineau 2019; R3GAN, Huang et al. 2024), on paired
  real/fake samples i:
    L_D = softplus(-(real_i - fake_i)),     L_G = softplus(-(fake_i - real_i))
  (L_G needs the real logits: `g_loss(..., real_logits=...)`; they are constants for G.)
All are means over the batch.

`lecam` is LeCam regularisation (Tseng et al. 2021), a term of D's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("ns", "minimax", "hinge", "ls", "wasserstein", "rpgan")
NEEDS_REAL = ("rpgan",)  # losses whose G term also reads D's real logits


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least fp32 (bf16/fp16 under mixed precision are upcast; fp64 stays fp64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    real, fake = _wide(real_logits), _wide(fake_logits)
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "ls":
        return 0.5 * (real - 1.0).square().mean() + 0.5 * fake.square().mean()
    if kind == "wasserstein":
        return fake.mean() - real.mean()
    if kind == "rpgan":
        return F.softplus(-(real - fake)).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss(kind: str, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "rpgan":
        if real_logits is None:
            raise ValueError("the rpgan loss of G needs real_logits")
        return F.softplus(-(_wide(fake_logits) - _wide(real_logits).detach())).mean()
    if kind == "ns":
        return F.softplus(-_wide(fake_logits)).mean()
    if kind == "minimax":
        return -F.softplus(_wide(fake_logits)).mean()
    if kind in ("hinge", "wasserstein"):
        return -_wide(fake_logits).mean()
    if kind == "ls":
        return 0.5 * (_wide(fake_logits) - 1.0).square().mean()
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")


def lecam(real_logits: torch.Tensor, fake_logits: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor):
    """LeCam regulariser (Tseng et al. 2021, eq. 3): E ||D(x) - a_F||^2 + E ||D(G(z)) - a_R||^2, with
    a_R, a_F exponential moving averages of D's mean real and fake outputs (held by the caller)."""
    real, fake = _wide(real_logits), _wide(fake_logits)
    return (real - ema_fake).square().mean() + (fake - ema_real).square().mean()
