"""One training step's machinery around the variant's `train_step`: `StepContext` (micro-batches,
backward, the optimizer step and its NaN/Inf undo, decided on the device), `NanGuard` (the whole
NaN/Inf guard: buffers put back, flags kept and read at log steps, train.on_nan), the EMA update
and the schedules (learning rate, Adam beta2, penalty weight, augmentation strength, EMA half-life).
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch

from distgan import checkpoint, config
from distgan.errors import RunFailed


def clip_gradients(grads: list[torch.Tensor], norms: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` (their L2 norms `norms`) in place so their total norm is at most `max_norm`:
    torch.nn.utils.clip_grad_norm_'s rule (factor max_norm / (norm + 1e-6), capped at 1), on the
    device with no host sync. Non-finite gradients stay non-finite (the step is skipped anyway)."""
    total = torch.linalg.vector_norm(norms.float())
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, factor.to(grads[0].dtype))


class StepContext:
    """What a variant's `train_step` needs from the trainer: micro-batching and model plumbing."""

    def __init__(self, accelerator, accum: int, optimizer_names: dict[int, str] | None = None, grad_clip: float = 0.0):
        self.accelerator = accelerator
        self.accum = accum
        self.grad_clip = grad_clip  # train.grad_clip: the gradients' largest total L2 norm per optimizer
        self.optimizer_names = optimizer_names or {}
        # (optimizer name, device flag: its update was undone for NaN/Inf gradients), this step
        self.nonfinite: list[tuple[str, torch.Tensor]] = []
        self.global_step = 0  # steps done before this one (srgan's pre-training phase reads it)

    def micro(self, model: torch.nn.Module | tuple[torch.nn.Module, ...], batches: list[dict]):
        """Yield the micro-batches; gradients of `model` (or of each of a tuple of models) are
        all-reduced only on the last one."""
        group = model if isinstance(model, tuple) else (model,)
        for i, mb in enumerate(batches):
            with contextlib.ExitStack() as stack:
                if i < len(batches) - 1:
                    for m in group:
                        stack.enter_context(self.accelerator.no_sync(m))
                yield mb

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled so the accumulated gradient is the mean."""
        self.accelerator.backward(loss / self.accum)

    def step(self, optimizer) -> None:
        """optimizer.step(), unless a gradient is NaN or Inf: then there is no update, decided on the
        device without a host sync; the flag goes into `nonfinite`, which the trainer reads at the next
        log or checkpoint step (train.on_nan). Gradients are all-reduced by then, so every rank decides
        the same. A fused optimizer (distgan's Adams are `fused=True`) takes the flag itself as
        `found_inf`, as under GradScaler, and skips its update on the device: nothing is copied. Any
        other optimizer (WGAN's RMSprop) steps, then its parameters and state take their previous
        values back where the flag is set (torch.where on a copy made before the step). With fp16,
        the gradient scaler makes this decision itself (an overflow there is routine: it lowers the
        scale and skips the step, reading its flag on the host as GradScaler always does)."""
        inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
        params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
        if self.accelerator.scaler is not None:  # its own skip is routine (the scale drops): not a NaN step
            if self.grad_clip > 0 and params:  # (Accelerate unscales the gradients first)
                self.accelerator.clip_grad_norm_(params, self.grad_clip)
            optimizer.step()
            return
        if not params:
            optimizer.step()
            return
        norms = torch.stack(torch._foreach_norm([p.grad for p in params]))
        bad = ~torch.isfinite(norms).all()
        if self.grad_clip > 0:
            clip_gradients([p.grad for p in params], norms, self.grad_clip)
        self.nonfinite.append((self.optimizer_names.get(id(optimizer), "optimizer"), bad))
        if inner.defaults.get("fused"):
            inner.found_inf = bad.float()
            try:
                optimizer.step()
            finally:
                del inner.found_inf
            return
        before = [p.detach().clone() for p in params]
        state_before = {
            (i, k): v.clone()
            for i, p in enumerate(params)
            for k, v in inner.state.get(p, {}).items()
            if isinstance(v, torch.Tensor)
        }
        optimizer.step()
        with torch.no_grad():
            for i, (p, old) in enumerate(zip(params, before)):
                p.copy_(torch.where(bad, old, p))
                for k, v in inner.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):  # state made by this very step goes back to zeros
                        old_v = state_before.get((i, k))
                        v.copy_(torch.where(bad, old_v if old_v is not None else torch.zeros_like(v), v))

    def pop_nonfinite(self) -> tuple[list[str], torch.Tensor] | None:
        """(optimizer names, their NaN/Inf flags as one device tensor) of this step, or None."""
        if not self.nonfinite:
            return None
        names, flags = zip(*self.nonfinite)
        self.nonfinite = []
        return list(names), torch.stack([f.to(flags[0].device) for f in flags])

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    @property
    def mixed_precision(self) -> bool:
        """Whether the models' forwards run under bf16/fp16 autocast (Accelerate's)."""
        return self.accelerator.mixed_precision in ("bf16", "fp16")

    @contextlib.contextmanager
    def full_precision(self, model: torch.nn.Module):
        """`model`'s forward without Accelerate's autocast (fp32) inside the block; the approximate
        penalties' finite difference needs it. Nothing changes without mixed precision."""
        plain = self.unwrap(model)
        wrapped = plain.__dict__.get("forward")
        original = getattr(plain, "_original_forward", None)
        if wrapped is None or original is None:
            yield
            return
        plain.forward = original
        try:
            yield
        finally:
            plain.forward = wrapped

    @contextlib.contextmanager
    def eager(self, model: torch.nn.Module):
        """`model` without its torch.compile (train.compile) inside the block: the lazy penalties'
        regularisation step differentiates its forward twice, which a compiled module cannot."""
        plain = self.unwrap(model)
        compiled = getattr(plain, "_compiled_call_impl", None)
        plain._compiled_call_impl = None
        try:
            yield
        finally:
            plain._compiled_call_impl = compiled

    @contextlib.contextmanager
    def frozen(self, model: torch.nn.Module):
        """The plain (non-DDP) module with its parameters frozen: use it as a fixed function,
        e.g. D in the generator step, so no gradient for it is computed or all-reduced."""
        plain = self.unwrap(model)
        flags = [p.requires_grad for p in plain.parameters()]
        plain.requires_grad_(False)
        try:
            yield plain
        finally:
            for p, flag in zip(plain.parameters(), flags):
                p.requires_grad_(flag)


class BufferGuard:
    """The models' buffers (BatchNorm statistics and counts, spectral norm's u, v) as they were before
    the step, to undo what a step with NaN/Inf gradients did to them."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.buffers = [b for m in modules for b in m.buffers()]
        self.before = [b.clone() for b in self.buffers]

    def snapshot(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.before, self.buffers)

    @torch.no_grad()
    def restore_where(self, bad: torch.Tensor) -> None:
        """Each buffer as it was before the step where the device flag `bad` is set (no host sync)."""
        for b, old in zip(self.buffers, self.before):
            b.copy_(torch.where(bad, old, b))


class NanGuard:
    """The NaN/Inf guard, whole. `StepContext.step` undoes an optimizer update whose gradients are not
    finite and reports its device flag; `after_step` puts the models' buffers (BatchNorm statistics, u,
    v) back where a flag is set and keeps the flags; `resolve` reads the kept flags at once (one host
    read, at a log or checkpoint step) and applies train.on_nan. No host read in a step."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.buffers = BufferGuard(modules)
        self.pending: list[tuple[int, list[str], torch.Tensor]] = []  # (step, optimizer names, device flags)
        self.consecutive = 0

    def before_step(self) -> None:
        self.buffers.snapshot()

    def after_step(self, ctx: StepContext, step: int) -> torch.Tensor | None:
        """After step `step`'s train_step: the device flag "some update of this step was undone" (None
        when no optimizer stepped), with the buffers already put back where it is set."""
        nonfinite = ctx.pop_nonfinite()
        if nonfinite is None:
            return None
        names, flags = nonfinite
        bad = flags.any()
        self.buffers.restore_where(bad)
        self.pending.append((step, names, flags))
        return bad

    def resolve(self, run) -> int:
        """Read the pending NaN/Inf flags (one host read) and apply train.on_nan to each flagged step in
        order: a warning and a `nonfinite` event, or RunFailed (train.on_nan=stop, or
        train.max_nan_skips in a row). Those steps' updates and buffer updates were already undone.
        Returns how many steps were skipped."""
        if not self.pending:
            return 0
        skipped = 0
        flags = torch.cat([f.reshape(-1) for _, _, f in self.pending]).tolist()
        t, i = run.cfg.train, 0
        for step, names, _ in self.pending:
            what = ", ".join(n for n, bad in zip(names, flags[i : i + len(names)]) if bad)
            i += len(names)
            if not what:
                self.consecutive = 0
                continue
            self.consecutive += 1
            if t.on_nan == "stop" or self.consecutive >= t.max_nan_skips:
                self.pending = []
                steps = checkpoint.list_steps(run.run_dir)
                last = f"the newest checkpoint, '{steps[-1]}', is intact" if steps else "no checkpoint was written yet"
                why = (
                    "train.on_nan=stop"
                    if t.on_nan == "stop"
                    else f"{self.consecutive} steps in a row (train.max_nan_skips={t.max_nan_skips})"
                )
                raise RunFailed(
                    f"step {step}: NaN/Inf gradients in {what}; stopping ({why}). Nothing was saved from this "
                    f"state; {last}. Try lower learning rates, train.mixed_precision=bf16 instead of fp16, or a "
                    "spectral-norm discriminator (model.d.spectral_norm=true)"
                )
            skipped += 1
            if run.main:
                print(
                    f"warning: step {step}: NaN/Inf gradients in {what}; update skipped (train.on_nan=skip)",
                    file=sys.stderr,
                )
            run.tracker.event("nonfinite", step, skipped=what)
        self.pending = []
        return skipped


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_beta(beta: float, step: int) -> float:
    """Warm-up: average over the steps so far while there are few of them."""
    return min(beta, (1.0 + step) / (10.0 + step))


