"""D's gradient penalties (R1, R2, WGAN-GP) in three modes, `variant.penalty_mode`:

- `exact`: the penalty on |grad_x D(x)|, differentiated again in D's parameters (create_graph, a
  "double backward"). torch.compile (aot_autograd) and fused attention (flash) cannot differentiate a
  gradient again, so with exact penalties `train.compile` is refused and attention runs PyTorch's
  math backend (models/attention.py).
- `approx`: the squared input gradient by a finite difference (GAT, Seaweed APT):
      |grad_x D(x)|^2  ~  a^2,   a = (D(x + sigma eps) - D(x)) / sigma,   eps ~ N(0, I) fresh each step.
  Only first derivatives: the whole step compiles and attention may use flash. For small sigma
  a -> g.eps with g = grad_x D(x), a normal variable of mean 0 and variance |g|^2, so a^2 is an
  unbiased estimate of |g|^2 (mean |g|^2) with variance 2 |g|^4, averaged over the batch; the
  finite difference adds a bias of order sigma (D's curvature along eps). Both D evaluations run in
  fp32 even under bf16 autocast (at sigma = 0.01 the difference of two bf16 logits is mostly
  rounding), on the same augmentation draws, so eps is the only difference between them.
  WGAN-GP's (|g| - 1)^2 = |g|^2 - 2|g| + 1 is estimated without bias by a^2 - 2 sqrt(pi/2) |a| + 1,
  since E|a| = |g| sqrt(2 / pi) (a single-sample estimate can be negative; its mean cannot).
- `lazy` (StyleGAN2's lazy regularisation): the exact penalty only every k-th D step
  (`variant.penalty_every`), in a separate optimizer step of its own with the penalty's weight times
  k, and D's Adam lr and betas rescaled by `lazy_ratio(k)` = k / (k + 1) (lr * r, beta ** r), which
  keeps Adam's time constants per image what they were with one step per batch. The main steps have
  no second derivative and compile; the regularisation step runs eagerly.

Every function takes `critic`, D as a function of its input images alone: labels bound, packing and
the augmentation draws fixed (so D(x + sigma eps) and D(x) differ only in eps).
"""

from __future__ import annotations

import contextlib
import math

import torch

from distgan.models import attention

MODES = ("exact", "approx", "lazy")


def exact_sq_grad(critic, x: torch.Tensor) -> torch.Tensor:
    """E |grad_x critic(x)|^2 per logit, differentiable in D's parameters (create_graph=True). With
    packing one D input holds m samples: their squared gradients add up."""
    x = x.detach().requires_grad_(True)
    with attention.math_only():  # the only SDPA backend with a derivative of its backward
        logits = critic(x).float()
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.float().square().sum() / logits.numel() + _touch(logits)


def _touch(logits: torch.Tensor) -> torch.Tensor:
    """0 x D's output: the parameters a penalty does not depend on (D's output bias) still get a
    (zero) gradient, which DDP wants of every parameter when the penalty is a step's whole loss (the
    lazy regularisation step; StyleGAN2 adds the same zero)."""
    return 0.0 * logits.sum()


def finite_difference(critic, x: torch.Tensor, sigma: float, base: torch.Tensor | None = None, fp32=None):
    """a = (critic(x + sigma eps) - critic(x)) / sigma per logit, eps ~ N(0, I) from the default
    generator (per rank, in every checkpoint). `base`: critic(x) already computed in fp32 (saves a
    forward). `fp32`: a context manager that runs the critic in full precision (mixed precision)."""
    eps = torch.randn_like(x, dtype=torch.float32).to(x.dtype)
    with fp32 if fp32 is not None else contextlib.nullcontext():
        moved = critic(x.detach() + sigma * eps).float()
        if base is None:
            base = critic(x.detach()).float()
    return (moved - base.float()) / sigma


def approx_sq_grad(critic, x: torch.Tensor, sigma: float, base=None, fp32=None) -> torch.Tensor:
    """The finite-difference estimate of `exact_sq_grad` (its mean over eps, for small sigma)."""
    a = finite_difference(critic, x, sigma, base, fp32)
    return a.square().mean()


def exact_gp(critic, x_hat: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's mean over samples of (|grad D(x_hat)|_2 - 1)^2, differentiable in D's parameters."""
    x_hat = x_hat.detach().requires_grad_(True)
    with attention.math_only():
        logits = critic(x_hat).float()
        (grad,) = torch.autograd.grad(logits.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).float().norm(dim=1) - 1.0).square().mean() + _touch(logits)


def approx_gp(critic, x_hat: torch.Tensor, sigma: float, fp32=None) -> torch.Tensor:
    """An unbiased finite-difference estimate of `exact_gp` (for small sigma): a^2 - 2 sqrt(pi/2) |a| + 1."""
    a = finite_difference(critic, x_hat, sigma, None, fp32)
    return (a.square() - math.sqrt(2 * math.pi) * a.abs() + 1.0).mean()


def lazy_ratio(every: int) -> float:
    """StyleGAN2's mb_ratio: k / (k + 1) D optimizer steps per batch with a regularisation step
    every k batches; D's lr is multiplied by it and each Adam beta raised to it."""
    return every / (every + 1)


def rescale_for_lazy(optimizer: torch.optim.Optimizer, every: int) -> None:
    """D's optimizer for lazy regularisation: lr * r and betas ** r, r = lazy_ratio(every)."""
    r = lazy_ratio(every)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * r
        if "betas" in group:
            group["betas"] = tuple(b**r for b in group["betas"])


def regularises(d_step: int, every: int) -> bool:
    """Lazy mode: whether D step `d_step` (0-based, counted over the whole run, so it follows from
    the checkpoint's step) is followed by a regularisation step: steps 0, k, 2k, ..."""
    return d_step % every == 0
