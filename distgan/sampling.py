"""Discriminator rejection sampling (Azadi et al. 2019, "Discriminator Rejection Sampling").

A discriminator trained with the logistic loss (variant.loss ns or minimax) to optimality has
logit D(x) = log p_data(x) / p_G(x). Rejection sampling from p_G with the acceptance probability
exp(D(x) - M), M = max_x D(x), then draws from p_data where D is right: G's samples that D finds
unlikely as data (the "bridges" between a mixture's modes, over-produced modes) are thrown away.
This is the paper's idealised rule, without its gamma shift; M is the largest logit seen so far
(a burn-in of `burn_in` samples first, and raised whenever a larger logit turns up, as the paper
does). The discriminator is the checkpoint's D, which was trained against the live generator.

The rule is only as good as D's estimate of the ratio, and a GAN's D at the end of training is not
the optimal D for the final generator: it was trained against earlier generators, in step with them,
and (with variant.r1_gamma) smoothed by a penalty. `calibrate` first trains a copy of D further
against the frozen generator, on the training data, with the plain logistic loss and an average of
its weights (the optimum for a fixed G is exactly the log ratio). On the 2-D grid this is what turns
the rule from a small correction into one that removes the bridges between modes (docs/results.md, "Mode
collapse"). It is `--drs-calibrate STEPS` on `sample` and `eval`.

`distgan sample --drs` and `distgan eval --drs` use it; the eval report then says how many
draws were needed per kept sample (the acceptance rate).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch

from distgan.errors import UserError

LOGISTIC_LOSSES = ("ns", "minimax")


def check_supported(cfg) -> None:
    """The rule needs D(x) = log p_data / p_G: a logistic loss, unpacked, unconditional samples."""
    if cfg.variant.loss not in LOGISTIC_LOSSES:
        raise UserError(
            f"--drs needs a discriminator trained with the logistic loss (variant.loss ns or minimax), whose "
            f"logit estimates log p_data/p_G; this checkpoint used variant.loss={cfg.variant.loss}"
        )
    if cfg.variant.pack > 1:
        raise UserError(f"--drs judges single samples; this checkpoint's D judges packs of {cfg.variant.pack}")
    if cfg.data.kind == "latents" or cfg.variant.multilevel:
        raise UserError("--drs judges the decoded samples with D, which judges latents or guidance levels here")
    from distgan import variants

    if cfg.model.num_classes > 0 or not variants.get(cfg.variant.name).supports_drs:
        names = [n for n in variants.REGISTRY if variants.get(n).supports_drs]
        raise UserError(f"--drs supports the unconditional {' and '.join(names)} variants; got '{cfg.variant.name}'")


def calibrate(
    variant,
    G: torch.nn.Module,
    D: torch.nn.Module,
    real: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    generator: torch.Generator,
    average: float = 0.999,
    betas: tuple[float, float] = (0.5, 0.999),
    bar=None,
) -> tuple[torch.nn.Module, dict]:
    """A copy of D trained `steps` more Adam steps against the frozen G (samples as `variant.sample`
    draws them, which is what the rule judges) on batches from `real`, with the logistic loss and no
    penalty; returned is the running average of its weights (`average`, with the trainer's warm-up),
    in eval mode, and {"calibrate_steps", "calibrate_loss": the mean D loss over the last tenth}.
    The caller's D is left as it was."""
    from distgan import losses
    from distgan.step import ema_beta, ema_update

    if steps < 1:
        raise UserError(f"--drs-calibrate needs at least 1 step; got {steps}")
    device = next(D.parameters()).device
    D = copy.deepcopy(D).train()
    avg = copy.deepcopy(D).requires_grad_(False)
    opt = torch.optim.Adam(D.parameters(), lr=lr, betas=betas)
    tail: list[float] = []
    for step in range(steps):
        x = next(real).to(device)
        fake = variant.sample(G, len(x), generator=generator).to(device)
        loss = losses.d_loss("ns", D(x), D(fake))  # logistic: its optimum is log p_data / p_G
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(avg, D, ema_beta(average, step))
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        if bar is not None:
            bar.update(1)
    return avg.eval(), {"calibrate_steps": steps, "calibrate_loss": sum(tail) / len(tail)}


@torch.no_grad()
def rejection_sample(
    variant,
    G: torch.nn.Module,
    D: torch.nn.Module,
    n: int,
    generator: torch.Generator,
    burn_in: int = 10_000,
    chunk: int = 1024,
    max_draws: int = 10_000_000,
    bar=None,
) -> tuple[torch.Tensor, dict]:
    """n samples kept by discriminator rejection sampling, and {"drawn", "accept_rate", "max_logit"}.
    The acceptance coins come from `generator` too, so a seed gives the same samples."""
    device = next(G.parameters()).device

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = variant.sample(G, k, generator=generator)
        return x, D(x.to(device)).float().flatten().cpu()

    m = -math.inf
    drawn = 0
    while drawn < burn_in:
        _, logits = draw(min(chunk, burn_in - drawn))
        m = max(m, logits.max().item())
        drawn += len(logits)
    kept: list[torch.Tensor] = []
    got, drawn, passed = 0, 0, 0
    while got < n:
        if drawn >= max_draws:
            raise UserError(
                f"--drs kept only {got} of {n} samples in {drawn} draws (acceptance {got / drawn:.2e}); "
                "the discriminator rejects nearly everything this generator makes"
            )
        x, logits = draw(chunk)
        drawn += len(logits)
        m = max(m, logits.max().item())
        coins = torch.rand(len(logits), generator=generator, device=generator.device).cpu()
        keep = coins < torch.exp(logits - m)
        passed += int(keep.sum())
        kept.append(x.cpu()[keep][: n - got])
        got += len(kept[-1])
        if bar is not None:
            bar.update(len(kept[-1]))
    # the rate counts every accepted draw, also those past the n-th (draws come in whole chunks)
    return torch.cat(kept), {"drawn": drawn, "accept_rate": passed / drawn, "max_logit": m}