def lr_factor(t: config.TrainConfig, step: int) -> float:
    """The multiplier of every base learning rate at 0-based `step` (train.lr_decay): stateless, so a
    resumed run follows the same schedule."""
    start = int(t.lr_decay_start * t.steps)
    if t.lr_decay == "none" or step < start:
        return 1.0
    return (t.steps - step) / (t.steps - start)


def cosine(start: float, end: float, images: float, horizon: float) -> float:
    """start -> end along half a cosine over `horizon` images, then end (R3GAN's schedules)."""
    if images >= horizon:
        return end
    return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * images / horizon))


@dataclass(frozen=True)
class Scheduled:
    """Every scheduled value at one step: functions of the step (and so of the images seen) alone, so a
    resumed run follows the same schedule."""

    images: int  # images seen before this step: step x data.batch_size x train.grad_accum x processes
    lr_factor: float | None  # multiplies every base learning rate; None: constant
    beta2: float | None  # Adam's beta2 (before lazy regularisation's rescaling); None: constant
    gamma_factor: float = 1.0  # multiplies variant.r1_gamma and r2_gamma
    augment_factor: float = 1.0  # multiplies a fixed data.augment_p
    ema_beta: float = 0.0  # the EMA decay of this step
    ema_halflife: float | None = None  # images; None: from train.ema_beta


