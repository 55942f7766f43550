"""`train()`: check -> build -> restore -> loop -> finish. The pieces it calls each have one file:
run.py (the run state, save and restore), step.py (StepContext, the NaN/Inf undo, EMA, lr schedule),
cluster.py (Accelerator, buffer averaging, stop agreement, lost ranks), periodic.py (log, sample
grid, evaluation, checkpoint, keep-best, when due) and data/feeds.py (the data streams).

Read top to bottom, `train()` does:
1. decide what to resume from and check everything (config, checkpoint, shards) before it
   writes a single file, so a bad input never damages an existing run directory;
2. build the variant's models and optimizers from one seed (identical on every rank), restore the
   checkpoint's models and optimizers into them (run.restore_models), and prepare them all in one
   Accelerator;
3. `_loop`: restore the rest (run.restore: RNG, step, variant state), open the data feeds where the
   checkpoint left them, then per step draw `train.grad_accum` micro-batches, call
   `variant.train_step`, undo a NaN step's buffer updates, average buffers, update the EMA, and run
   what is due (periodic.periodic: log, sample grid, eval, checkpoint);
4. on SIGINT/SIGTERM every rank stops at the same step, checkpoints and exits 128 + signal.
The loop knows nothing about any one variant.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from distgan import checkpoint, cluster, config, files, periodic, rng, step, variants
from distgan import run as run_state
from distgan.data import feeds, stream
from distgan.errors import UserError
from distgan.tracking import Tracker


def train(
    cfg: config.Config, run_dir: str | Path, resume: str | None = None, data: Iterable[dict] | None = None
) -> int:
    """Train `cfg` into `run_dir`; returns the process exit code (0, or 128+signal when stopped).

    `data` replaces the shard stream with your own iterable of batches ({"image": (B,C,H,W) in
    [-1, 1], "label": (B,)}); the benchmarks use it to feed in-memory data. Its position is not
    checkpointed, so a resume with it is not exact."""
    run_dir = Path(run_dir)
    # 1. Check everything before writing anything.
    ckpt = run_state.find_resume(resume, run_dir)
    check(cfg, ckpt)
    accelerator = cluster.make_accelerator(cfg, with_wandb=cfg.tracking.wandb.mode != "disabled")
    if ckpt is not None:  # another number of processes: the same images per step (a rule, or a refusal)
        cfg = run_state.keep_global_batch(ckpt, cfg, accelerator.num_processes, accelerator.is_main_process)
    start = ckpt.step if ckpt else 0
    if start >= cfg.train.steps:
        if accelerator.is_main_process:
            print(f"'{run_dir}' is already at step {start} >= train.steps={cfg.train.steps}; nothing to do.")
        return 0
    sources, expected = open_sources(cfg, accelerator) if data is None else ({}, {})
    # 2. Build the run and restore the checkpoint into it; 3. the steps; 4. say how it ended.
    run = None
    try:
        run = build(cfg, run_dir, accelerator, ckpt, sources, expected, data)
        return _finish(run, _loop(run))
    finally:
        if run is not None:
            try:
                run_state.finish_saves(run)  # a checkpoint written in the background completes, on any exit
            finally:
                run.tracker.close()
        cluster.release(accelerator.num_processes)


def check(cfg: config.Config, ckpt) -> None:
    """What can be checked before the Accelerator exists and before any shard is read."""
    if ckpt is not None:
        run_state.check_compatible(ckpt, cfg)
    if cfg.train.eval_ref:  # unusable statistics: one line now, not at the first evaluation
        from distgan.metrics import standard

        standard.RefStats.load(cfg.train.eval_ref)
    _check_keep_best(cfg, None)


def open_sources(cfg: config.Config, accelerator) -> tuple[dict[str, stream.ShardSource], dict[str, tuple | None]]:
    """The variant's shard streams, resolved ({"": data.shards}, or one per domain for unpaired
    variants: {"a": ..., "b": ...}), each checked against its manifest; (sources, expected image shapes)."""
    sources, expected = {}, {}
    for name, (key, spec) in variants.get(cfg.variant.name).data_streams(cfg).items():
        with accelerator.local_main_process_first():
            sources[name] = stream.resolve(spec, progress=accelerator.is_local_main_process, key=key)
        expected[name] = _check_manifest(sources[name].manifest, cfg, key)
    _check_keep_best(cfg, sources)
    return sources, expected


def build(
    cfg: config.Config,
    run_dir: Path,
    accelerator,
    ckpt,
    sources: dict,
    expected: dict,
    data: Iterable[dict] | None = None,
) -> run_state.Run:
    """The run, ready for its first step: the variant's models and optimizers from one seed (identical
    on every rank) with `ckpt` restored into them, prepared in the Accelerator; EMA copies; the run
    directory's config.yaml and the tracker; per-rank RNG; the feeds where `ckpt` left them."""
    t, main, device = cfg.train, accelerator.is_main_process, accelerator.device
    rng.seed_all(t.seed)
    variant = variants.get(cfg.variant.name)(cfg)
    emas = {f"{n}_ema": copy.deepcopy(variant.models[n]).eval().requires_grad_(False) for n in variant.ema}
    changed = run_state.restore_models(variant, emas, ckpt, main) if ckpt is not None else {}
    for opt in variant.optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the bases of the schedules (step.apply_schedule)
            if "betas" in group:
                group.setdefault("initial_betas", tuple(group["betas"]))
    cluster.gpu_settings(cfg, device, variant.models.values())
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(run_dir / "config.yaml", config.to_yaml(cfg))
    accelerator.wait_for_everyone()
    tracker = Tracker(accelerator, cfg, run_dir, config.to_dict(cfg))
    from kernels import _backend

    # which kernels spectral norm and minibatch discrimination run: Triton, or the PyTorch fallback
    tracker.event("kernels", ckpt.step if ckpt else 0, backend=_backend.auto(device))
    try:
        _prepare(accelerator, variant, emas)
        run = run_state.Run(
            cfg,
            run_dir,
            accelerator,
            variant,
            emas,
            tracker,
            sources=sources,
            keep_feed_state=data is None,
            num_workers=stream.auto_workers(cfg.data.num_workers, device.type == "cuda"),
            fixed_noise=torch.Generator(device="cpu").manual_seed(t.seed),
        )
        if main and (t.ckpt_async if t.ckpt_async is not None else device.type == "cuda"):
            run.writer = checkpoint.BackgroundWriter()
        # Per-rank randomness (noise, dropout) from the same seed, restored exactly on resume.
        rng.seed_all(stream.stream_seed(t.seed, run.rank, 2))
        resume = run_state.restore(run, ckpt, changed) if ckpt is not None else None
        run.feeds = feeds.open_feeds(
            cfg,
            variant,
            sources,
            expected,
            rank=run.rank,
            world=run.world,
            num_workers=run.num_workers,
            device=device,
            resume=resume,
            data=data,
        )
    except BaseException:
        tracker.close()  # (train() closes it once the run exists)
        raise
    return run


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
    aligned_latents = cfg.data.kind == "latents" and cfg.model.align.encoder
    if aligned_latents and not (manifest or {}).get("images"):
        raise UserError(
            f"model.align.encoder needs the images beside the latents, and the shards of {key} have none: "
            "encode them with `distgan shards --encode VAE ... --keep-images`"
        )
    if cfg.data.kind == "latents" and cfg.data.posterior and not (manifest or {}).get("posterior"):
        raise UserError(
            f"data.posterior draws from the VAE's posterior, and the shards of {key} hold only its means: encode "
            "them with `distgan shards --encode VAE ... --posterior`, or set data.posterior=false"
        )
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
            raise UserError(
                f"{where} hold {got}-channel inputs but data.input_channels={want}; set data.input_channels={got}"
            )
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
    if kind == "latents":
        want = (cfg.data.resolution, cfg.data.resolution, cfg.data.channels)
        if shape != want:
            raise UserError(
                f"{where} hold latents of shape {shape} (H, W, C) but data.resolution={cfg.data.resolution} and "
                f"data.channels={cfg.data.channels}; set data.resolution={shape[0]} data.channels={shape[2]}"
            )
        if isinstance(manifest.get("vae"), dict):
            from distgan import vae

            vae.check_matches(cfg.model.vae, manifest["vae"], where)
        return None
    if shape[2] in (1, 3) and shape[2] != cfg.data.channels:  # (other tools' RGBA is converted)
        raise UserError(
            f"{where} hold {shape[2]}-channel images but data.channels={cfg.data.channels}; "
            f"set data.channels={shape[2]}"
        )
    return None if kind == "paired" else shape


