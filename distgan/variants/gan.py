"""The GAN of Goodfellow et al. (2014), as in the seed: one D step then one G step per batch.

D step: D is called on real and on (detached) fake images, loss L_D, optimizer step.
G step: fresh z, L_G through D; D's parameters are frozen and D is called unwrapped from DDP,
so its gradients are neither computed nor all-reduced during the G step.
`variant.loss` picks L_D / L_G (distgan.losses). Subclasses change the models (`build`), how G
and D are called (`generate`, `discriminate`: cgan passes labels), the D step (`d_penalty`,
`after_d_step`), the optimizers and the number of D steps per G step (`variant.n_critic`).

PacGAN (Lin et al. 2018) is `variant.pack=m` with any loss: D is built for m x channels and judges
m consecutive samples stacked along channels, real with real and fake with fake.
"""

from __future__ import annotations

import torch

from distgan import augment, losses, models
from distgan.errors import UserError
from distgan.models import resnet
from distgan.variants.base import Variant

# Optimizer state (Adam's step count) on the GPU: a step whose gradients are NaN/Inf is undone there
# with torch.where, without a host sync (step.StepContext.step). The CPU keeps PyTorch's default.
CAPTURABLE = torch.cuda.is_available()


def r1_penalty(D, real: torch.Tensor) -> torch.Tensor:
    """E |grad_x D(x)|^2 over D's inputs x (real data), differentiable in D's parameters
    (create_graph=True). With packing one D input holds m samples: their squared gradients add up."""
    x = real.detach().requires_grad_(True)
    logits = D(x).float()
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.float().square().sum() / logits.numel()


