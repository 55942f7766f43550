"""The state of a training run, and both directions of a checkpoint side by side.

`Run` is what outlives a step: config, models (in the variant), EMA copies, feeds, tracker, counters.
A checkpoint is written by `save(run, step)` and read back by `resume_config` (the stored config as
the base of `distgan train --resume` without a preset, under distgan/trust.py), `find_resume` (which one),
`check_compatible` (whether this config may continue it), `restore_models` (models, EMA, optimizers,
then this invocation's optimizer settings over the checkpoint's) and `restore` (RNG, step, variant
rank state, best FID); the feeds take their positions from the resume point `restore` returns
(data/feeds.py). What each file of a checkpoint holds is distgan/checkpoint.py's business.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distgan import checkpoint, config, rng, trust
from distgan.data import stream
from distgan.errors import RunFailed, UserError

BEST = "best-fid"  # RUN/checkpoints/best-fid: train.keep_best=fid's copy


@dataclass
class Run:
    cfg: config.Config
    run_dir: Path
    accelerator: object
    variant: object
    emas: dict[str, torch.nn.Module]
    tracker: object
    feeds: list = field(default_factory=list)
    sources: dict = field(default_factory=dict)
    num_workers: int = 0
    keep_feed_state: bool = True  # False with in-memory `data`: its position is not checkpointed
    step: int = 0
    batches_done: int = 0  # micro-batches drawn so far (each feed's worker w delivers those = w mod workers)
    saved_at: int = -1
    preview_batch: dict | None = None  # previews without a held-out set show the first training batch
    # image-to-image variants: the held-out set, read once (`heldout_set`); None also when there is none
    heldout: dict | None = None
    heldout_read: bool = False
    fixed_noise: torch.Generator | None = None  # sample grids and evaluations: the same noise every time
    inception: object | None = None  # train.eval_inception: evaluation.Inception (network + reference), loaded once
    # train.ckpt_async: the thread that writes checkpoint files (rank 0); None: written in the step
    writer: checkpoint.BackgroundWriter | None = None
    best_fid: float = float("inf")  # train.keep_best=fid: the lowest eval/fid so far (RUN/checkpoints/best-fid)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def logical_workers(self) -> int:
        return max(self.num_workers, 1)

    def plain(self) -> dict[str, torch.nn.Module]:
        """The trained models without their DDP wrappers."""
        return {n: self.accelerator.unwrap_model(m) for n, m in self.variant.models.items()}

    def sampling_models(self) -> dict[str, torch.nn.Module]:
        """Every model by name as samples and evaluations use it: its EMA copy where it has one (G),
        else the trained model itself (D, and an image-to-image variant's other networks)."""
        return {n: self.emas.get(f"{n}_ema", m) for n, m in self.plain().items()}

    def heldout_set(self) -> dict | None:
        """The variant's held-out inputs (image-to-image), read at the first call."""
        if not self.heldout_read:
            self.heldout, self.heldout_read = self.variant.heldout(), True
        return self.heldout

    def source(self):
        """The main stream: its manifest drives previews and evaluation."""
        return next(iter(self.sources.values()), None)


def resume_config(
    out: Path,
    resume: str | None,
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    trust: bool = False,
) -> config.Config:
    """The config of `distgan train`: the preset, file and overrides given; when resuming without a preset
    or file, the checkpoint's stored config is the base instead, its values that reach outside the
    process taken only as distgan/trust.py allows (notes on stderr say what differs)."""
    from distgan import trust as trusted

    stored = base = None
    if resume:
        target = checkpoint.list_steps(out)[-1:] if resume == "auto" else [resume]
        if target:  # its metadata only: find_resume reads the checkpoint whole
            folder, meta = checkpoint.read_meta(target[0])
            stored = meta["config"]
    if stored is not None and preset is None and config_file is None:
        base, notes = trusted.checkpoint_config(
            stored,
            given=trusted.override_keys(overrides),
            needed=trusted.stream_keys(stored) | set(trusted.FILE_KEYS),
            trust=trust,
            where=str(folder),
        )
        trusted.say(notes)
    cfg = config.load_config(preset, config_file, overrides, base=base)
    if stored is not None:
        trusted.say(trusted.differences(stored, cfg))
    return cfg


def find_resume(resume: str | None, run_dir: Path) -> checkpoint.Checkpoint | None:
    """The checkpoint to resume from: --resume auto (the newest that reads back whole), a path, or
    none (refused when the run directory already has checkpoints)."""
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
            differ += [
                f"{key}.{k}={x!r} -> {y!r}"
                for k, x, y in _changed_leaves(a, b)
                # model.vae: a path, which may differ between machines (but not be given or absent)
                if f"{key}.{k}" not in trust.FILE_KEYS or bool(x) != bool(y)
            ]
        elif a != b:
            differ.append(f"{key}={a!r} -> {b!r}")
    if differ:
        raise UserError(
            f"checkpoint '{ckpt.path}' cannot resume with {', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''} "
            "(these keys cannot change on resume); resume with the checkpoint's values or start a new --out"
        )


def keep_global_batch(ckpt: checkpoint.Checkpoint, cfg: config.Config, world: int, main: bool) -> config.Config:
    """A resume on another number of processes keeps the global batch (data.batch_size per rank x
    train.grad_accum x processes), so the training dynamics do not change with the GPUs a job gets
    back. The rule: the per-rank batch stays and train.grad_accum takes up the difference (rank 0 says
    so); when no whole number of accumulation steps keeps it, the resume is refused with the setting
    that would. A run resumed on the same number of processes keeps whatever batch its config says."""
    old_world = ckpt.meta["data"]["world_size"]
    if old_world == world or ckpt.meta.get("imported"):  # (an import has no batch of ours to keep)
        return cfg
    theirs = ckpt.meta.get("config", {})
    batch = theirs.get("data", {}).get("batch_size", cfg.data.batch_size)
    accum = theirs.get("train", {}).get("grad_accum", 1)
    total = batch * accum * old_world
    if cfg.data.batch_size * cfg.train.grad_accum * world == total:
        return cfg
    if total % (cfg.data.batch_size * world) == 0:
        new = total // (cfg.data.batch_size * world)
        if main:
            print(
                f"note: checkpoint '{ckpt.path}' trained on {old_world} processes x data.batch_size={batch} x "
                f"train.grad_accum={accum} = {total} images per step; on {world} processes train.grad_accum={new} "
                "keeps that",
                file=sys.stderr,
            )
        cfg = copy.deepcopy(cfg)
        cfg.train.grad_accum = new
        return cfg
    if total % world == 0:  # a per-process batch that divides the per-process share, as near ours as can be
        per = total // world
        fit = max(b for b in range(1, min(per, cfg.data.batch_size) + 1) if per % b == 0)
        how = (
            f"data.batch_size={fit} train.grad_accum={per // fit}, which changes the per-process batch that "
            "BatchNorm and minibatch discrimination see"
        )
    else:
        how = f"a number of processes that divides {total}"
    raise UserError(
        f"checkpoint '{ckpt.path}' trained with {total} images per step ({old_world} processes x data.batch_size="
        f"{batch} x train.grad_accum={accum}); with {world} processes and data.batch_size={cfg.data.batch_size} no "
        f"whole train.grad_accum keeps that. Resume with {how}"
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


def save(run: Run, step: int, improved: bool = False) -> None:
    """Checkpoint `step`: every rank contributes its RNG, feed positions and variant state (one
    gather), rank 0 writes. Never writes a model holding NaN/Inf over the good checkpoints."""
    plain, emas = run.plain(), run.emas
    bad = [
        f"{n}.{k}"
        for n, m in {**plain, **emas}.items()
        for k, v in m.state_dict().items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise RunFailed(
            f"step {step}: the model holds NaN/Inf values ({', '.join(bad[:5])}); not writing a checkpoint. "
            "The newest existing checkpoint is intact; try lower learning rates"
        )
    local = checkpoint.rank_state(
        rng.get_state(),
        run.feeds if run.keep_feed_state else [],
        run.variant.rank_state(),  # e.g. cyclegan's image pools
        checkpoint.fingerprint({**plain, **emas}),
    )
    gathered = {k: run.accelerator.gather(v.to(run.device)[None]).cpu() for k, v in local.items()}
    state, fingerprints = checkpoint.gather_rank_states(gathered)
    if run.main:
        if len(set(fingerprints)) > 1:
            print(f"warning: step {step}: models differ across ranks (fingerprints {fingerprints})", file=sys.stderr)
        meta = checkpoint.run_meta(
            config.to_dict(run.cfg), fingerprints, run.cfg.variant.name, run.batches_done, run.world, run.num_workers
        )
        if improved:  # recorded before the step is published: resume finishes keep_best after a kill
            meta["keep_best"] = {"name": BEST, "fid": run.best_fid}
        snap = checkpoint.snapshot({**plain, **emas}, run.variant.optimizers, state)  # the step waits for this
        keep_last = run.cfg.train.keep_last
        if run.writer is None:
            path = checkpoint.write(run.run_dir, step, snap, meta, keep_last)
            run.tracker.event("checkpoint", step, path=str(path))
        else:  # the files are written while training goes on (published by rename when complete)
            run.writer.submit(step, lambda: checkpoint.write(run.run_dir, step, snap, meta, keep_last))
            run.tracker.event("checkpoint", step, path=str(checkpoint.step_path(run.run_dir, step)), background=True)
    run.accelerator.wait_for_everyone()
    run.saved_at = step


def finish_saves(run: Run) -> None:
    """Wait for a checkpoint being written in the background (train.ckpt_async); raise if it failed."""
    if run.writer is not None:
        run.writer.wait()


def restore_models(variant, emas: dict[str, torch.nn.Module], ckpt: checkpoint.Checkpoint, main: bool) -> dict:
    """The checkpoint's models, EMA copies and optimizer states, loaded into the freshly built (not yet
    prepared) ones; then this invocation's optimizer settings applied over the checkpoint's. Returns
    {"NAME.KEY": [checkpoint's, config's]} of the settings that changed (said on stderr by rank 0)."""
    for name, module in {**variant.models, **emas}.items():
        checkpoint.load_model(module, ckpt.model_state(name), f"checkpoint '{ckpt.path}' model '{name}'")
    configured = {n: [_hyper(g) for g in opt.param_groups] for n, opt in variant.optimizers.items()}
    for name, opt in variant.optimizers.items():
        try:
            opt.load_state_dict(ckpt.optimizer_state(name))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"checkpoint '{ckpt.path}': optimizer '{name}' does not fit: {exc}") from None
        for group in opt.param_groups:  # (JSON gave the tuples back as lists)
            group.update({k: tuple(v) for k, v in group.items() if k != "params" and isinstance(v, list)})
    changed = apply_hyperparameters(variant.optimizers, configured)
    if changed and main:
        said = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        print(f"note: the config's optimizer settings differ from the checkpoint's; applied: {said}", file=sys.stderr)
    return changed


def restore(run: Run, ckpt: checkpoint.Checkpoint, changed: dict | None = None) -> checkpoint.ResumePoint:
    """The rest of `ckpt` into the run (after `restore_models`, once the run exists): this rank's RNG,
    step and batch count, the variant's rank state, the best FID so far (keep-best recovered), and the
    `resume` event. Returns the resume point, whose stream positions `feeds.open_feeds` takes. When the
    process/worker layout differs (not exact), the RNG is reseeded from the step and a note says what
    carries over (docs/distributed.md)."""
    point = checkpoint.resume_point(
        ckpt, run.rank, run.world, run.num_workers, additive=run.variant.additive_rank_state
    )
    run.step = point.step
    data = ckpt.meta["data"]
    if point.exact:
        run.batches_done = point.batches
        rng.set_state(point.rng)
    else:  # statistically equivalent: this rank's randomness from (seed, rank, step), not a replay of step 0's
        rng.seed_all(stream.stream_seed(run.cfg.train.seed, run.rank, 2, point.step))
    if point.variant:
        run.variant.load_rank_state(point.variant)
    imported = ckpt.meta.get("imported")
    if imported and run.main:
        print(
            f"note: starting from networks imported from {imported['from']} ({imported['file']}): models and "
            "optimizer states as imported; data streams and per-rank randomness start from the seed",
            file=sys.stderr,
        )
    elif not point.exact and run.main:
        print(
            f"note: checkpoint was made with {data['world_size']} processes x {data['num_workers']} workers, "
            f"this run has {run.world} x {run.num_workers}: models, optimizers, EMA, step and schedules "
            "continue exactly; the data order and per-rank randomness continue from new seeds (statistically "
            "equivalent, not the same draws), and per-rank state is redistributed (docs/distributed.md)",
            file=sys.stderr,
        )
    if run.cfg.train.keep_best == "fid":
        best = checkpoint.recover_best(run.run_dir, BEST, "fid") if run.main else None
        run.accelerator.wait_for_everyone()
        best = best or checkpoint.read_best(run.run_dir, BEST)
        if best is not None:
            run.best_fid = float(best["fid"])
    # `optimizer`: settings of this invocation's config applied over the checkpoint's ({"G.lr": [old, new]})
    layout = {}
    if not point.exact and not imported:  # the layout change, [checkpoint's, this run's]
        layout = {"world_size": [data["world_size"], run.world], "num_workers": [data["num_workers"], run.num_workers]}
    run.tracker.event(
        "resume", point.step, checkpoint=str(ckpt.path), **layout, **({"optimizer": changed} if changed else {})
    )
    return point


# Optimizer hyper-parameters that come from the config (train.lr_g, lr_d, beta1, beta2 ...): a resume
# applies the config's values over the checkpoint's.
HYPER = ("lr", "betas", "eps", "weight_decay", "momentum", "alpha")


def _hyper(group: dict) -> dict:
    """A param group's config-given hyper-parameters; lr is the base one (train.lr_decay scales it)."""
    out = {k: group[k] for k in HYPER if k in group}
    if "lr" in out:
        out["lr"] = group.get("initial_lr", group["lr"])
    if "betas" in out:  # (train.schedule_images moves beta2 from its base)
        out["betas"] = group.get("initial_betas", group["betas"])
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
                    group["initial_lr"] = value  # the schedule scales it from the next step on
                if key == "betas":
                    group["initial_betas"] = tuple(value)
    return changed
