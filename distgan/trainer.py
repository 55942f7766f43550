"""The training loop: Accelerator, steps, EMA, logging, sampling, checkpoints, signals.

Read top to bottom, `train()` does:
1. decide what to resume from and check everything (config, checkpoint, shards) before it
   writes a single file, so a bad input never damages an existing run directory;
2. build the variant's models and optimizers from one seed (identical on every rank), load the
   checkpoint into them, and prepare them all in one Accelerator;
3. stream batches (see data/stream.py) and call `variant.train_step` once per step, with
   `train.grad_accum` micro-batches;
4. keep an EMA copy of G, log every `log_every`, write a sample grid every `sample_every` and
   a checkpoint every `ckpt_every` steps, and on SIGINT/SIGTERM checkpoint and stop.
The loop knows nothing about any one variant.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from distgan import checkpoint, config, images, rng, variants
from distgan.data import stream
from distgan.errors import RunFailed, UserError
from distgan.tracking import Tracker


class StepContext:
    """What a variant's `train_step` needs from the trainer: micro-batching and model plumbing."""

    def __init__(self, accelerator, accum: int, optimizer_names: dict[int, str] | None = None):
        self.accelerator = accelerator
        self.accum = accum
        self.optimizer_names = optimizer_names or {}
        self.nonfinite: list[str] = []  # optimizers whose update this step skipped (NaN/Inf gradients)
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

    def step(self, optimizer) -> bool:
        """optimizer.step(), unless a gradient is NaN or Inf: then the update is skipped, recorded in
        `nonfinite`, and the trainer applies train.on_nan. Gradients are all-reduced by then, so every
        rank decides the same. With fp16, the gradient scaler makes this decision itself (an
        overflow there is routine: it lowers the scale and skips the step). Returns whether it stepped."""
        if self.accelerator.scaler is not None:
            optimizer.step()
            return not optimizer.step_was_skipped
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            self.nonfinite.append(self.optimizer_names.get(id(optimizer), "optimizer"))
            return False
        optimizer.step()
        return True

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
        if accelerator.num_processes == 1:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        raise UserError(
            "fp16 mixed precision needs a GPU: on the CPU Accelerate applies neither fp16 autocast nor a gradient "
            "scaler, so the run would silently be fp32. Use train.mixed_precision=bf16 (or no) on the CPU"
        )
    return accelerator


def check_compatible(ckpt: checkpoint.Checkpoint, cfg: config.Config) -> None:
    """The checkpoint's model-shaping config must equal ours."""
    theirs = ckpt.meta.get("config", {})
    ours = config.to_dict(cfg)
    keys = [("model",), ("variant", "name"), ("data", "channels"), ("data", "resolution")]
    for key in keys:
        a, b = theirs, ours
        for k in key:
            a, b = (a or {}).get(k), (b or {}).get(k)
        if a != b:
            raise UserError(
                f"checkpoint '{ckpt.path}' was made with {'.'.join(key)}={a}, but the config asks for {b}; "
                "resume with the checkpoint's config or start a new --out"
            )


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

    # 2. Models, optimizers, EMA: one seed, identical on every rank.
    rng.seed_all(t.seed)
    variant = variants.get(cfg.variant.name)(cfg)
    emas = {f"{n}_ema": copy.deepcopy(variant.models[n]).eval().requires_grad_(False) for n in variant.ema}
    if ckpt is not None:
        for name, module in {**variant.models, **emas}.items():
            checkpoint.load_model(module, ckpt.model_state(name), f"checkpoint '{ckpt.path}' model '{name}'")
        for name, opt in variant.optimizers.items():
            try:
                opt.load_state_dict(ckpt.optimizer_state(name))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserError(f"checkpoint '{ckpt.path}': optimizer '{name}' does not fit: {exc}") from None
    for opt in variant.optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the base of train.lr_decay

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
    accelerator.wait_for_everyone()
    tracker = Tracker(accelerator, cfg, run_dir, config.to_dict(cfg))
    from kernels import _backend

    # which kernels spectral norm and minibatch discrimination run: Triton, or the PyTorch fallback
    tracker.event("kernels", start, backend=_backend.auto(accelerator.device))
    try:
        code = _loop(cfg, run_dir, accelerator, variant, emas, ckpt, sources, expected, tracker, rank, world, data)
    finally:
        tracker.close()
        if world == 1:  # let a later train() in this process build a fresh Accelerator
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
    return code