class GAN(Variant):
    supports_drs = True

    @classmethod
    def check_config(cls, cfg) -> None:
        models.check_config(cfg)  # the model families of models/ (image-to-image variants check their own)
        super().check_config(cfg)

    @classmethod
    def differentiates_twice(cls, cfg) -> bool:
        return cfg.variant.r1_gamma > 0 or cfg.variant.r2_gamma > 0

    def __init__(self, cfg):
        if cfg.variant.loss not in losses.LOSSES:
            raise UserError(
                f"config key 'variant.loss' must be one of {', '.join(losses.LOSSES)}; got '{cfg.variant.loss}'"
            )
        self.cfg = cfg
        self.loss = cfg.variant.loss
        self.z_dim = cfg.model.g.z_dim
        self.n_critic = cfg.variant.n_critic
        self.data_per_step = self.n_critic  # each D step takes its own real batch
        self.pack = cfg.variant.pack
        self.augment = augment.parse(cfg.data.augment)
        self.lecam_ema: torch.Tensor | None = None  # LeCam: EMAs of D's mean (real, fake) outputs
        self.ada = None  # data.augment_p=auto: ADA's adaptive strength, else a fixed probability
        if self.augment and cfg.data.augment_p == "auto":
            self.ada = augment.Adaptive(cfg.data.augment_target)
        self.augment_p = 1.0 if cfg.data.augment_p == "auto" else float(cfg.data.augment_p)
        if cfg.data.batch_size % self.pack:
            raise UserError(f"data.batch_size={cfg.data.batch_size} must be a multiple of variant.pack={self.pack}")
        G, D = self.build(cfg)
        self.models = {"G": G, "D": D}
        self.optimizers = {"G": self.optimizer(G, cfg.train.lr_g), "D": self.optimizer(D, cfg.train.lr_d)}

    def build(self, cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
        return models.build_generator(cfg), models.build_discriminator(cfg, channels=cfg.data.channels * self.pack)

    def labels(self, n: int, device) -> torch.Tensor | None:
        """Labels for n fakes (cgan: uniform over the classes); None when unconditional."""
        return None

    def generate(self, G, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return G(z)

    def discriminate(self, D, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """D's logits in training: after data.augment (DiffAugment, on real and fake alike) and packing."""
        x = self.augmented(x)
        if self.pack > 1:  # (B, C, H, W) -> (B / m, m C, H, W): m consecutive samples per D input
            x = x.reshape(x.size(0) // self.pack, self.pack * x.size(1), *x.shape[2:])
        return D(x)

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """x through data.augment at the current strength (the identity without augmentation)."""
        return augment.apply(self.augment, x, self.ada.p if self.ada is not None else self.augment_p)

    def optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        t = self.cfg.train
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(t.beta1, t.beta2), capturable=CAPTURABLE)

    def noise(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:  # a fixed generator (sample grids) lives on its own device
            return torch.randn(n, self.z_dim, generator=generator, device=generator.device).to(device)
        return torch.randn(n, self.z_dim, device=device)

    def d_penalty(self, D, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra terms of D's loss (named, weighted): the R1 penalty on reals when variant.r1_gamma > 0
        and R2, the same on fakes, when variant.r2_gamma > 0 (R3GAN uses both).
        `D` is a function of images alone (labels, packing already bound)."""
        v, terms = self.cfg.variant, {}
        if v.r1_gamma > 0:
            terms["loss/r1"] = v.r1_gamma / 2 * r1_penalty(D, real)
        if v.r2_gamma > 0:
            terms["loss/r2"] = v.r2_gamma / 2 * r1_penalty(D, fake)
        return terms

    def lecam_term(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """variant.lecam_weight * LeCam's regulariser, then the EMAs of D's mean outputs move on
        (on the device: no host sync; per rank, in the checkpoint's rank state)."""
        v = self.cfg.variant
        real, fake = real_logits.detach().float().mean(), fake_logits.detach().float().mean()
        if self.lecam_ema is None:
            self.lecam_ema = torch.zeros(2, device=real.device)
        term = v.lecam_weight * losses.lecam(real_logits, fake_logits, self.lecam_ema[0], self.lecam_ema[1])
        self.lecam_ema = torch.lerp(torch.stack([real, fake]), self.lecam_ema, v.lecam_decay)
        return term

    def after_d_step(self, D: torch.nn.Module) -> None:
        """Called after each D optimizer step (WGAN clips the weights here)."""

    def d_step(self, batches: list[dict], ctx, stats: dict) -> None:
        D, G, opt_d = self.models["D"], self.models["G"], self.optimizers["D"]
        device = batches[0]["image"].device
        share = 1.0 / (len(batches) * self.n_critic)  # of the step's mean, per micro-batch
        opt_d.zero_grad(set_to_none=True)
        for mb in ctx.micro(D, batches):
            real, y_real = mb["image"], mb["label"]
            y_fake = self.labels(real.size(0), device)
            with torch.no_grad():
                fake = self.generate(G, self.noise(real.size(0), device), y_fake)
            real_logits, fake_logits = self.discriminate(D, real, y_real), self.discriminate(D, fake, y_fake)
            if self.ada is not None:
                self.ada.observe(real_logits, real.size(0))
            loss = losses.d_loss(self.loss, real_logits, fake_logits)
            if self.cfg.variant.lecam_weight > 0:
                term = self.lecam_term(real_logits, fake_logits)
                loss = loss + term
                stats["loss/lecam"] = stats.get("loss/lecam", 0) + term.detach() * share
            for name, term in self.d_penalty(lambda x, y=y_real: self.discriminate(D, x, y), real, fake).items():
                loss = loss + term
                stats[name] = stats.get(name, 0) + term.detach() * share
            ctx.backward(loss)
            stats["loss/d"] += loss.detach() * share
            stats["d/real"] += real_logits.detach().float().mean() * share
            stats["d/fake"] += fake_logits.detach().float().mean() * share
        ctx.step(opt_d)
        self.after_d_step(ctx.unwrap(D))

    def train_step(self, batches: list[dict], ctx) -> dict[str, torch.Tensor]:
        device = batches[0]["image"].device
        stats = {k: torch.zeros((), device=device) for k in ("loss/d", "loss/g", "d/real", "d/fake")}
        per = len(batches) // self.n_critic
        for i in range(self.n_critic):
            self.d_step(batches[i * per : (i + 1) * per], ctx, stats)

        self.g_step(batches[:per], ctx, stats)
        if self.ada is not None:
            self.ada.update(ctx.global_step + 1, lambda t: ctx.accelerator.reduce(t, reduction="sum"))
            stats["augment/p"] = self.ada.p.to(device, torch.float32)
        return stats

    def rank_state(self) -> dict[str, torch.Tensor]:
        """Per-rank tensors for checkpoints: ADA's strength (the same on every rank) and partial sums,
        LeCam's EMAs of D's outputs."""
        state = self.ada.state() if self.ada is not None else {}
        if self.cfg.variant.lecam_weight > 0:
            ema = self.lecam_ema.cpu() if self.lecam_ema is not None else torch.full((2,), float("nan"))
            state["lecam_ema"] = ema
        return state

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        device = next(self.models["D"].parameters()).device
        if self.ada is not None and "shared.augment_p" in state:
            self.ada.load_state(state, device)
        if self.cfg.variant.lecam_weight > 0 and "lecam_ema" in state:
            ema = state["lecam_ema"].to(device=device, dtype=torch.float32)
            self.lecam_ema = None if torch.isnan(ema).any() else ema

    def g_step(self, batches: list[dict], ctx, stats: dict) -> None:
        G, D, opt_g = self.models["G"], self.models["D"], self.optimizers["G"]
        device = batches[0]["image"].device
        opt_g.zero_grad(set_to_none=True)
        with ctx.frozen(D) as d_plain:
            for mb in ctx.micro(G, batches):
                n = mb["image"].size(0)
                y = self.labels(n, device)
                fake = self.generate(G, self.noise(n, device), y)
                critic = self.g_critic(d_plain, mb)
                real_logits = None
                if self.loss in losses.NEEDS_REAL:  # rpgan pairs each fake with a real
                    with torch.no_grad():
                        real_logits = self.discriminate(critic, mb["image"], mb["label"])
                loss = losses.g_loss(self.loss, self.discriminate(critic, fake, y), real_logits)
                stats["loss/g"] += loss.detach() / len(batches)
                if self.cfg.variant.ortho_reg > 0:  # per micro-batch; backward's 1/accum makes it one in all
                    term = self.cfg.variant.ortho_reg * resnet.orthogonal_penalty(ctx.unwrap(G))
                    loss = loss + term
                    stats["loss/ortho"] = stats.get("loss/ortho", 0) + term.detach() / len(batches)
                ctx.backward(loss)
        ctx.step(opt_g)

    def g_critic(self, d_plain, mb: dict):
        """The D that G's loss is computed against: D itself (the unrolled GAN unrolls it first)."""
        return d_plain

    @torch.no_grad()
    def sample(
        self, G: torch.nn.Module, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """n images in [-1, 1]; `labels` (n,) for conditional variants (ignored otherwise)."""
        device = next(G.parameters()).device
        out = G(self.noise(n, device, generator)).float()
        return out.clamp(-1, 1) if out.ndim == 4 else out  # images live in [-1, 1]; points anywhere
