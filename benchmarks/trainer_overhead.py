"""Training steps/s of distgan's loop against a plain PyTorch loop written like the seed's.

Both train the same models (from the preset) with the same batch size, loss and Adam settings.
The plain loop indexes an in-memory tensor of the digits (resized as the stream resizes them)
and does the seed's D step then G step, nothing else. distgan runs its trainer (`trainer.train`)
with the same in-memory batches: Accelerate, EMA, metric logging, progress bar; sample grids and
checkpoints are pushed past the end so both loops do the same work. A second distgan row reads
the webdataset shards instead, as `distgan train` does. distgan's rate is read from its
metrics.jsonl (perf/steps_per_sec), skipping the warm-up interval.

    python benchmarks/trainer_overhead.py [--presets digits-dcgan digits-mlp] [--steps 600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from distgan import config, losses, models, trainer  # noqa: E402
from distgan.metrics.digits import real_digits  # noqa: E402

LOG_EVERY = 50


def memory_data(cfg):
    """The digits, resized as the stream resizes them, as one in-memory tensor in [-1, 1]."""
    x, _ = real_digits(cfg.data.resolution)
    return torch.from_numpy(x).view(-1, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)


def plain_loop(cfg, steps: int, warmup: int) -> float:
    """The seed's loop on in-memory data; returns steps/s after `warmup` steps."""
    torch.manual_seed(cfg.train.seed)
    data = memory_data(cfg)
    G, D = models.build_generator(cfg), models.build_discriminator(cfg)
    t = cfg.train
    opt_g = torch.optim.Adam(G.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2))
    b, z_dim = cfg.data.batch_size, cfg.model.g.z_dim
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        real = data[torch.randint(len(data), (b,))]
        opt_d.zero_grad()
        fake = G(torch.randn(b, z_dim))
        d_loss = losses.d_loss("ns", D(real), D(fake.detach()))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad()
        g_loss = losses.g_loss("ns", D(G(torch.randn(b, z_dim))))
        g_loss.backward()
        opt_g.step()
    return steps / (time.perf_counter() - start)


def distgan_loop(preset: str, steps: int, warmup: int, in_memory: bool) -> float:
    """`distgan train` (in this process), fed the same in-memory tensor or its shard stream."""
    cfg = config.load_config(
        preset,
        overrides=[
            f"train.steps={warmup + steps}",
            f"train.log_every={LOG_EVERY}",
            "train.sample_every=1000000000",
            "train.ckpt_every=1000000000",
            "tracking.wandb.mode=disabled",
        ],
    )
    data = None
    if in_memory:
        tensor = memory_data(cfg)

        def batches():
            while True:
                idx = torch.randint(len(tensor), (cfg.data.batch_size,))
                yield {"image": tensor[idx], "label": torch.zeros(len(idx), dtype=torch.long)}

        data = batches()
    with tempfile.TemporaryDirectory() as tmp:
        trainer.train(cfg, f"{tmp}/run", data=data)
        rows = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/steps_per_sec"] for r in rows if "perf/steps_per_sec" in r and r["step"] > warmup]
    return len(rates) * LOG_EVERY / sum(LOG_EVERY / r for r in rates)  # total steps / total time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["digits-dcgan", "digits-mlp"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=LOG_EVERY)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = []
    for preset in args.presets:
        cfg = config.load_config(preset)
        plain, ours, shards = [], [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three
            plain.append(plain_loop(cfg, args.steps, args.warmup))
            ours.append(distgan_loop(preset, args.steps, args.warmup, in_memory=True))
            shards.append(distgan_loop(preset, args.steps, args.warmup, in_memory=False))
            print(
                f"{preset}: plain {plain[-1]:.2f}, distgan {ours[-1]:.2f}, distgan+shards {shards[-1]:.2f} steps/s",
                flush=True,
            )
        p_med = statistics.median(plain)
        for name, runs in (("distgan, in-memory data", ours), ("distgan, shard stream", shards)):
            o_med = statistics.median(runs)
            rows.append(
                {
                    "preset": preset,
                    "loop": name,
                    "batch": cfg.data.batch_size,
                    "plain steps/s": p_med,
                    "distgan steps/s": o_med,
                    "overhead %": 100.0 * (p_med / o_med - 1.0),
                    # each repeat runs plain then distgan back to back: their ratio cancels slow drifts
                    "paired overhead %": 100.0 * (statistics.median(p / o for p, o in zip(plain, runs)) - 1.0),
                    "plain runs": [round(v, 2) for v in plain],
                    "distgan runs": [round(v, 2) for v in runs],
                }
            )
    notes = (
        "overhead % = plain / distgan - 1 (medians of the runs); paired overhead % = median over repeats of "
        "plain / distgan - 1 of runs made back to back, less sensitive to this VM's drifting speed. "
        "Goal: <= 5% with the same in-memory data. "
        "distgan's loop includes Accelerate, EMA, metric accumulation, logging and the progress bar; the "
        "'shard stream' rows add reading and decoding the webdataset shards (default loader settings) in the loop."
    )
    columns = [
        "preset",
        "loop",
        "batch",
        "plain steps/s",
        "distgan steps/s",
        "overhead %",
        "paired overhead %",
        "plain runs",
        "distgan runs",
    ]
    common.write("trainer_overhead", rows, columns, notes)


if __name__ == "__main__":
    main()