def _check_manifest(manifest: dict | None, cfg: config.Config, key: str = "data.shards") -> tuple[int, int, int] | None:
    if not manifest:
        return None
    shape = tuple(manifest["image_shape"])
    kind = manifest.get("kind", "images")
    where = "the shards" if key == "data.shards" else f"the shards of {key}"
    if kind != cfg.data.kind:
        raise UserError(f"{where} hold {kind} but data.kind={cfg.data.kind}; set data.kind={kind}")
    if kind == "paired":
        want = cfg.data.input_channels or cfg.data.channels
        got = manifest["input_shape"][2]
        if got != want:
            raise UserError(f"{where} hold {got}-channel inputs but data.input_channels={want}; "
                            f"set data.input_channels={got}")  # fmt: skip
    if kind == "points":
        if shape != (cfg.data.channels,):
            raise UserError(
                f"the shards hold {shape[0]}-d points but data.channels={cfg.data.channels}; "
                f"set data.channels={shape[0]}"
            )
        return None
    classes = len(manifest.get("classes") or [])
    if cfg.model.num_classes and classes > cfg.model.num_classes:
        raise UserError(
            f"the shards have {classes} classes but model.num_classes={cfg.model.num_classes}; "
            f"set model.num_classes={classes}"
        )
    if shape[2] != cfg.data.channels:
        raise UserError(
            f"{where} hold {shape[2]}-channel images but data.channels={cfg.data.channels}; "
            f"set data.channels={shape[2]}"
        )
    return None if kind == "paired" else shape


class _Feed:
    """One shard stream of a run and its bookkeeping for exact resume: per logical worker, the raw
    samples taken (`positions`) and skipped, and which shards this rank has read. Checkpoint keys
    are data.* for the main stream and data.<name>.* for named ones (cyclegan's a, b); batch keys
    get the suffix _<name> ("image_a")."""

    def __init__(self, name: str, source, loader, logical_workers: int):
        self.name, self.source, self.loader = name, source, loader
        self.prefix = f"data.{name}." if name else "data."
        self.suffix = f"_{name}" if name else ""
        self.positions = [0] * logical_workers
        self.skipped = [0] * logical_workers
        self.shards_read = torch.zeros(len(source.urls) if source else 0, dtype=torch.int64)

    def take(self, worker: int, device) -> dict:
        b = next(self.loader)
        if "pos" in b:  # the shard stream's bookkeeping, for exact resume
            self.positions[worker], self.skipped[worker] = b["pos"], b["skipped"]
            self.shards_read[b["shards"]] = 1
        return {k + self.suffix: v.to(device, non_blocking=True) for k, v in b.items() if torch.is_tensor(v)}

    def state(self) -> dict[str, torch.Tensor]:
        return {
            self.prefix + "positions": torch.tensor(self.positions, dtype=torch.int64),
            self.prefix + "skipped": torch.tensor(self.skipped, dtype=torch.int64),
            self.prefix + "shards_read": self.shards_read,
        }


