"""The training loop: Accelerator, steps, EMA, NaN guard, signals; the periodic jobs are in jobs.py.

Read top to bottom, `train()` does:
1. decide what to resume from and check everything (config, checkpoint, shards) before it
   writes a single file, so a bad input never damages an existing run directory;
2. build the variant's models and optimizers from one seed (identical on every rank), load the
   checkpoint into them, and prepare them all in one Accelerator;
3. `_loop`: open the data feeds (data/feeds.py) where the checkpoint left them
   (checkpoint.resume_point), then per step draw `train.grad_accum` micro-batches, call
   `variant.train_step`, undo a NaN step's buffer updates, average buffers, update the EMA, and
   run what is due of the periodic jobs (jobs.periodic: log, sample grid, eval, checkpoint);
4. on SIGINT/SIGTERM every rank stops at the same step, checkpoints and exits 128 + signal.
The loop knows nothing about any one variant.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from distgan import checkpoint, config, files, jobs, rng, variants
from distgan.data import feeds, stream
from distgan.errors import RunFailed, UserError
from distgan.tracking import Tracker


class StepContext:
    """What a variant's `train_step` needs from the trainer: micro-batching and model plumbing."""

    def __init__(self, accelerator, accum: int, optimizer_names: dict[int, str] | None = None):
        self.accelerator = accelerator
        self.accum = accum
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
        """optimizer.step(), unless a gradient is NaN or Inf: then the update is undone, decided on the
        device without a host sync. The step runs, and the parameters and optimizer state take their
        previous values back where the gradients were not finite (torch.where); the flag goes into
        `nonfinite`, which the trainer reads at the next log or checkpoint step (train.on_nan).
        Gradients are all-reduced by then, so every rank decides the same. With fp16, the gradient
        scaler makes this decision itself (an overflow there is routine: it lowers the scale and
        skips the step, reading its flag on the host as GradScaler always does)."""
        if self.accelerator.scaler is not None:  # its own skip is routine (the scale drops): not a NaN step
            optimizer.step()
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer
        params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            optimizer.step()
            return
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params]))).all()
        before = [p.detach().clone() for p in params]
        state_before = {
            (i, k): v.clone() for i, p in enumerate(params) for k, v in inner.state.get(p, {}).items()
            if isinstance(v, torch.Tensor)
        }  # fmt: skip
        optimizer.step()
        with torch.no_grad():
            for i, (p, old) in enumerate(zip(params, before)):
                p.copy_(torch.where(bad, old, p))
                for k, v in inner.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):  # state made by this very step goes back to zeros
                        old_v = state_before.get((i, k))
                        v.copy_(torch.where(bad, old_v if old_v is not None else torch.zeros_like(v), v))
        self.nonfinite.append((self.optimizer_names.get(id(optimizer), "optimizer"), bad))

    def pop_nonfinite(self) -> tuple[list[str], torch.Tensor] | None:
        """(optimizer names, their NaN/Inf flags as one device tensor) of this step, or None."""
        if not self.nonfinite:
            return None
        names, flags = zip(*self.nonfinite)
        self.nonfinite = []
        return list(names), torch.stack([f.to(flags[0].device) for f in flags])

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

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


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and stops.
    A second SIGINT stops at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def average_buffers(modules: list[torch.nn.Module], world: int) -> None:
    """Average floating-point buffers (BatchNorm running stats) over ranks, once per step.

    DDP keeps parameters identical but each rank updates its buffers from its own batch (and D's
    again in the G step, which runs outside DDP), so without this they would drift apart (DDP's
    own buffer broadcast is off). One all-reduce for all of them keeps every rank's model identical.
    Spectral norm's u, v are left out: they are a deterministic function of the (identical)
    weights and their own previous values, so they are already identical on every rank."""
    from kernels.reference import SpectralNorm

    buffers = [
        b
        for m in modules
        for sub in m.modules()
        if not isinstance(sub, SpectralNorm)
        for b in sub.buffers(recurse=False)
        if b.is_floating_point()
    ]
    if world == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(
        buffers, [v.view_as(b).to(b.dtype) for v, b in zip(flat.split([b.numel() for b in buffers]), buffers)]
    )


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


