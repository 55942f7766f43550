"""What a training run does between steps, when it is due: log the metrics, write a sample grid,
evaluate, write a checkpoint (run.save), keep the best one.

The loop (trainer._loop) does the steps; after each one it calls `periodic`. Each job is a plain
function of one `run.Run`, the state of the run that outlives a step.
"""

from __future__ import annotations

import time

import torch

from distgan import checkpoint, images, rng
from distgan.errors import RunFailed
from distgan.run import BEST, Run, finish_saves, save


class MetricLog:
    """Sums a step's metrics on device (no host sync per step) until the next log, then averages
    them over the steps and the ranks (one all-reduce) and logs them with the run's rates.

    A step the NaN guard flagged (step.NanGuard) adds zeros; once the guard has read its flags, the
    skipped steps leave the averages (`steps_skipped`)."""

    def __init__(self, start: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.skipped = 0  # steps since the last log whose updates were undone
        self.last_time, self.last_step = time.perf_counter(), start
        self.nan_skips = 0

    def add(self, metrics: dict[str, torch.Tensor], bad: torch.Tensor | None = None) -> None:
        """A step's metrics; `bad` (a device flag, no host read): its update was undone, add zeros."""
        for k, v in metrics.items():
            v = v.detach()
            if bad is not None:
                v = torch.where(bad, torch.zeros_like(v), v)
            self.sums[k] = self.sums.get(k, 0) + v
        self.n += 1

    def steps_skipped(self, n: int) -> None:
        """`n` more steps whose updates the NaN guard undid (step.NanGuard.resolve): their metrics are
        out of the averages."""
        self.skipped += n
        self.nan_skips += n

    def flush(self, run: Run, step: int, micro_batches: int, allreduces) -> dict[str, float]:
        acc = run.accelerator
        good = self.n - self.skipped
        # (no keys when every step since the last log was skipped for NaN/Inf; the same on every rank)
        keys = sorted(self.sums) if good > 0 else []
        means = acc.reduce(torch.stack([self.sums[k] / good for k in keys]), "mean").tolist() if keys else []
        bad = torch.tensor(sum(sum(f.skipped) for f in run.feeds), device=run.device)
        total_skipped = int(acc.reduce(bad, "sum"))
        rate = (step - self.last_step) / max(time.perf_counter() - self.last_time, 1e-9)
        logged = dict(zip(keys, means))
        logged.update(
            {
                "perf/steps_per_sec": rate,
                "perf/samples_per_sec": rate * run.cfg.data.batch_size * micro_batches * run.world,
                "data/skipped": total_skipped,
                "train/nan_skipped_steps": self.nan_skips,
            }
        )
        if run.world > 1:
            logged["dist/grad_allreduces_per_step"] = allreduces.pop() / max(step - self.last_step, 1)
        if acc.scaler is not None:  # fp16 (GPU): the gradient scaler's current scale
            logged["train/grad_scale"] = float(acc.scaler.get_scale())
        run.tracker.log(logged, step)
        self.sums, self.n, self.skipped = {}, 0, 0
        self.last_time, self.last_step = time.perf_counter(), step
        return {k: v for k, v in zip(keys, means) if k.startswith("loss/")}


def periodic(run: Run, log: MetricLog, guard, bar, stopping: int, micro_batches: int, allreduces) -> None:
    """After step `run.step`: whatever is due of log, sample grid, evaluation and checkpoint (all of
    them at the last step; log and checkpoint when the ranks agreed to stop)."""
    t, step = run.cfg.train, run.step
    last = step == t.steps
    log_due = step % t.log_every == 0 or last or stopping
    eval_due = t.eval_every and (step % t.eval_every == 0 or last)
    save_due = step % t.ckpt_every == 0 or last or stopping
    if log_due or eval_due or save_due:
        log.steps_skipped(guard.resolve(run))  # before anything is logged or saved: may stop the run (train.on_nan)
    if log_due:
        losses = log.flush(run, step, micro_batches, allreduces)
        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in losses.items()})
    if step % t.sample_every == 0 or last:
        sample_grid(run, step)
    improved = False
    if eval_due:
        improved = evaluate(run, step)
    if save_due or improved:
        save(run, step, improved)
    if improved:
        keep_best(run, step)


