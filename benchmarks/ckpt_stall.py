"""How long a checkpoint blocks the step, synchronous vs in the background, and what the NaN guard
copies, at the cluster templates' full width, on this machine.

For each preset (biggan-128, r3gan-256 by default) the variant's G and D are built at full width with
an EMA copy of G and Adam states filled by one step, as a run holds them at a checkpoint. Then, with
`--repeats` rounds, the two in alternating order (the first save of a round pays for the previous
round's write-back):

- synchronous (`train.ckpt_async=false`): `checkpoint.save`, the host copy and the files (written,
  fsynced, renamed): the step waits for all of it;
- in the background (`train.ckpt_async=true`): `checkpoint.snapshot` (the host copy) is what the
  step waits for; `checkpoint.write` (timed too) runs on the writer thread.

And the NaN/Inf guard (`step.StepContext.step`) on D's optimizer, no NaN: distgan's fused Adam,
which takes the flag as `found_inf`, against the same Adam unfused, which the guard steps on a copy
(the code before this change): time per step and the bytes the guard clones.

    python benchmarks/ckpt_stall.py [--presets biggan-128 r3gan-256] [--repeats 3] [--dir /tmp] [--e2e STEPS EVERY BATCH]
        [--e2e-presets r3gan-256 [biggan-128]]

Writes results/ckpt_stall-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from distgan import checkpoint, config, variants  # noqa: E402


def built(preset: str):
    cfg = config.load_config(preset)
    v = variants.get(cfg.variant.name)(cfg)
    for name, opt in v.optimizers.items():  # Adam's moments exist after a first step
        for p in v.models[name].parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    models = {**v.models, "G_ema": copy.deepcopy(v.models["G"])}
    return cfg, v, models


def clone_bytes(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.clone.default:
                Count.n += out.numel() * out.element_size()
            return out

    with Count():
        fn()
    return Count.n


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_bytes(fn) -> int | None:
    """How far the process's resident memory rises above where it was while `fn` runs: the peak
    (VmHWM, reset first through /proc/self/clear_refs) minus the resident size before. None where
    Linux's peak reset is not available."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


def guard_rows(preset: str, v, repeats: int) -> list[dict]:
    import accelerate

    from distgan import step

    D = v.models["D"]
    ctx = step.StepContext(accelerate.Accelerator(cpu=True), accum=1)
    t = v.cfg.train
    rows = []
    for label, fused in (("fused Adam, found_inf (now)", True), ("Adam stepped on a copy (before)", False)):
        opt = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2), fused=fused or None)
        for p in D.parameters():
            p.grad = torch.full_like(p, 1e-3)
        ctx.step(opt)  # moments exist
        ctx.pop_nonfinite()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ctx.step(opt)
            times.append(time.perf_counter() - start)
            ctx.pop_nonfinite()
        cloned = clone_bytes(lambda o=opt: ctx.step(o))
        ctx.pop_nonfinite()
        peak = peak_extra_bytes(lambda o=opt: ctx.step(o))
        ctx.pop_nonfinite()
        rows.append(
            {
                "preset": preset,
                "what": f"NaN guard, D's step: {label}",
                "seconds": statistics.median(times),
                "mb": cloned / 2**20,
                "peak_mb": None if peak is None else peak / 2**20,
            }
        )
    return rows


# --e2e's data: real embedded images at the preset's resolution. r3gan-256 is unconditional: the photo
# patches; biggan-128 is class-conditional: the digits (upscaled, one channel, 10 classes: the first and
# last convs and the class embeddings shrink, the 229 M parameters of the blocks stay), without the
# preset's 8 micro-batches per step. On this project's 2-core CPU one biggan-128 step with them took
# 670 s at batch 2 against a 2.5 s save, so its end-to-end rows are for a GPU (the default runs r3gan-256).
E2E_DATA = {
    "r3gan-256": ["data.shards=builtin:photos-hr"],
    "biggan-128": ["data.shards=builtin:digits", "data.channels=1", "model.num_classes=10", "train.grad_accum=1"],
}