def _loop(run: run_state.Run) -> int:
    """The steps: draw micro-batches, `variant.train_step`, buffers and EMA, then what is due of the
    periodic jobs. Returns the signal the ranks agreed to stop on (0: ran to train.steps)."""
    cfg, accelerator, variant, emas = run.cfg, run.accelerator, run.variant, run.emas
    t, main, device, world = cfg.train, run.main, run.device, run.world
    allreduces = cluster.count_allreduces(variant.models.values())
    ctx = step.StepContext(
        accelerator, t.grad_accum, {id(o): n for n, o in variant.optimizers.items()}, grad_clip=t.grad_clip
    )
    guard = step.NanGuard([accelerator.unwrap_model(m) for m in variant.models.values()])
    log = periodic.MetricLog(run.step)
    per_step = t.grad_accum * variant.data_per_step
    bar = tqdm(total=t.steps, initial=run.step, desc="train", disable=not main, dynamic_ncols=True, mininterval=1.0)
    stopping = 0
    try:
        with cluster.StopSignal() as stop:
            while run.step < t.steps:
                micro = feeds.draw(run.feeds, per_step, run.batches_done, run.logical_workers, device)
                if t.channels_last:
                    micro = [cluster.channels_last(mb) for mb in micro]
                run.batches_done += len(micro)
                run.preview_batch = run.preview_batch or micro[0]
                guard.before_step()
                ctx.global_step = run.step
                sched = step.schedule(cfg, run.step, world)
                step.apply_schedule(variant.optimizers.values(), t, sched)
                variant.set_schedule(sched)
                metrics = variant.train_step(micro, ctx)
                metrics.update(_scheduled_metrics(sched, device))
                log.add(metrics, guard.after_step(ctx, run.step + 1))  # (a NaN/Inf step: undone, on the device)
                cluster.average_buffers([accelerator.unwrap_model(m) for m in variant.models.values()], world)
                for name, ema in emas.items():
                    live = accelerator.unwrap_model(variant.models[name[: -len("_ema")]])
                    step.ema_update(ema, live, sched.ema_beta)
                run.step += 1
                bar.update(1)
                # with several ranks, agreeing on a stop is a host read: every train.stop_check_every
                # steps and at log and checkpoint steps, not every step
                due = any(run.step % n == 0 for n in (t.stop_check_every, t.log_every, t.ckpt_every))
                stopping = cluster.agree_to_stop(stop.signum, device, world) if due or world == 1 else 0
                periodic.periodic(run, log, guard, bar, stopping, len(micro), allreduces)
                if stopping:
                    break
    except (RuntimeError, dist.DistError) as exc:
        if world == 1 or not cluster.comm_failure(exc):
            raise
        cluster.lost_contact(exc, run)
    finally:
        feeds.close(run.feeds)
        bar.close()
    if run.saved_at != run.step:
        run_state.save(run, run.step)
    return stopping


