"""The GAN of Goodfellow et al. (2014), as in the seed: one D step then one G step per batch.

D step: D is called on real and on (detached) fake images, loss L_D, optimizer step.
G step: fresh z, L_G through D; D's parameters are frozen and D is called unwrapped from DDP,
so its gradients are neither computed nor all-reduced during the G step.
`variant.loss` picks L_D / L_G (distgan.losses). Subclasses change the models (`build`), how G
and D are called (`generate`, `discriminate`: cgan passes labels), the D step (`d_penalty`,
`after_d_step`), the optimizers and the number of D steps per G step (`variant.n_critic`).

PacGAN (Lin et al. 2018) is `variant.pack=m` with any loss: D is built for m x channels and judges
m consecutive samples stacked along channels, real with real and fake with fake.

Multi-level guidance (GAT, `variant.multilevel`, distgan/guidance.py): a vit G's L partial outputs are
judged together, stacked as channels and each noised at its own level; reals are repeated to the L
levels and noised the same way. D is built for L x channels.
"""

from __future__ import annotations

import dataclasses

import torch

from distgan import align, augment, guidance, losses, models, penalties
from distgan.errors import UserError
from distgan.models import resnet
from distgan.variants.base import Variant

# Optimizer state (Adam's step count) on the GPU: a step whose gradients are NaN/Inf is skipped or
# undone there, without a host sync (step.StepContext.step). The CPU keeps PyTorch's default.
CAPTURABLE = torch.cuda.is_available()


def adam(params, lr: float, betas: tuple[float, float], weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """distgan's Adam: fused (one kernel per step, on the CPU too), so the NaN/Inf guard hands it its
    flag as `found_inf` and it skips a bad update on the device, with no copy of the model. With
    `weight_decay` > 0 it is AdamW (decoupled weight decay, train.weight_decay), fused the same way."""
    if weight_decay > 0:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)


@dataclasses.dataclass
class Judged:
    """One side (real or fake) of a D micro-step: D's input images before augmentation, their labels,
    the augmentation draws they were judged with, D's logits (None once their graph is gone), with
    multi-level guidance the noise draws of the levels, and with alignment D's projected tokens."""

    x: torch.Tensor
    y: torch.Tensor | None
    draws: augment.Draws | None
    logits: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # model.align.encoder: D's projected tokens