def e2e_rows(preset: str, steps: int, every: int, batch: int) -> list[dict]:
    """`distgan train --preset PRESET` at full width on embedded images (E2E_DATA), checkpointing every
    `every` steps, synchronous and in the background: steps/s between the first and the last logged
    step (checkpoints included)."""
    import json
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("false", "true", "false", "true"):  # alternating, twice
            run = Path(tmp) / f"run-{mode}-{len(rows)}"
            cmd = [sys.executable, "-m", "distgan", "train", "--preset", preset, "--out", str(run)]
            cmd += [*E2E_DATA[preset], f"data.batch_size={batch}", "data.num_workers=0"]
            cmd += [f"train.steps={steps}", f"train.ckpt_every={every}", f"train.ckpt_async={mode}"]
            cmd += ["train.log_every=1", f"train.sample_every={10 * steps}", "train.mixed_precision=no"]
            cmd += ["tracking.wandb.mode=disabled", "train.keep_last=2"]
            subprocess.run(cmd, check=True, capture_output=True)
            lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            logged = [m for m in lines if "loss/d" in m]
            first, last = logged[0], logged[-1]
            rate = (last["step"] - first["step"]) / (last["time"] - first["time"])
            rows.append(
                {
                    "preset": preset,
                    "what": f"end to end, ckpt_every={every}, batch {batch}: steps/s, "
                    + ("background" if mode == "true" else "synchronous"),
                    "seconds": 1 / rate,
                    "steps_per_s": rate,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["biggan-128", "r3gan-256"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the checkpoints are written (a temporary folder in it)")
    p.add_argument(
        "--e2e",
        type=int,
        nargs=3,
        metavar=("STEPS", "EVERY", "BATCH"),
        help="also train each --e2e-presets STEPS steps with a checkpoint every EVERY (batch BATCH), sync vs "
        "background",
    )
    p.add_argument("--e2e-presets", nargs="+", default=["r3gan-256"], choices=sorted(E2E_DATA))
    args = p.parse_args()
    rows = [row for preset in args.e2e_presets for row in e2e_rows(preset, *args.e2e)] if args.e2e else []
    for preset in args.presets:
        cfg, v, models = built(preset)
        params = sum(p.numel() for m in models.values() for p in m.parameters())
        state = {"step": torch.tensor([1])}
        sync, stall, background = [], [], []
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for r in range(args.repeats):
                for kind in ("sync", "background") if r % 2 == 0 else ("background", "sync"):  # alternating
                    step = 2 * r + (kind == "background")
                    if kind == "sync":
                        start = time.perf_counter()
                        path = checkpoint.save(
                            Path(tmp),
                            step,
                            models=models,
                            optimizers=v.optimizers,
                            state_tensors=state,
                            meta={},
                            keep_last=2,
                        )
                        sync.append(time.perf_counter() - start)
                    else:
                        start = time.perf_counter()
                        snap = checkpoint.snapshot(models, v.optimizers, state)
                        stall.append(time.perf_counter() - start)
                        start = time.perf_counter()
                        checkpoint.write(Path(tmp), step, snap, {}, keep_last=2)
                        background.append(time.perf_counter() - start)
                        del snap
            size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        for what, times in (
            ("checkpoint, synchronous: the step waits for", sync),
            ("checkpoint, background: the step waits for", stall),
            ("checkpoint, background: the writer thread takes", background),
        ):
            rows.append({"preset": preset, "what": what, "seconds": statistics.median(times), "mb": size})
        rows += guard_rows(preset, v, args.repeats)
        print(f"{preset}: {params / 1e6:.1f} M parameters in G, D and G_ema", flush=True)
        rows[-5]["parameters_m"] = params / 1e6
    command = "python benchmarks/ckpt_stall.py " + " ".join(sys.argv[1:])
    notes = (
        f"Command: `{command}`. Full-width models of each preset (G, D, G's EMA copy, two Adams with their "
        "moments); median of the repeats. Checkpoint rows: mb is the step folder's size on disk (three "
        "safetensors files), written under --dir (the default temporary folder), fsynced. NaN guard rows: "
        "one StepContext.step of D's optimizer with finite gradients; mb is what the guard clones per step "
        "(the model and Adam moments it copies before the step, for the unfused optimizer); peak_mb how far "
        "the process's resident memory rose during one such step (VmHWM after a reset, minus VmRSS before: a "
        "lower bound, since the allocator first reuses memory the process freed earlier). "
        "End-to-end rows (--e2e): seconds is 1 / steps_per_s, from the metrics.jsonl times of the first "
        "and last logged step of `distgan train`, so every checkpoint in between counts."
    )
    columns = ["preset", "what", "seconds", "mb", "peak_mb", "parameters_m", "steps_per_s"]
    common.write("ckpt_stall", rows, columns, notes, {"command": command})


if __name__ == "__main__":
    main()