def make_accelerator(cfg: config.Config, with_wandb: bool):
    from datetime import timedelta

    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    precision = cfg.train.mixed_precision
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=None if precision == "auto" else precision,
            log_with="wandb" if with_wandb else None,
            # No buffer broadcast at every forward: BatchNorm stats are averaged once per step
            # (average_buffers) and spectral norm's u, v are identical on every rank by construction.
            # Broadcasting in place would also break a D called on real and then fake before backward.
            kwargs_handlers=[
                DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s)),
            ],
        )
    except (ValueError, RuntimeError) as exc:
        raise UserError(
            f"cannot set up Accelerate with train.mixed_precision={cfg.train.mixed_precision}: {exc}"
        ) from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        _release(accelerator.num_processes)
        raise UserError(
            "fp16 mixed precision needs a GPU: on the CPU Accelerate applies neither fp16 autocast nor a gradient "
            "scaler, so the run would silently be fp32. Use train.mixed_precision=bf16 (or no) on the CPU"
        )
    return accelerator


# What cannot change on a resume: what shapes the models and the data they take. (Optimizer settings
# can: they are applied over the checkpoint's, see apply_hyperparameters.)
FIXED_ON_RESUME = ("model", "variant.name", "data.kind", "data.channels", "data.input_channels", "data.resolution")


def check_compatible(ckpt: checkpoint.Checkpoint, cfg: config.Config) -> None:
    """The checkpoint's model-shaping config must equal ours: one line naming every key that differs."""
    theirs = ckpt.meta.get("config", {})
    ours = config.to_dict(cfg)
    differ = []
    for key in FIXED_ON_RESUME:
        a, b = theirs, ours
        for k in key.split("."):
            a, b = (a or {}).get(k), (b or {}).get(k)
        if a is None and key != "model":  # a checkpoint from before the key existed: its default
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            differ += [f"{key}.{k}={x!r} -> {y!r}" for k, x, y in _changed_leaves(a, b)]
        elif a != b:
            differ.append(f"{key}={a!r} -> {b!r}")
    if differ:
        raise UserError(
            f"checkpoint '{ckpt.path}' cannot resume with {', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''} "
            "(these keys cannot change on resume); resume with the checkpoint's values or start a new --out"
        )