class GAN(Variant):
    supports_drs = True
    additive_rank_state = ("augment_sums",)  # ADA's partial sums (augment.Adaptive.state)

    @classmethod
    def check_config(cls, cfg) -> None:
        models.check_config(cfg)  # the model families of models/ (image-to-image variants check their own)
        super().check_config(cfg)
        v = cfg.variant
        if v.multilevel:
            if cfg.model.g.arch != "vit":
                raise UserError(
                    f"variant.multilevel judges a vit G's partial outputs; model.g.arch is '{cfg.model.g.arch}' "
                    "(set model.g.arch=vit or variant.multilevel=false)"
                )
            if cfg.model.vit.levels < 2:
                raise UserError("variant.multilevel needs model.vit.levels >= 2 (GAT: 4)")
            if v.pack > 1:
                raise UserError("variant.multilevel does not combine with variant.pack > 1")

    @classmethod
    def differentiates_twice(cls, cfg) -> str:
        settings = cls.penalties(cfg)
        if cfg.variant.penalty_mode != "exact" or not settings:
            return ""
        return f"exact gradient penalties ({', '.join(settings.values())})"

    @classmethod
    def penalties(cls, cfg) -> dict[str, str]:
        """The gradient penalties of D's loss (variant.penalty_mode applies to them): their logged
        names and the settings that turn them on."""
        v = cfg.variant
        return {f"loss/{k[:2]}": f"variant.{k}={getattr(v, k)}" for k in ("r1_gamma", "r2_gamma") if getattr(v, k) > 0}

    @classmethod
    def compile_hint(cls, cfg) -> str:
        return (
            "Set variant.penalty_mode=approx (a finite difference: the whole step compiles) or "
            "variant.penalty_mode=lazy (the exact penalty every variant.penalty_every D steps, in an eager "
            "step of its own; the other steps compile), or train.compile=false"
        )

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
        self.ada_multipliers = augment.multipliers(cfg.data.ada_multipliers)
        self.lecam_ema: torch.Tensor | None = None  # LeCam: EMAs of D's mean (real, fake) outputs
        self.ada = None  # data.augment_p=auto: ADA's adaptive strength, else a fixed probability
        if self.augment and cfg.data.augment_p == "auto":
            self.ada = augment.Adaptive(cfg.data.augment_target)
        self.augment_p = 1.0 if cfg.data.augment_p == "auto" else float(cfg.data.augment_p)
        self.gamma_factor = self.augment_factor = 1.0  # train.schedule_images: set per step (set_schedule)
        self._decoder = None  # data.kind=latents: model.vae, loaded when a sample is first decoded
        self.guidance = (
            guidance.Guidance(cfg.model.vit.levels, cfg.variant.multilevel_min_info) if cfg.variant.multilevel else None
        )
        a = cfg.model.align  # the frozen encoder of the alignment term, not one of self.models: never saved
        self.aligner = align.Encoder(a.encoder, a.resolution) if a.encoder else None
        if cfg.data.batch_size % self.pack:
            raise UserError(f"data.batch_size={cfg.data.batch_size} must be a multiple of variant.pack={self.pack}")
        G, D = self.build(cfg)
        self.models = {"G": G, "D": D}
        self.optimizers = {
            "G": self.optimizer(G, cfg.train.lr_g * models.lr_scale(cfg, "g")),
            "D": self.optimizer(D, cfg.train.lr_d * models.lr_scale(cfg, "d")),
        }
        self.penalty_terms = tuple(self.penalties(cfg))  # their log names ("loss/r1", ...)
        if cfg.variant.penalty_mode == "lazy" and self.penalty_terms:  # k + 1 D updates per k batches
            penalties.rescale_for_lazy(self.optimizers["D"], cfg.variant.penalty_every)

    def build(self, cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
        G = models.build_generator(cfg)  # (G first: the initial weights come from the seeded RNG in this order)
        return G, models.build_discriminator(cfg, channels=self.d_channels(cfg), align_dim=self.align_dim)

    @property
    def align_dim(self) -> int:
        """The width of the frozen encoder's features that D projects onto (0: no alignment)."""
        return self.aligner.width if self.aligner is not None else 0

    def d_channels(self, cfg) -> int:
        """Channels of D's input: the images' times the pack size or the guidance levels."""
        return cfg.data.channels * self.pack * (self.guidance.levels if self.guidance else 1)

    def labels(self, n: int, device, real: torch.Tensor | None = None) -> torch.Tensor | None:
        """Labels for n fakes judged beside the reals labelled `real` (cgan: uniform over the classes,
        or `real` itself with variant.fake_labels=real when given); None when unconditional."""
        return None

    def generate(self, G, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Fakes for training: (B, C, H, W), or (B, L, C, H, W) G's levels under multi-level guidance."""
        return self.levels_of(G(z, None, levels=True)) if self.guidance else G(z)

    @staticmethod
    def levels_of(outputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(outputs, dim=1)

    def discriminate(
        self, D, x: torch.Tensor, y: torch.Tensor | None, draws: augment.Draws | None = None, noise=None, features=False
    ):
        """D's logits in training: after data.augment (DiffAugment, on real and fake alike; `draws`
        replays given random draws, else fresh ones), then packing or the guidance levels (`noise`
        replays their noise draws). With `features`: (logits, D's projected tokens)."""
        x = self.d_input(x, draws, noise)
        if self.pack > 1:  # (B, C, H, W) -> (B / m, m C, H, W): m consecutive samples per D input
            x = x.reshape(x.size(0) // self.pack, self.pack * x.size(1), *x.shape[2:])
        return D(x, features=True) if features else D(x)

    def d_input(self, x: torch.Tensor, draws: augment.Draws | None = None, noise: torch.Tensor | None = None):
        """x augmented; under multi-level guidance its levels (reals: x repeated) noised and stacked."""
        x = self.augmented(x, draws)
        return self.guidance.stack(x, noise) if self.guidance is not None else x

    def set_schedule(self, scheduled) -> None:
        self.gamma_factor, self.augment_factor = scheduled.gamma_factor, scheduled.augment_factor

    def augment_strength(self) -> float | torch.Tensor:
        return self.ada.p if self.ada is not None else self.augment_p * self.augment_factor

    def augmented(self, x: torch.Tensor, draws: augment.Draws | None = None) -> torch.Tensor:
        """x through data.augment at the current strength (the identity without augmentation); G's
        levels (B, L, C, H, W) all with the same draws."""
        if not self.augment:
            return x
        if x.ndim == 5:
            draws = draws if draws is not None else self.draw_augment(x)
            return torch.stack([self.augmented(x[:, i], draws) for i in range(x.size(1))], dim=1)
        return augment.apply(self.augment, x, self.augment_strength(), draws, self.ada_multipliers)

    def draw_augment(self, x: torch.Tensor) -> augment.Draws | None:
        """Fresh augmentation draws for a batch like x (one per sample, shared by its levels)."""
        if not self.augment:
            return None
        return augment.draw(self.augment, x[:, 0] if x.ndim == 5 else x, self.augment_strength(), self.ada_multipliers)

    def side(self, x: torch.Tensor, y: torch.Tensor | None) -> Judged:
        """x and its labels with fresh augmentation (and guidance noise) draws, to be judged (maybe more
        than once) by D."""
        return Judged(x, y, self.draw_augment(x), noise=self.guidance.draw(x) if self.guidance else None)

    def judge(self, D, x: torch.Tensor, y: torch.Tensor | None, features: bool = False) -> Judged:
        """D's logits for x with the augmentation draws kept (the penalties replay them); with
        `features`, D's projected tokens too (the alignment term)."""
        side = self.side(x, y)
        out = self.discriminate(D, x, y, side.draws, side.noise, features=features)
        side.logits, side.features = out if features else (out, None)
        return side

    def align_term(self, real: Judged, raw: torch.Tensor) -> torch.Tensor:
        """model.align.weight x the alignment loss (distgan/align.py) of D's projected tokens for the reals
        with the frozen encoder's features of their images `raw` (translated as D's input was)."""
        raw = align.translated(raw, self.augment, real.draws, real.x.shape[-1])
        e_cls, e_patches = self.aligner.to(raw.device)(raw)
        d_cls, d_patches = real.features
        return self.cfg.model.align.weight * align.loss(d_cls, d_patches, e_cls, e_patches).mean()

    def optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        t = self.cfg.train
        return adam(model.parameters(), lr, (t.beta1, t.beta2), t.weight_decay)

    def noise(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is not None:  # a fixed generator (sample grids) lives on its own device
            return torch.randn(n, self.z_dim, generator=generator, device=generator.device).to(device)
        return torch.randn(n, self.z_dim, device=device)

    def d_penalty(self, D, real: Judged, fake: Judged, ctx, mode: str) -> dict[str, torch.Tensor]:
        """Extra terms of D's loss (named, weighted): the R1 penalty on reals when variant.r1_gamma > 0
        and R2, the same on fakes, when variant.r2_gamma > 0 (R3GAN uses both), each computed as
        `mode` says (exact or approx; distgan/penalties.py), on the augmentation draws D judged with."""
        v, terms, k = self.cfg.variant, {}, self.gamma_factor
        if v.r1_gamma > 0:
            terms["loss/r1"] = k * v.r1_gamma / 2 * self.sq_grad(D, real, ctx, mode)
        if v.r2_gamma > 0:
            terms["loss/r2"] = k * v.r2_gamma / 2 * self.sq_grad(D, fake, ctx, mode)
        return terms

    def critic(self, D, side: Judged):
        """D as a function of images alone: labels bound, packing, augmentation and noise draws fixed."""
        return lambda x: self.discriminate(D, x, side.y, side.draws, side.noise)

    def sq_grad(self, D, side: Judged, ctx, mode: str) -> torch.Tensor:
        """E |grad_x D(x)|^2 on one side, exact or by the finite difference (in fp32; reusing D's logits
        when the step already computed them in fp32)."""
        if mode != "approx":
            return penalties.exact_sq_grad(self.critic(D, side), side.x)
        base = None if ctx.mixed_precision else side.logits
        sigma = self.cfg.variant.penalty_sigma
        return penalties.approx_sq_grad(self.critic(D, side), side.x, sigma, base, ctx.full_precision(D))

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

    def d_step(self, batches: list[dict], ctx, stats: dict, index: int = 0) -> None:
        """D step `index` of this step (0 .. n_critic - 1): D's loss with LeCam and the penalties, one
        optimizer step; with variant.penalty_mode=lazy the penalties instead come in a regularisation
        step of their own after every variant.penalty_every-th D step of the run."""
        D, G, opt_d = self.models["D"], self.models["G"], self.optimizers["D"]
        v = self.cfg.variant
        device = batches[0]["image"].device
        share = 1.0 / (len(batches) * self.n_critic)  # of the step's mean, per micro-batch
        lazy = v.penalty_mode == "lazy"
        regularise = lazy and penalties.regularises(ctx.global_step * self.n_critic + index, v.penalty_every)
        sides = []  # (real, fake) per micro-batch, for the lazy regularisation step
        opt_d.zero_grad(set_to_none=True)
        for mb in ctx.micro(D, batches):
            y_fake = self.labels(mb["image"].size(0), device, mb.get("label"))
            with torch.no_grad():
                fake_x = self.generate(G, self.noise(mb["image"].size(0), device), y_fake)
            real = self.judge(D, mb["image"], mb["label"], features=self.aligner is not None)
            fake = self.judge(D, fake_x, y_fake)
            if self.ada is not None:
                self.ada.observe(real.logits, real.x.size(0))
            loss = losses.d_loss(self.loss, real.logits, fake.logits)
            if self.aligner is not None:  # latent data: the images stored beside the latents
                term = self.align_term(real, mb.get("raw", mb["image"]))
                loss = loss + term
                stats["loss/align"] = stats.get("loss/align", 0) + term.detach() * share
            if v.lecam_weight > 0:
                term = self.lecam_term(real.logits, fake.logits)
                loss = loss + term
                stats["loss/lecam"] = stats.get("loss/lecam", 0) + term.detach() * share
            if not lazy:
                for name, term in self.d_penalty(D, real, fake, ctx, v.penalty_mode).items():
                    loss = loss + term
                    stats[name] = stats.get(name, 0) + term.detach() * share
            ctx.backward(loss)
            stats["loss/d"] += loss.detach() * share
            stats["d/real"] += real.logits.detach().float().mean() * share
            stats["d/fake"] += fake.logits.detach().float().mean() * share
            if regularise:
                real.logits = fake.logits = None
                sides.append((real, fake))
            elif lazy:  # the penalties' log keys on every step (their average over steps is then per step)
                for name in self.penalty_terms:
                    stats.setdefault(name, torch.zeros((), device=device))
        ctx.step(opt_d)
        self.after_d_step(ctx.unwrap(D))
        if regularise:
            self.regularisation_step(batches, sides, ctx, stats)

    def regularisation_step(self, batches: list[dict], sides: list[tuple[Judged, Judged]], ctx, stats) -> None:
        """Lazy regularisation (StyleGAN2): the exact penalties on the D step's own real and fake
        micro-batches (and augmentation draws), weighted by variant.penalty_every, in an optimizer step
        of their own. D runs uncompiled here (its forward is differentiated twice). The logged terms
        carry the weight k, so their average over steps compares with the exact mode's."""
        D, opt_d = self.models["D"], self.optimizers["D"]
        every = self.cfg.variant.penalty_every
        share = 1.0 / (len(batches) * self.n_critic)
        opt_d.zero_grad(set_to_none=True)
        with ctx.eager(D):
            for _, (real, fake) in zip(ctx.micro(D, batches), sides):
                terms = self.d_penalty(D, real, fake, ctx, "exact")
                loss = sum(terms.values()) * every
                for name, term in terms.items():
                    stats[name] = stats.get(name, 0) + term.detach() * every * share
                ctx.backward(loss)
        ctx.step(opt_d)
        self.after_d_step(ctx.unwrap(D))

    def train_step(self, batches: list[dict], ctx) -> dict[str, torch.Tensor]:
        device = batches[0]["image"].device
        stats = {k: torch.zeros((), device=device) for k in ("loss/d", "loss/g", "d/real", "d/fake")}
        per = len(batches) // self.n_critic
        for i in range(self.n_critic):
            self.d_step(batches[i * per : (i + 1) * per], ctx, stats, i)

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
                y = self.labels(n, device, mb.get("label"))
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
        return self.to_images(G(self.noise(n, device, generator)).float())

    def to_images(self, out: torch.Tensor) -> torch.Tensor:
        """G's output as samples: latents decoded by model.vae (data.kind=latents), images clamped to
        [-1, 1], points as they are."""
        if self.cfg.data.kind == "latents":
            return self.decoder().to(out.device).decode(out)
        return out.clamp(-1, 1) if out.ndim == 4 else out

    def decoder(self):
        """model.vae (distgan/vae.py), loaded once, on the first call."""
        if self._decoder is None:
            from distgan import vae

            self._decoder = vae.VAE(self.cfg.model.vae)
        return self._decoder