def _loop(cfg, run_dir, accelerator, variant, emas, ckpt, sources, expected, tracker, rank, world, data) -> int:
    t = cfg.train
    main = accelerator.is_main_process
    device = accelerator.device
    names = list(variant.models)
    opt_names = list(variant.optimizers)
    prepared = accelerator.prepare(*[variant.models[n] for n in names], *[variant.optimizers[n] for n in opt_names])
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    variant.models = dict(zip(names, prepared[: len(names)]))
    variant.optimizers = dict(zip(opt_names, prepared[len(names) :]))
    for ema in emas.values():
        ema.to(device)
    allreduces = _count_allreduces(variant.models.values())

    # Per-rank randomness (noise, dropout) from the same seed, restored exactly on resume.
    rng.seed_all(stream.stream_seed(t.seed, rank, 2))
    num_workers = stream.auto_workers(cfg.data.num_workers, device.type == "cuda")
    logical_workers = max(num_workers, 1)
    resumed: dict[str, tuple] = {}  # feed prefix -> (positions, skipped, shards read)
    batches_done = 0
    start = 0
    if ckpt is not None:
        start = ckpt.step
        data_meta = ckpt.meta["data"]
        if data_meta["world_size"] == world and data_meta["num_workers"] == num_workers:
            for key, v in ckpt.state.items():
                if key.startswith("data.") and key.endswith(".positions"):
                    prefix = key[: -len("positions")]
                    resumed[prefix] = (v[rank].tolist(), ckpt.state[prefix + "skipped"][rank].tolist(),
                                       ckpt.state.get(prefix + "shards_read", [None] * world)[rank])  # fmt: skip
            batches_done = data_meta["batches"]
            rng.set_state({k.split(".", 2)[2]: v[rank] for k, v in ckpt.state.items() if k.startswith("rng.")})
            own = {k[len("variant.") :]: v[rank] for k, v in ckpt.state.items() if k.startswith("variant.")}
            if own and hasattr(variant, "load_rank_state"):
                variant.load_rank_state(own)
        elif main:
            print(
                f"warning: checkpoint was made with {data_meta['world_size']} processes x "
                f"{data_meta['num_workers']} workers, this run has {world} x {num_workers}: "
                "the data stream and RNG restart, so the resume is not exact",
                file=sys.stderr,
            )
        tracker.event("resume", start, checkpoint=str(ckpt.path))

    feeds: list[_Feed] = []
    if data is None:
        for name, source in sources.items():
            ds = stream.ShardStream(
                source.urls,
                batch_size=cfg.data.batch_size,
                resolution=cfg.data.resolution,
                channels=cfg.data.channels,
                # each domain its own sample order, from the same seed
                seed=t.seed if not name else stream.stream_seed(t.seed, *name.encode()),
                rank=rank,
                world_size=world,
                shuffle_buffer=cfg.data.shuffle_buffer,
                on_error=cfg.data.on_error,
                expected_shape=expected[name],
                points=cfg.data.kind == "points",
                fields=variant.fields() if hasattr(variant, "fields") else None,  # paired: input + target
            )
            feed = _Feed(name, source, None, logical_workers)
            if batches_done and feed.prefix in resumed:
                feed.positions, feed.skipped, shards_read = resumed[feed.prefix]
                if shards_read is not None and shards_read.shape == feed.shards_read.shape:
                    feed.shards_read = shards_read.clone()
                ds.start_positions = feed.positions
                ds.worker_offset = batches_done % logical_workers
            feed.loader = iter(stream.make_loader(ds, num_workers, pin_memory=device.type == "cuda"))
            feeds.append(feed)
    else:
        feeds.append(_Feed("", None, iter(data), logical_workers))
    source = next(iter(sources.values()), None)  # the main stream: its manifest drives previews and eval

    ctx = StepContext(accelerator, t.grad_accum, {id(o): n for n, o in variant.optimizers.items()})
    # Buffers (BatchNorm stats and counts, spectral norm's u, v) as they were before the step, to
    # undo what a step with NaN/Inf gradients did to them.
    buffers = [b for m in variant.models.values() for b in accelerator.unwrap_model(m).buffers()]
    before = [b.clone() for b in buffers]
    nan_skips = consecutive_skips = 0
    fixed_noise = torch.Generator(device="cpu").manual_seed(t.seed)
    sums: dict[str, torch.Tensor] = {}
    n_sums = 0
    last_log_time, last_log_step = time.perf_counter(), start
    saved_at = -1
    step = start
    bar = tqdm(total=t.steps, initial=start, desc="train", disable=not main, dynamic_ncols=True, mininterval=1.0)

    def save(step: int) -> None:
        nonlocal saved_at
        local = {f"rng.{k}": v for k, v in rng.get_state().items()}
        for feed in feeds if data is None else []:
            local.update(feed.state())
        if hasattr(variant, "rank_state"):  # e.g. cyclegan's image-history buffers, one per rank
            local.update({f"variant.{k}": v for k, v in variant.rank_state().items()})
        plain = {n: accelerator.unwrap_model(m) for n, m in variant.models.items()}
        bad = [
            f"{n}.{k}"
            for n, m in {**plain, **emas}.items()
            for k, v in m.state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:  # never replace a good checkpoint with a diverged state
            raise RunFailed(
                f"step {step}: the model holds NaN/Inf values ({', '.join(bad[:5])}); not writing a checkpoint. "
                "The newest existing checkpoint is intact; try lower learning rates"
            )
        local["fingerprint"] = torch.tensor([checkpoint.fingerprint({**plain, **emas})], dtype=torch.int64)
        gathered = {k: accelerator.gather(v.to(device)[None]).cpu() for k, v in local.items()}
        gathered = {(f"rng.rank.{k[4:]}" if k.startswith("rng.") else k): v for k, v in gathered.items()}
        fingerprints = gathered.pop("fingerprint").flatten().tolist()
        if main and len(set(fingerprints)) > 1:
            print(f"warning: step {step}: models differ across ranks (fingerprints {fingerprints})", file=sys.stderr)
        if main:
            meta = {
                "config": config.to_dict(cfg),
                "fingerprints": fingerprints,
                "variant": cfg.variant.name,
                "data": {"batches": batches_done, "world_size": world, "num_workers": num_workers},
                "time": time.time(),
            }
            path = checkpoint.save(
                run_dir,
                step,
                models={**plain, **emas},
                optimizers=variant.optimizers,
                state_tensors=gathered,
                meta=meta,
                keep_last=t.keep_last,
            )
            tracker.event("checkpoint", step, path=str(path))
        accelerator.wait_for_everyone()
        saved_at = step

    centres = ((source.manifest or {}).get("mixture") or {}).get("centres") if source else None

    preview_batch = None  # previews without a held-out set show the first training batch
    heldout: list = []  # image-to-image variants: the held-out set, read once

    def generators() -> dict[str, torch.nn.Module]:
        return {n: emas.get(f"{n}_ema", accelerator.unwrap_model(m)) for n, m in variant.models.items()}

    def evaluate(step: int) -> None:
        from distgan import metrics

        if hasattr(variant, "evaluate"):  # image-to-image: measured on held-out inputs
            if main:
                heldout[:] = heldout or [variant.heldout()]
                if heldout[0] is not None:
                    tracker.log(metrics.scalars(variant.evaluate(generators(), heldout[0])), step)
            return
        names = metrics.applicable(cfg, source.manifest if source else None)
        if not main or not names:
            return
        ema = emas.get("G_ema", accelerator.unwrap_model(variant.models["G"]))
        with torch.no_grad():
            x = torch.cat(
                [
                    variant.sample(
                        ema, min(1024, t.eval_n - i), generator=fixed_noise.manual_seed(t.seed + 1 + i)
                    ).cpu()
                    for i in range(0, t.eval_n, 1024)
                ]
            )
        result = metrics.compute(x, names, cfg, source.manifest)
        tracker.log(metrics.scalars(result), step)

    def sample_grid(step: int) -> None:
        if not main:
            return
        if hasattr(variant, "preview"):  # image-to-image: input | output | target rows
            heldout[:] = heldout or [variant.heldout()]
            grid = images.make_grid(*variant.preview(generators(), heldout[0] or preview_batch))
        else:
            ema = emas.get("G_ema", accelerator.unwrap_model(variant.models["G"]))
            with torch.no_grad():
                imgs = variant.sample(ema, t.n_samples, generator=fixed_noise.manual_seed(t.seed))
            grid = images.render(imgs, centres)
        images.save_png(run_dir / "samples" / f"step-{step:08d}.png", grid)
        images.save_png(run_dir / "samples" / "latest.png", grid)
        tracker.log_image("samples", grid, step)

    try:
        with StopSignal() as stop:
            while step < t.steps:
                micro = []
                for _ in range(t.grad_accum * getattr(variant, "data_per_step", 1)):
                    mb = {}
                    for feed in feeds:
                        mb.update(feed.take(batches_done % logical_workers, device))
                    batches_done += 1
                    micro.append(mb)
                preview_batch = preview_batch or micro[0]
                if buffers:
                    torch._foreach_copy_(before, buffers)
                ctx.global_step = step
                if t.lr_decay != "none":
                    factor = lr_factor(t, step)
                    for opt in variant.optimizers.values():
                        for group in opt.param_groups:
                            group["lr"] = group["initial_lr"] * factor
                metrics = variant.train_step(micro, ctx)
                if t.lr_decay != "none":
                    metrics["lr/factor"] = torch.tensor(factor, device=device)
                if ctx.nonfinite:
                    metrics = _nonfinite_step(ctx, cfg, run_dir, step + 1, buffers, before, consecutive_skips + 1, main)
                    tracker.event("nonfinite", step + 1, skipped=metrics.pop("skipped"))
                    nan_skips, consecutive_skips = nan_skips + 1, consecutive_skips + 1
                else:
                    consecutive_skips = 0
                average_buffers([accelerator.unwrap_model(m) for m in variant.models.values()], world)
                for name, ema in emas.items():
                    ema_update(
                        ema, accelerator.unwrap_model(variant.models[name[: -len("_ema")]]), ema_beta(t.ema_beta, step)
                    )
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.detach()
                n_sums += 1
                step += 1
                bar.update(1)

                stopping = _agree_to_stop(stop.signum, device, world)
                if step % t.log_every == 0 or step == t.steps or stopping:
                    keys = sorted(sums)
                    # (no keys when every step since the last log was skipped for NaN/Inf; the same on every rank)
                    means = (
                        accelerator.reduce(torch.stack([sums[k] / n_sums for k in keys]), "mean").tolist()
                        if keys
                        else []
                    )
                    bad = torch.tensor(sum(sum(f.skipped) for f in feeds), device=device)
                    total_skipped = int(accelerator.reduce(bad, "sum"))
                    elapsed = time.perf_counter() - last_log_time
                    rate = (step - last_log_step) / max(elapsed, 1e-9)
                    logged = dict(zip(keys, means))
                    logged.update(
                        {
                            "perf/steps_per_sec": rate,
                            "perf/samples_per_sec": rate * cfg.data.batch_size * len(micro) * world,
                            "data/skipped": total_skipped,
                            "train/nan_skipped_steps": nan_skips,
                            **(
                                {"dist/grad_allreduces_per_step": allreduces.pop() / max(step - last_log_step, 1)}
                                if world > 1
                                else {}
                            ),
                        }
                    )
                    if accelerator.scaler is not None:  # fp16 (GPU): the gradient scaler's current scale
                        logged["train/grad_scale"] = float(accelerator.scaler.get_scale())
                    tracker.log(logged, step)
                    bar.set_postfix(
                        {
                            k.split("/")[-1] if k.startswith("loss/") else k: f"{v:.3f}"
                            for k, v in zip(keys, means)
                            if k.startswith("loss/")
                        }
                    )
                    sums, n_sums = {}, 0
                    last_log_time, last_log_step = time.perf_counter(), step
                if step % t.sample_every == 0 or step == t.steps:
                    sample_grid(step)
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
                    evaluate(step)
                if step % t.ckpt_every == 0 or step == t.steps or stopping:
                    save(step)
                if stopping:
                    break
    except (RuntimeError, dist.DistError) as exc:
        if world == 1 or not _comm_failure(exc):
            raise
        # The launcher SIGTERMs the survivors when it sees a rank die: finish saying why first.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        steps = checkpoint.list_steps(run_dir)
        last = f"'{steps[-1]}' is intact" if steps else "none was written yet"
        raise RunFailed(
            f"rank {rank}: lost contact with the other ranks during step {step + 1} "
            f"({str(exc).strip().splitlines()[0][:200]}). Another rank died (see the launcher's summary), "
            f"hung for longer than dist.timeout_s={cfg.dist.timeout_s}, or the network failed. The newest "
            f"checkpoint, {last}; continue with --resume auto once every rank can run."
        ) from None
    finally:
        # Shut the DataLoader workers down now, also on an error: left to interpreter exit,
        # multiprocessing would SIGTERM them, which they ignore (see stream._ignore_signals).
        for feed in feeds:
            stream.shutdown(feed.loader)
        bar.close()
    if saved_at != step:
        save(step)
    if stopping:
        if main:
            print(
                f"stopped by signal {stopping} at step {step}; checkpoint written; continue with --resume auto",
                file=sys.stderr,
            )
        return 128 + stopping
    if main:
        print(
            f"done: {step} steps; samples in {run_dir / 'samples'}; checkpoints in {checkpoint.checkpoints_dir(run_dir)}"
        )
        wandb_dir = tracker.run_dir_hint()
        if wandb_dir and tracker.mode == "offline":
            print(f"W&B offline run in {Path(wandb_dir).parent}; upload it with: wandb sync {Path(wandb_dir).parent}")
    return 0


def _nonfinite_step(ctx, cfg, run_dir, step, buffers, before, consecutive, main) -> dict:
    """After a step whose gradients were NaN/Inf (the update was skipped): undo the step's buffer
    updates, then stop or go on as train.on_nan says. Returns the metrics to log for the step."""
    what = ", ".join(ctx.nonfinite)
    ctx.nonfinite = []
    if buffers:
        torch._foreach_copy_(buffers, before)
    t = cfg.train
    if t.on_nan == "stop" or consecutive >= t.max_nan_skips:
        steps = checkpoint.list_steps(run_dir)
        last = f"the newest checkpoint, '{steps[-1]}', is intact" if steps else "no checkpoint was written yet"
        why = (
            "train.on_nan=stop"
            if t.on_nan == "stop"
            else f"{consecutive} steps in a row (train.max_nan_skips={t.max_nan_skips})"
        )
        raise RunFailed(
            f"step {step}: NaN/Inf gradients in {what}; stopping ({why}). Nothing was saved from this "
            f"state; {last}. Try lower learning rates, train.mixed_precision=bf16 instead of fp16, or a "
            "spectral-norm discriminator (model.d.spectral_norm=true)"
        )
    if main:
        print(f"warning: step {step}: NaN/Inf gradients in {what}; update skipped (train.on_nan=skip)", file=sys.stderr)
    return {"skipped": what}


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
