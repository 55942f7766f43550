"""A checkpoint's run state, saved and restored without the training loop: `checkpoint.rank_state`
+ `gather_rank_states` + `save`, then `load` + `resume_point`, give every rank back what it put in."""

import torch

from distgan import checkpoint, rng
from distgan.data.feeds import Feed
from distgan.data.stream import ShardSource


def test_saved_run_state_restores_every_ranks_part(tmp_path):
    world, workers = 2, 3
    parts, feeds_of = [], []
    for rank in range(world):
        rng.seed_all(100 + rank)
        torch.rand(rank + 1)  # each rank's RNG somewhere else
        main = Feed("", ShardSource([f"s{i}.tar" for i in range(5)], None), None, workers)
        main.restore([10 * rank + w for w in range(workers)], [rank, 0, 1], torch.tensor([1, rank, 0, 1, 0]))
        domain = Feed("a", ShardSource(["a0.tar", "a1.tar"], None), None, workers)
        domain.restore([7, 8, 9 + rank], [0, 0, 0], torch.tensor([rank, 1]))
        pool = {"pool.images": torch.full((2, 3), float(rank)), "pool.count": torch.tensor([rank + 1]),
                "shared.strength": torch.tensor([0.25], dtype=torch.float64)}  # fmt: skip
        parts.append(checkpoint.rank_state(rng.get_state(), [main, domain], pool, fingerprint_value=1234))
        feeds_of.append((main, domain))
    gathered = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}  # what accelerator.gather gives
    state, fingerprints = checkpoint.gather_rank_states(gathered)
    assert fingerprints == [1234, 1234] and "rng.rank.torch" in state
    meta = checkpoint.run_meta({"train": {"steps": 9}}, fingerprints, "gan", batches=42, world=world,
                               num_workers=workers)  # fmt: skip
    model = torch.nn.Linear(2, 2)
    checkpoint.save(tmp_path, 5, models={"G": model}, optimizers={"G": torch.optim.Adam(model.parameters())},
                    state_tensors=state, meta=meta, keep_last=1)  # fmt: skip
    ckpt = checkpoint.load(tmp_path)
    for rank in range(world):
        point = checkpoint.resume_point(ckpt, rank, world, workers)
        assert point.exact and point.step == 5 and point.batches == 42
        main, domain = feeds_of[rank]
        for feed in (main, domain):
            positions, skipped, read = point.feeds[feed.prefix]
            assert positions == feed.positions and skipped == feed.skipped and torch.equal(read, feed.shards_read)
        assert torch.equal(point.variant["pool.images"], torch.full((2, 3), float(rank)))
        assert point.variant["pool.count"].tolist() == [rank + 1]
        rng.set_state(point.rng)  # this rank's RNG continues where it was saved
        rng.seed_all(100 + rank)
        torch.rand(rank + 1)
        want = torch.rand(4)
        rng.set_state(point.rng)
        assert torch.equal(torch.rand(4), want)
    # another process or worker layout: only the step and the variant's shared.* state carry over
    for other in ((1, workers), (world, 1), (3, workers)):
        point = checkpoint.resume_point(ckpt, min(other[0] - 1, 2), *other)
        assert not point.exact and point.step == 5 and point.batches == 0 and point.feeds == {}
        assert point.variant.keys() == {"shared.strength"} and point.variant["shared.strength"].tolist() == [0.25]