def _changed_leaves(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) of every leaf where two config trees differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _changed_leaves(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append((f"{prefix}{k}", x, y))
    return out


def _find_resume(resume: str | None, run_dir: Path) -> checkpoint.Checkpoint | None:
    if resume == "auto":
        # The newest checkpoint that reads back whole. Writes are atomic, so an unreadable one means
        # damage from outside (a full disk, a bad copy): say so and fall back to the one before.
        steps = checkpoint.list_steps(run_dir)
        for path in reversed(steps):
            try:
                return checkpoint.load(path)
            except UserError as exc:
                print(f"warning: skipping checkpoint: {exc}", file=sys.stderr)
        if steps:
            raise UserError(f"no checkpoint in '{checkpoint.checkpoints_dir(run_dir)}' reads back whole; see above")
        return None
    if resume:
        return checkpoint.load(resume)
    if checkpoint.list_steps(run_dir):
        raise UserError(
            f"run directory '{run_dir}' already has checkpoints; pass --resume auto to continue it, "
            "or choose another --out"
        )
    return None


def train(
    cfg: config.Config, run_dir: str | Path, resume: str | None = None, data: Iterable[dict] | None = None
) -> int:
    """Train `cfg` into `run_dir`; returns the process exit code (0, or 128+signal when stopped).

    `data` replaces the shard stream with your own iterable of batches ({"image": (B,C,H,W) in
    [-1, 1], "label": (B,)}); the benchmarks use it to feed in-memory data. Its position is not
    checkpointed, so a resume with it is not exact."""
    run_dir = Path(run_dir)
    t = cfg.train

    # 1. Check everything before writing anything.
    ckpt = _find_resume(resume, run_dir)
    if ckpt is not None:
        check_compatible(ckpt, cfg)
    if t.eval_ref:  # unusable statistics: one line now, not at the first evaluation
        from distgan.metrics import standard

        standard.RefStats.load(t.eval_ref)
    _check_keep_best(cfg, None)
    start = ckpt.step if ckpt else 0
    mode = cfg.tracking.wandb.mode
    accelerator = make_accelerator(cfg, with_wandb=mode != "disabled")
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    if start >= t.steps:
        if main:
            print(f"'{run_dir}' is already at step {start} >= train.steps={t.steps}; nothing to do.")
        return 0
    sources: dict[str, stream.ShardSource] = {}
    expected: dict[str, tuple | None] = {}
    if data is None:
        # {"": data.shards}, or one stream per domain for unpaired variants ({"a": ..., "b": ...})
        for name, (key, spec) in variants.get(cfg.variant.name).data_streams(cfg).items():
            with accelerator.local_main_process_first():
                sources[name] = stream.resolve(spec, progress=accelerator.is_local_main_process, key=key)
            expected[name] = _check_manifest(sources[name].manifest, cfg, key)
        _check_keep_best(cfg, sources)

    # 2. Models, optimizers, EMA: one seed, identical on every rank.
    rng.seed_all(t.seed)
    variant = variants.get(cfg.variant.name)(cfg)
    emas = {f"{n}_ema": copy.deepcopy(variant.models[n]).eval().requires_grad_(False) for n in variant.ema}
    changed = {}
    if ckpt is not None:
        for name, module in {**variant.models, **emas}.items():
            checkpoint.load_model(module, ckpt.model_state(name), f"checkpoint '{ckpt.path}' model '{name}'")
        configured = {n: [_hyper(g) for g in opt.param_groups] for n, opt in variant.optimizers.items()}
        for name, opt in variant.optimizers.items():
            try:
                opt.load_state_dict(ckpt.optimizer_state(name))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserError(f"checkpoint '{ckpt.path}': optimizer '{name}' does not fit: {exc}") from None
        changed = apply_hyperparameters(variant.optimizers, configured)
        if changed and accelerator.is_main_process:
            said = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            print(f"note: the config's optimizer settings differ from the checkpoint's; applied: {said}",
                  file=sys.stderr)  # fmt: skip
    for opt in variant.optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the base of train.lr_decay
    gpu_settings(cfg, accelerator.device, variant.models.values())

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(run_dir / "config.yaml", config.to_yaml(cfg))
    accelerator.wait_for_everyone()
    tracker = Tracker(accelerator, cfg, run_dir, config.to_dict(cfg))
    from kernels import _backend

    # which kernels spectral norm and minibatch discrimination run: Triton, or the PyTorch fallback
    tracker.event("kernels", start, backend=_backend.auto(accelerator.device))
    try:
        code = _loop(cfg, run_dir, accelerator, variant, emas, ckpt, sources, expected, tracker, rank, world, data,
                     changed)  # fmt: skip
    finally:
        tracker.close()
        _release(world)
    return code


def gpu_settings(cfg: config.Config, device: torch.device, models) -> None:
    """train.tf32, train.channels_last and train.compile, applied to the models in place (their
    state-dict keys do not change, so checkpoints are the same with and without them)."""
    t = cfg.train
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    if t.channels_last:
        for m in models:
            m.to(memory_format=torch.channels_last)
            for sub in m.modules():  # the spectral-norm kernels read W in its standard layout
                for plist in getattr(sub, "parametrizations", {}).values():
                    plist.original.data = plist.original.data.contiguous()
    if t.compile:  # (config.validate refuses the variants torch.compile cannot train)
        from kernels import _backend

        _backend.compile_ops = t.compile_kernels
        for m in models:
            m.compile()


def channels_last(batch: dict) -> dict:
    """train.channels_last: the batch's image tensors (N, C, H, W) in channels_last memory format."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}


def _release(world: int) -> None:
    """Let a later train() in this process build a fresh Accelerator (single-process runs only)."""
    if world == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def _check_keep_best(cfg: config.Config, sources: dict | None) -> None:
    """train.keep_best=fid needs a fid in the evaluations: refused before the first step, not at the first eval.
    With `sources` None (before any shard is read or built), only what the config alone rules out."""
    if cfg.train.keep_best != "fid":
        return
    from distgan import metrics

    own_metrics = variants.get(cfg.variant.name).image_to_image  # its own measures: no fid
    if sources is None:
        possible = not own_metrics and cfg.data.kind == "images"
    else:
        source = next(iter(sources.values()), None)
        names = metrics.applicable(cfg, source.manifest if source else None, inception=bool(cfg.train.eval_inception))
        possible = not own_metrics and "fid" in names
    if not possible:
        raise UserError(
            f"train.keep_best=fid, but no fid applies to this run ({cfg.variant.name} on {cfg.data.shards}); set "
            "train.eval_inception=FILE (docs/evaluation.md) or leave train.keep_best empty"
        )


def _check_manifest(manifest: dict | None, cfg: config.Config, key: str = "data.shards") -> tuple[int, int, int] | None:
    if not manifest:
        return None
    kind = manifest.get("kind", "images")
    where = "the shards" if key == "data.shards" else f"the shards of {key}"
    if kind != cfg.data.kind:
        raise UserError(f"{where} hold {kind} but data.kind={cfg.data.kind}; set data.kind={kind}")
    if kind == "paired" and "input_shape" in manifest:
        want = cfg.data.input_channels or cfg.data.channels
        got = manifest["input_shape"][2]
        if got != want:
            raise UserError(f"{where} hold {got}-channel inputs but data.input_channels={want}; "
                            f"set data.input_channels={got}")  # fmt: skip
    classes = len(manifest.get("classes") or [])
    if cfg.model.num_classes and classes > cfg.model.num_classes:
        raise UserError(
            f"the shards have {classes} classes but model.num_classes={cfg.model.num_classes}; "
            f"set model.num_classes={classes}"
        )
    if "image_shape" not in manifest:  # another tool's manifest (data/shards.py: MANIFEST_KEYS)
        return None
    shape = tuple(manifest["image_shape"])
    if kind == "points":
        if shape != (cfg.data.channels,):
            raise UserError(
                f"the shards hold {shape[0]}-d points but data.channels={cfg.data.channels}; "
                f"set data.channels={shape[0]}"
            )
        return None
    if shape[2] in (1, 3) and shape[2] != cfg.data.channels:  # (other tools' RGBA is converted)
        raise UserError(
            f"{where} hold {shape[2]}-channel images but data.channels={cfg.data.channels}; "
            f"set data.channels={shape[2]}"
        )
    return None if kind == "paired" else shape


def _loop(cfg, run_dir, accelerator, variant, emas, ckpt, sources, expected, tracker, rank, world, data,
          changed=None) -> int:  # fmt: skip
    """The steps: draw micro-batches, `variant.train_step`, buffers and EMA, then the periodic jobs."""
    t, main, device = cfg.train, accelerator.is_main_process, accelerator.device
    _prepare(accelerator, variant, emas)
    allreduces = _count_allreduces(variant.models.values())
    run = jobs.Run(cfg, run_dir, accelerator, variant, emas, tracker, sources=sources, keep_feed_state=data is None,
                   num_workers=stream.auto_workers(cfg.data.num_workers, device.type == "cuda"),
                   fixed_noise=torch.Generator(device="cpu").manual_seed(t.seed))  # fmt: skip
    # Per-rank randomness (noise, dropout) from the same seed, restored exactly on resume.
    rng.seed_all(stream.stream_seed(t.seed, rank, 2))
    resume = _resume(run, ckpt, changed) if ckpt is not None else None
    run.feeds = feeds.open_feeds(cfg, variant, sources, expected, rank=rank, world=world, num_workers=run.num_workers,
                                 device=device, resume=resume, data=data)  # fmt: skip
    ctx = StepContext(accelerator, t.grad_accum, {id(o): n for n, o in variant.optimizers.items()})
    guard = BufferGuard([accelerator.unwrap_model(m) for m in variant.models.values()])
    log = jobs.MetricLog(run.step)
    per_step = t.grad_accum * variant.data_per_step
    bar = tqdm(total=t.steps, initial=run.step, desc="train", disable=not main, dynamic_ncols=True, mininterval=1.0)
    try:
        with StopSignal() as stop:
            while run.step < t.steps:
                micro = feeds.draw(run.feeds, per_step, run.batches_done, run.logical_workers, device)
                if t.channels_last:
                    micro = [channels_last(mb) for mb in micro]
                run.batches_done += len(micro)
                run.preview_batch = run.preview_batch or micro[0]
                guard.snapshot()
                ctx.global_step = run.step
                factor = set_lr(variant.optimizers.values(), t, run.step)
                metrics = variant.train_step(micro, ctx)
                if factor is not None:
                    metrics["lr/factor"] = torch.full((), factor, device=device)  # a fill: no H2D copy
                nonfinite = ctx.pop_nonfinite()
                if nonfinite is not None:  # undo the buffer updates of a NaN/Inf step, on the device
                    guard.restore_where(nonfinite[1].any())
                log.add(metrics, run.step + 1, nonfinite)
                average_buffers([accelerator.unwrap_model(m) for m in variant.models.values()], world)
                for name, ema in emas.items():
                    live = accelerator.unwrap_model(variant.models[name[: -len("_ema")]])
                    ema_update(ema, live, ema_beta(t.ema_beta, run.step))
                run.step += 1
                bar.update(1)
                # with several ranks, agreeing on a stop is a host read: every train.stop_check_every
                # steps and at log and checkpoint steps, not every step
                due = any(run.step % n == 0 for n in (t.stop_check_every, t.log_every, t.ckpt_every))
                stopping = _agree_to_stop(stop.signum, device, world) if due or world == 1 else 0
                jobs.periodic(run, log, bar, stopping, len(micro), allreduces)
                if stopping:
                    break
    except (RuntimeError, dist.DistError) as exc:
        if world == 1 or not _comm_failure(exc):
            raise
        _lost_contact(exc, run)
    finally:
        feeds.close(run.feeds)
        bar.close()
    if run.saved_at != run.step:
        jobs.save(run, run.step)
    return _finish(run, stopping)


def _prepare(accelerator, variant, emas) -> None:
    """Wrap the variant's models (DDP) and optimizers in the Accelerator; EMA copies to the device."""
    names, opt_names = list(variant.models), list(variant.optimizers)
    prepared = accelerator.prepare(*[variant.models[n] for n in names], *[variant.optimizers[n] for n in opt_names])
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    variant.models = dict(zip(names, prepared[: len(names)]))
    variant.optimizers = dict(zip(opt_names, prepared[len(names) :]))
    for ema in emas.values():
        ema.to(accelerator.device)


def _resume(run: jobs.Run, ckpt: checkpoint.Checkpoint, changed: dict | None = None) -> checkpoint.ResumePoint:
    """This rank's RNG, stream positions and variant state from `ckpt` (models and optimizers are
    loaded in train()); a warning when the process/worker layout differs, so it cannot be exact."""
    point = checkpoint.resume_point(ckpt, run.rank, run.world, run.num_workers)
    run.step = point.step
    if point.exact:
        run.batches_done = point.batches
        rng.set_state(point.rng)
    if point.variant:
        run.variant.load_rank_state(point.variant)  # not exact: only its variant.shared.* part
    if not point.exact and run.main:
        data = ckpt.meta["data"]
        print(
            f"warning: checkpoint was made with {data['world_size']} processes x {data['num_workers']} workers, "
            f"this run has {run.world} x {run.num_workers}: the data stream and RNG restart, so the resume is "
            "not exact",
            file=sys.stderr,
        )
    if run.cfg.train.keep_best == "fid":
        best = checkpoint.recover_best(run.run_dir, jobs.BEST, "fid") if run.main else None
        run.accelerator.wait_for_everyone()
        best = best or checkpoint.read_best(run.run_dir, jobs.BEST)
        if best is not None:
            run.best_fid = float(best["fid"])
    # `optimizer`: settings of this invocation's config applied over the checkpoint's ({"G.lr": [old, new]})
    run.tracker.event("resume", point.step, checkpoint=str(ckpt.path), **({"optimizer": changed} if changed else {}))
    return point


# Optimizer hyper-parameters that come from the config (train.lr_g, lr_d, beta1, beta2 ...): a resume
# applies the config's values over the checkpoint's.
HYPER = ("lr", "betas", "eps", "weight_decay", "momentum", "alpha")


def _hyper(group: dict) -> dict:
    """A param group's config-given hyper-parameters; lr is the base one (train.lr_decay scales it)."""
    out = {k: group[k] for k in HYPER if k in group}
    if "lr" in out:
        out["lr"] = group.get("initial_lr", group["lr"])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def apply_hyperparameters(optimizers: dict, configured: dict[str, list[dict]]) -> dict[str, list]:
    """Set each optimizer's hyper-parameters back to `configured` (what the config built, before the
    checkpoint's state was loaded over it); {"NAME.KEY": [checkpoint's, config's]} of those that changed."""
    changed = {}
    for name, opt in optimizers.items():
        for group, want in zip(opt.param_groups, configured[name]):
            had = _hyper(group)
            for key, value in want.items():
                if had.get(key) == value:
                    continue
                changed.setdefault(f"{name}.{key}", [had.get(key), value])
                group[key] = tuple(value) if key == "betas" else value
                if key == "lr":
                    group["initial_lr"] = value  # set_lr scales it from the next step on
    return changed


def set_lr(optimizers, t: config.TrainConfig, step: int) -> float | None:
    """Every optimizer's learning rates at `step` under train.lr_decay; the factor, or None without decay."""
    if t.lr_decay == "none":
        return None
    factor = lr_factor(t, step)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
    return factor


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


def _lost_contact(exc: BaseException, run: jobs.Run) -> None:
    # The launcher SIGTERMs the survivors when it sees a rank die: finish saying why first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    steps = checkpoint.list_steps(run.run_dir)
    last = f"'{steps[-1]}' is intact" if steps else "none was written yet"
    raise RunFailed(
        f"rank {run.rank}: lost contact with the other ranks during step {run.step + 1} "
        f"({str(exc).strip().splitlines()[0][:200]}). Another rank died (see the launcher's summary), "
        f"hung for longer than dist.timeout_s={run.cfg.dist.timeout_s}, or the network failed. The newest "
        f"checkpoint, {last}; continue with --resume auto once every rank can run."
    ) from None


def _finish(run: jobs.Run, stopping: int) -> int:
    """Say how the run ended; the exit code (128 + signal when stopped)."""
    if stopping:
        if run.main:
            print(f"stopped by signal {stopping} at step {run.step}; checkpoint written; continue with --resume auto",
                  file=sys.stderr)  # fmt: skip
        return 128 + stopping
    if run.main:
        samples, ckpts = run.run_dir / "samples", checkpoint.checkpoints_dir(run.run_dir)
        print(f"done: {run.step} steps; samples in {samples}; checkpoints in {ckpts}")
        wandb_dir = run.tracker.run_dir_hint()
        if wandb_dir and run.tracker.mode == "offline":
            where = Path(wandb_dir).parent
            print(f"W&B offline run in {where}; upload it with: wandb sync {where}")
    return 0


class _Counter:
    def __init__(self):
        self.n = 0

    def pop(self) -> int:
        n, self.n = self.n, 0
        return n


def _count_allreduces(models) -> _Counter:
    """Count DDP's gradient all-reduces (one per bucket), through a comm hook that then runs the
    standard averaging all-reduce; logged as dist/grad_allreduces_per_step, so anyone can see that
    accumulation micro-batches add none."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    counter = _Counter()

    def hook(state, bucket):
        counter.n += 1
        return default_hooks.allreduce_hook(state, bucket)

    for m in models:
        if isinstance(m, DistributedDataParallel):
            m.register_comm_hook(None, hook)
    return counter


def _comm_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because a peer is gone or stuck (gloo and NCCL)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out"))


def _agree_to_stop(signum: int, device, world: int) -> int:
    """Every rank stops at the same step: the largest signal number seen by any rank."""
    if world == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
