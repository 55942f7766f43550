"""The data feeds of a run: one per shard stream the variant draws from, with their resume positions.

A feed wraps one `ShardStream`'s DataLoader. Per logical worker it keeps the raw samples taken
(`positions`) and skipped, and which shards this rank has read. Those go into checkpoints (see
`checkpoint.rank_state`), and on resume each worker rebuilds the same stream and drops what it
had already delivered, so the resumed run sees exactly the same batches. Checkpoint keys are
data.* for the main stream and data.<name>.* for named ones (CycleGAN's a, b); batch keys get the
suffix _<name> ("image_a").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from distgan.data import stream


class Feed:
    def __init__(self, name: str, source: stream.ShardSource | None, loader, logical_workers: int):
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
        """This rank's resume state, as checkpoint tensors."""
        return {
            self.prefix + "positions": torch.tensor(self.positions, dtype=torch.int64),
            self.prefix + "skipped": torch.tensor(self.skipped, dtype=torch.int64),
            self.prefix + "shards_read": self.shards_read,
        }

    def restore(self, positions: list[int], skipped: list[int], shards_read: torch.Tensor | None) -> None:
        self.positions, self.skipped = list(positions), list(skipped)
        if shards_read is not None and shards_read.shape == self.shards_read.shape:
            self.shards_read = shards_read.clone()


def open_feeds(
    cfg,
    variant,
    sources: dict,
    expected: dict,
    *,
    rank: int,
    world: int,
    num_workers: int,
    device: torch.device,
    resume=None,
    data: Iterable[dict] | None = None,
) -> list[Feed]:
    """The run's feeds, each positioned where `resume` (a checkpoint.ResumePoint) left it. With
    `data` (the benchmarks' in-memory batches), one unnamed feed over it, whose position is not kept."""
    logical_workers = max(num_workers, 1)
    if data is not None:
        return [Feed("", None, iter(data), logical_workers)]
    batches = resume.batches if resume is not None else 0
    # a resume on another process/worker layout draws a new order from (seed, step): not step 0's again
    seed = cfg.train.seed if resume is None or resume.exact else stream.stream_seed(cfg.train.seed, resume.step)
    feeds = []
    for name, source in sources.items():
        ds = stream.from_config(
            cfg,
            source.urls,
            # each domain its own sample order, from the same seed
            seed=seed if not name else stream.stream_seed(seed, *name.encode()),
            rank=rank,
            world_size=world,
            expected_shape=expected[name],
            fields=variant.fields(),  # paired: input + target
            num_classes=variant.num_classes,  # cgan: every sample needs a label
            cache_bytes=stream.cache_budget(cfg, variant.data_streams(cfg)[name][1]),
            raw_resolution=raw_resolution(cfg, source.manifest),
        )
        feed = Feed(name, source, None, logical_workers)
        if batches and feed.prefix in resume.feeds:
            feed.restore(*resume.feeds[feed.prefix])
            ds.start_positions = feed.positions
            ds.worker_offset = batches % logical_workers
        feed.loader = iter(stream.make_loader(ds, num_workers, pin_memory=device.type == "cuda"))
        feeds.append(feed)
    return feeds


def raw_resolution(cfg, manifest: dict | None) -> int:
    """The size of the images stored beside latents, read for model.align.encoder (0: not read)."""
    if cfg.data.kind != "latents" or not cfg.model.align.encoder or not manifest:
        return 0
    return int(manifest["image_resolution"])


def draw(feeds: list[Feed], count: int, batches_done: int, logical_workers: int, device) -> list[dict]:
    """`count` micro-batches, each with a batch of every feed (batch keys suffixed by feed name).
    Worker w of each feed delivers the micro-batches whose running number is w mod workers."""
    micro = []
    for i in range(count):
        mb = {}
        for feed in feeds:
            mb.update(feed.take((batches_done + i) % logical_workers, device))
        micro.append(mb)
    return micro


def close(feeds: list[Feed]) -> None:
    """Shut the DataLoader workers down now, also on an error: left to interpreter exit,
    multiprocessing would SIGTERM them, which they ignore (see stream._ignore_signals)."""
    for feed in feeds:
        stream.shutdown(feed.loader)