def sample_grid(run: Run, step: int) -> None:
    """RUN_DIR/samples/step-N.png (and latest.png, and W&B): the EMA generator on fixed noise, or an
    image-to-image model's input | output | target rows. Leaves the training RNG as it was."""
    if not run.main:
        return
    with rng.preserved():  # reading the held-out set draws from the global RNG
        _sample_grid(run, step)


def _sample_grid(run: Run, step: int) -> None:
    t = run.cfg.train
    if run.variant.image_to_image:
        grid = images.make_grid(*run.variant.preview(run.sampling_models(), run.heldout_set() or run.preview_batch))
    else:
        source = run.source()
        centres = ((source.manifest or {}).get("mixture") or {}).get("centres") if source else None
        with torch.no_grad():
            imgs = run.variant.sample(
                run.sampling_models()["G"], t.n_samples, generator=run.fixed_noise.manual_seed(t.seed)
            )
        grid = images.render(imgs, centres)
    images.save_png(run.run_dir / "samples" / f"step-{step:08d}.png", grid)
    images.save_png(run.run_dir / "samples" / "latest.png", grid)
    run.tracker.log_image("samples", grid, step)


def evaluate(run: Run, step: int) -> bool:
    """The metrics `distgan eval` would give, logged as eval/... (where the data has some): the
    standard ones on every rank's share of the samples with train.eval_inception, the rest on rank 0.
    Leaves the training RNG as it was. True when train.keep_best=fid and eval/fid improved (the same
    answer on every rank)."""
    with rng.preserved():
        result = _evaluate(run, step)
    if not run.cfg.train.keep_best:
        return False
    fid = result.get("fid") if run.main else None
    if run.world > 1:  # rank 0 decides (it holds every metric); every rank writes the checkpoint
        from accelerate.utils import broadcast_object_list

        fid = broadcast_object_list([fid], from_process=0)[0]
    if fid is None:
        raise RunFailed(
            f"step {step}: train.keep_best=fid, but no fid applies to this run's data; set "
            "train.eval_inception (docs/evaluation.md) or leave train.keep_best empty"
        )
    if fid < run.best_fid:
        run.best_fid = fid
        return True
    return False


def _evaluate(run: Run, step: int) -> dict:
    from distgan import evaluation, metrics

    if run.variant.image_to_image:  # measured on held-out inputs
        result = {}
        if run.main and run.heldout_set() is not None:
            result = run.variant.evaluate(run.sampling_models(), run.heldout_set())
            run.tracker.log(metrics.scalars(result), step)
        return result
    from distgan.metrics import inception, standard

    t, G = run.cfg.train, run.sampling_models()["G"]
    source = run.source()
    manifest = source.manifest if source else None
    names = metrics.applicable(run.cfg, manifest, inception=bool(t.eval_inception))
    split = standard.Split(run.rank, run.world)
    if t.eval_inception and run.inception is None and evaluation.split_names(names, True)[0]:
        run.inception = evaluation.Inception.load(
            run.cfg, inception.resolve_path(t.eval_inception), run.device, split, ref=t.eval_ref or None, say=run.main
        )
    result = evaluation.measure(
        run.cfg,
        run.variant,
        G,
        names,
        n=t.eval_n,
        seed=t.seed + 1,
        split=split,
        manifest=manifest,
        inception=run.inception,
        main=run.main,
    )
    if run.main and result:
        run.tracker.log(metrics.scalars(result), step)
    return result


def keep_best(run: Run, step: int) -> None:
    """RUN/checkpoints/best-fid/: step `step`'s checkpoint (just written), hard-linked, with best.json."""
    if run.main:
        finish_saves(run)  # its files complete first (train.ckpt_async)
        folder = checkpoint.keep_copy(run.run_dir, step, BEST, {"step": step, "fid": run.best_fid})
        run.tracker.event("best", step, fid=run.best_fid, path=str(folder))
    run.accelerator.wait_for_everyone()