def schedule(cfg: config.Config, step: int, world: int) -> Scheduled:
    """The schedules at 0-based `step` of a run of `world` processes: train.lr_decay, or with
    train.schedule_images > 0 R3GAN's cosine ramps over that many images (lr x 1 -> train.lr_end_factor,
    beta2 train.beta2_start -> train.beta2, gamma x 1 -> variant.gamma_end_factor, a fixed augment p
    x 0 -> 1, the EMA half-life 0 -> train.ema_halflife_images), held at their ends afterwards."""
    t = cfg.train
    images = step * cfg.data.batch_size * t.grad_accum * world
    horizon = t.schedule_images
    if not horizon:
        lr = None if t.lr_decay == "none" else lr_factor(t, step)
        return Scheduled(images, lr, None, ema_beta=ema_beta(t.ema_beta, step))
    halflife = cosine(0.0, t.ema_halflife_images, images, horizon) if t.ema_halflife_images else None
    per_step = cfg.data.batch_size * t.grad_accum * world
    beta = 0.5 ** (per_step / max(halflife, 1e-8)) if halflife is not None else ema_beta(t.ema_beta, step)
    return Scheduled(
        images,
        cosine(1.0, t.lr_end_factor, images, horizon),
        cosine(t.beta2_start, t.beta2, images, horizon),
        cosine(1.0, cfg.variant.gamma_end_factor, images, horizon),
        cosine(0.0, 1.0, images, horizon),
        beta,
        halflife,
    )


def apply_schedule(optimizers, t: config.TrainConfig, s: Scheduled) -> None:
    """Set every optimizer's learning rates and Adam beta2 to the schedule's values. A group's base
    values are its `initial_lr` / `initial_betas` (lazy regularisation's rescaled ones for its D: the
    scheduled beta2 gets the same power, beta2^r)."""
    for opt in optimizers:
        for group in opt.param_groups:
            if s.lr_factor is not None:
                group["lr"] = group["initial_lr"] * s.lr_factor
            if s.beta2 is not None and "betas" in group:
                b1, b2 = group["initial_betas"]
                power = math.log(b2) / math.log(t.beta2) if 0.0 < t.beta2 < 1.0 and 0.0 < b2 < 1.0 else 1.0
                group["betas"] = (b1, s.beta2**power)
