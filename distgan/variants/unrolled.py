"""Unrolled GAN (Metz et al. 2017): G's loss is taken against D unrolled k steps ahead.

The D step is the plain GAN's. In the G step, D's parameters theta_0 are copied and updated k times
(`variant.unroll_steps`, default 5) with D's own optimizer rule (Adam, continuing from D's Adam
moments; plain SGD for other optimizers) on D's loss for this micro-batch's real images and fresh
fakes (its denominator sqrt(v_hat + eps^2), which a second derivative survives at v_hat = 0), by
functional updates (torch.func.functional_call): theta_{i+1} = theta_i - step(grad L_D).
G's loss is then L_G(D_{theta_k}(G(z))). With `variant.unroll_grad=true` (the paper's full
version) the updates are built with create_graph, so G's gradient also flows through how D would
react to G (the fakes of every unrolled step depend on G); with false, theta_k is a constant and
only the look-ahead remains. D's real parameters, buffers and optimizer state are never touched:
BatchNorm statistics are updated on copies. The unrolled steps reuse the step's real batch and
take D's loss without its penalties (`variant.r1_gamma` applies to the real D step only).
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from distgan import losses
from distgan.errors import UserError
from distgan.models import attention
from distgan.variants.gan import GAN


class UnrolledGAN(GAN):
    @classmethod
    def differentiates_twice(cls, cfg) -> str:
        return "unrolled D steps (G's loss goes through D's unrolled updates, their gradients included)"

    @classmethod
    def compile_hint(cls, cfg) -> str:
        return "Set train.compile=false"

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.train.weight_decay > 0:  # the unrolled steps replay Adam's rule, not AdamW's
            raise UserError("variant 'unrolled' unrolls Adam's steps; set train.weight_decay=0")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.unroll_steps = cfg.variant.unroll_steps
        self.unroll_grad = cfg.variant.unroll_grad

    def _rule(self, d_plain):
        """(lr, None) for plain SGD, or (lr, (betas, eps, {param name: (exp_avg, exp_avg_sq, step)}))
        from D's Adam state."""
        opt = self.optimizers["D"]
        opt = getattr(opt, "optimizer", opt)  # Accelerate's wrapper
        group = opt.param_groups[0]
        if not isinstance(opt, torch.optim.Adam):
            return group["lr"], None
        names = {id(p): n for n, p in d_plain.named_parameters()}
        moments = {}
        for p in group["params"]:
            st = opt.state.get(p, {})
            moments[names[id(p)]] = (st.get("exp_avg"), st.get("exp_avg_sq"), float(st.get("step", 0)))
        return group["lr"], (group["betas"], group["eps"], moments)

    def g_critic(self, d_plain, mb):
        device = mb["image"].device
        real = mb["image"]
        params = {n: p.detach().requires_grad_(True) for n, p in d_plain.named_parameters()}
        buffers = {n: b.clone() for n, b in d_plain.named_buffers()}
        lr, adam = self._rule(d_plain)
        # the unrolled updates' gradients are differentiated again (unroll_grad): attention runs its math backend
        with attention.math_only():
            for _ in range(self.unroll_steps):
                with torch.enable_grad() if self.unroll_grad else torch.no_grad():
                    fake = self.generate(self.models["G"], self.noise(real.size(0), device), None)

                def d_fn(x, params=params):
                    return functional_call(d_plain, (params, buffers), (x,))

                loss = losses.d_loss(
                    self.loss, self.discriminate(d_fn, real, None), self.discriminate(d_fn, fake, None)
                )
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=self.unroll_grad)
                new = {}
                for (name, p), g in zip(params.items(), grads):
                    if adam is None:
                        upd = g
                    else:
                        (b1, b2), eps, moments = adam
                        m, v, t = moments[name]
                        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
                        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
                        t += 1
                        moments[name] = (m, v, t)
                        # sqrt(v_hat + eps^2), not sqrt(v_hat) + eps: the same step up to ~eps, and
                        # differentiable twice where v_hat = 0 (a parameter with a zero gradient)
                        upd = (m / (1 - b1**t)) / (v / (1 - b2**t) + eps * eps).sqrt()
                    q = p - lr * upd
                    new[name] = q if self.unroll_grad else q.detach().requires_grad_(True)
                params = new
        frozen = {n: p if self.unroll_grad else p.detach() for n, p in params.items()}
        return lambda x: functional_call(d_plain, (frozen, buffers), (x,))
