"""Samples/s read from shards with 0, 1 and 2 DataLoader workers (and with the RAM cache), against
what training consumes; and, with --decode, one process's decode rate for PNG, JPEG and WebP
shards of real photos at stored sizes 64, 256 and 512 decoded to 32, 64, 128 and 256, with and
without JPEG draft (DCT-scaled) decoding and the RAM cache.

The stream is distgan's own (resampled shards, shuffle buffer, decode, resize, batch) on the
embedded digits at the default preset's settings. Training consumption is steps/s x batch size of
`distgan train` with the default preset (from benchmarks/results/trainer_overhead-<machine>.json
when present, else measured here with a short run).

    python benchmarks/data_stream.py [--batches 300] [--decode]
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


def stream_rate(cfg, urls: list[str], workers: int, batches: int, cache_bytes: int = 0, **kw) -> float:
    ds = stream.ShardStream(
        urls,
        batch_size=cfg.data.batch_size,
        resolution=cfg.data.resolution,
        channels=cfg.data.channels,
        seed=0,
        shuffle_buffer=cfg.data.shuffle_buffer,
        cache_bytes=cache_bytes,
        **kw,
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
    p.add_argument("--decode", action="store_true", help="the decode matrix instead (data_stream_decode-*.md)")
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
    if args.decode:
        return decode_matrix(args.batches)
    rows = []
    for workers, cached in ((0, False), (1, False), (2, False), (0, True)):
        # with the cache: the first pass over the 1797 digits fills it, the measured batches come after
        rate = stream_rate(cfg, urls, workers, args.batches, cache_bytes=10**9 if cached else 0)
        rows.append(
            {
                "workers": workers,
                "RAM cache": "yes" if cached else "no",
                "stream samples/s": rate,
                "training samples/s": consumed,
                "headroom x": rate / consumed,
                "stream share of a step": consumed / rate,
            }
        )
        print(rows[-1], flush=True)
    notes = (
        f"Default preset {config.DEFAULT_PRESET}: batch {cfg.data.batch_size}, resolution {cfg.data.resolution}, "
        f"data.num_workers={cfg.data.num_workers} (auto: 0 on the CPU). Training consumption from {source}. "
        "headroom x = stream / training; > 1 means the stream is not the bottleneck. The stream alone has the "
        "machine to itself here; during training its worker shares the cores with the training step."
    )
    notes += (
        " stream share of a step = training / stream: the fraction of a step the loop would spend waiting on "
        "the stream with 0 workers (the auto setting on 2 cores), as both run in one process."
    )
    common.write(
        "data_stream",
        rows,
        ["workers", "RAM cache", "stream samples/s", "training samples/s", "headroom x", "stream share of a step"],
        notes,
    )


def photo_shards(folder: Path, fmt: str, stored: int, n: int = 64) -> list[str]:
    """n crops of scikit-image's photos, resized to stored x stored, as ShardWriter shards of `fmt`."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image
    from skimage import data as skdata

    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pil = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]
    with wds.ShardWriter(str(folder / "s-%06d.tar"), maxcount=16, verbose=0) as sink:
        for i in range(n):
            src = sources[i % len(sources)]
            side = int(min(src.shape[:2]) * rng.uniform(0.6, 1.0))
            y, x = rng.integers(0, src.shape[0] - side + 1), rng.integers(0, src.shape[1] - side + 1)
            img = Image.fromarray(src[y : y + side, x : x + side]).resize((stored, stored), Image.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, format=pil, **({} if fmt == "png" else {"quality": 90}))
            sink.write({"__key__": f"{i:06d}", fmt: buf.getvalue()})
    return sorted(str(p) for p in folder.glob("*.tar"))


def decode_matrix(batches: int) -> None:
    import tempfile

    cfg = config.load_config(None, None, ["data.channels=3", "data.batch_size=32", "data.shuffle_buffer=64"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "jpg", "webp"):
            for stored in (64, 256, 512):
                urls = photo_shards(Path(tmp) / f"{fmt}-{stored}", fmt, stored)
                for target in (32, 64, 128, 256):
                    if target > stored:
                        continue
                    cfg.data.resolution = target
                    modes = [("draft", True, 0), ("full decode", False, 0)] if fmt == "jpg" else [("", True, 0)]
                    modes.append(("RAM cache", True, 10**9))
                    for label, draft, cache in modes:
                        rate = stream_rate(cfg, urls, 0, batches, cache_bytes=cache, draft=draft)
                        rows.append(
                            {"format": fmt, "stored": stored, "decoded to": target, "mode": label, "samples/s": rate}
                        )
                        print(rows[-1], flush=True)

    def rate_of(fmt, stored, target, mode):
        return next(
            r["samples/s"]
            for r in rows
            if (r["format"], r["stored"], r["decoded to"], r["mode"]) == (fmt, stored, target, mode)
        )

    jpg_draft = rate_of("jpg", 256, 128, "draft")
    notes = (
        f"One process (0 DataLoader workers, the rate one worker would give), batch 32, {batches} batches per row "
        "after 5 warm-up batches, 64 crops of scikit-image's photos per shard set (quality 90 for jpg/webp), "
        "resampled and shuffled as in training. RAM cache rows: every sample decoded once, then served from "
        "memory. 256 -> 128: JPEG with draft "
        f"{jpg_draft:.0f}/s, {jpg_draft / rate_of('jpg', 256, 128, 'full decode'):.2f}x the full JPEG decode and "
        f"{jpg_draft / rate_of('png', 256, 128, ''):.2f}x PNG (the only format distgan read before)."
    )
    common.write("data_stream_decode", rows, ["format", "stored", "decoded to", "mode", "samples/s"], notes)


if __name__ == "__main__":
    main()