def _scheduled_metrics(s: step.Scheduled, device) -> dict[str, torch.Tensor]:
    """The scheduled values that change, to log (device fills: no host-to-device copy)."""
    values = {"lr/factor": s.lr_factor}
    if s.beta2 is not None:  # train.schedule_images
        values.update({"schedule/beta2": s.beta2, "schedule/gamma_factor": s.gamma_factor})
        values.update({"schedule/augment_factor": s.augment_factor, "schedule/images": float(s.images)})
        if s.ema_halflife is not None:
            values["schedule/ema_halflife_images"] = s.ema_halflife
    return {k: torch.full((), v, device=device) for k, v in values.items() if v is not None}


def _prepare(accelerator, variant, emas) -> None:
    """Wrap the variant's models (DDP) and optimizers in the Accelerator; EMA copies to the device."""
    names, opt_names = list(variant.models), list(variant.optimizers)
    prepared = accelerator.prepare(*[variant.models[n] for n in names], *[variant.optimizers[n] for n in opt_names])
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    variant.models = dict(zip(names, prepared[: len(names)]))
    variant.optimizers = dict(zip(opt_names, prepared[len(names) :]))
    for ema in emas.values():
        ema.to(accelerator.device)


def _finish(run: run_state.Run, stopping: int) -> int:
    """Say how the run ended; the exit code (128 + signal when stopped)."""
    if stopping:
        if run.main:
            print(
                f"stopped by signal {stopping} at step {run.step}; checkpoint written; continue with --resume auto",
                file=sys.stderr,
            )
        return 128 + stopping
    if run.main:
        samples, ckpts = run.run_dir / "samples", checkpoint.checkpoints_dir(run.run_dir)
        print(f"done: {run.step} steps; samples in {samples}; checkpoints in {ckpts}")
        wandb_dir = run.tracker.run_dir_hint()
        if wandb_dir and run.tracker.mode == "offline":
            where = Path(wandb_dir).parent
            print(f"W&B offline run in {where}; upload it with: wandb sync {where}")
    return 0
