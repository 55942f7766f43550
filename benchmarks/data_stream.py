"""Samples/s read from shards with 0, 1 and 2 DataLoader workers, against what training consumes.

The stream is distgan's own (resampled shards, shuffle buffer, PNG decode, resize, batch) on the
embedded digits at the default preset's settings. Training consumption is steps/s x batch size of
`distgan train` with the default preset (from benchmarks/results/trainer_overhead-<machine>.json
when present, else measured here with a short run).

    python benchmarks/data_stream.py [--batches 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import trainer_overhead  # noqa: E402

from distgan import config  # noqa: E402
from distgan.data import shards, stream  # noqa: E402


def stream_rate(cfg, urls: list[str], workers: int, batches: int) -> float:
    ds = stream.ShardStream(
        urls,
        batch_size=cfg.data.batch_size,
        resolution=cfg.data.resolution,
        channels=cfg.data.channels,
        seed=0,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    it = iter(stream.make_loader(ds, workers))
    for _ in range(5):  # start-up: workers, first shard, shuffle buffer
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * cfg.data.batch_size / (time.perf_counter() - start)
    stream.shutdown(it)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=300)
    args = p.parse_args()
    cfg = config.load_config()
    urls = stream.resolve(str(shards.ensure_builtin("digits"))).urls
    previous = common.RESULTS / f"trainer_overhead-{common.machine_tag()}.json"
    if previous.exists():
        rows = json.loads(previous.read_text())["rows"]
        row = next(r for r in rows if r["preset"] == config.DEFAULT_PRESET and "shard" in r["loop"])
        steps_per_sec, source = row["distgan steps/s"], previous.name
    else:
        steps_per_sec = trainer_overhead.distgan_loop(config.DEFAULT_PRESET, 300, 50, in_memory=False)
        source = "measured here"
    consumed = steps_per_sec * cfg.data.batch_size * cfg.train.grad_accum
    rows = []
    for workers in (0, 1, 2):
        rate = stream_rate(cfg, urls, workers, args.batches)
        rows.append(
            {
                "workers": workers,
                "stream samples/s": rate,
                "training samples/s": consumed,
                "headroom x": rate / consumed,
            }
        )
        print(rows[-1], flush=True)
    notes = (
        f"Default preset {config.DEFAULT_PRESET}: batch {cfg.data.batch_size}, resolution {cfg.data.resolution}, "
        f"data.num_workers={cfg.data.num_workers} (auto: 0 on the CPU). Training consumption from {source}. "
        "headroom x = stream / training; > 1 means the stream is not the bottleneck. The stream alone has the "
        "machine to itself here; during training its worker shares the cores with the training step."
    )
    common.write("data_stream", rows, ["workers", "stream samples/s", "training samples/s", "headroom x"], notes)


if __name__ == "__main__":
    main()
