"""A checkpoint's run state, saved and restored without the training loop: `checkpoint.rank_state`
+ `gather_rank_states` + `save`, then `load` + `resume_point`, give every rank back what it put in."""

import pytest
import torch

from distgan import checkpoint, config, rng, step
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
        pool = {
            "pool.images": torch.full((2, 3), float(rank)),
            "pool.count": torch.tensor([rank + 1]),
            "shared.strength": torch.tensor([0.25], dtype=torch.float64),
        }
        parts.append(checkpoint.rank_state(rng.get_state(), [main, domain], pool, fingerprint_value=1234))
        feeds_of.append((main, domain))
    gathered = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}  # what accelerator.gather gives
    state, fingerprints = checkpoint.gather_rank_states(gathered)
    assert fingerprints == [1234, 1234] and "rng.rank.torch" in state
    meta = checkpoint.run_meta(
        {"train": {"steps": 9}}, fingerprints, "gan", batches=42, world=world, num_workers=workers
    )
    model = torch.nn.Linear(2, 2)
    checkpoint.save(
        tmp_path,
        5,
        models={"G": model},
        optimizers={"G": torch.optim.Adam(model.parameters())},
        state_tensors=state,
        meta=meta,
        keep_last=1,
    )
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
    # another process or worker layout: the step, and the variant's state by rule: rank r takes old rank
    # (r mod old world)'s rows, an additive key's total goes to rank 0 (zeros elsewhere); no feeds, no RNG
    for other in ((1, workers), (world, 1), (3, workers)):
        rank = min(other[0] - 1, 2)
        point = checkpoint.resume_point(ckpt, rank, *other, additive=("pool.count",))
        assert not point.exact and point.step == 5 and point.batches == 0 and point.feeds == {}
        assert point.rng is None and point.variant.keys() == {"pool.images", "pool.count", "shared.strength"}
        assert torch.equal(point.variant["pool.images"], torch.full((2, 3), float(rank % world)))
        assert point.variant["pool.count"].tolist() == ([3] if rank == 0 else [0])
        assert point.variant["shared.strength"].tolist() == [0.25]


def test_a_saved_run_restores_every_field_of_its_state(tmp_path, digits_shards):
    """run.save, then trainer.build with the checkpoint (what a resume does), without the loop: the
    models, EMA copies, optimizer states and settings, RNG, step and batch count, every feed's
    position (and so its next batch), the variant's state (LeCam's EMAs, ADA's p and sums), the best
    FID and the W&B run id come back, compared field by field."""
    from conftest import FAST

    from distgan import cluster, config, periodic, trainer
    from distgan import run as run_state
    from distgan.data import feeds

    cfg = config.load_config(
        "digits-dcgan",
        overrides=[
            *[o for o in FAST if not o.startswith("tracking")],
            f"data.shards={digits_shards}",
            "tracking.wandb.mode=offline",
            "variant.lecam_weight=0.1",
            "data.augment=translation",
            "data.augment_p=auto",
            "train.keep_best=fid",
            "train.eval_every=100",
        ],
    )
    run_dir = tmp_path / "run"

    def built(ckpt):
        acc = cluster.make_accelerator(cfg, with_wandb=True)
        sources, expected = trainer.open_sources(cfg, acc)
        return trainer.build(cfg, run_dir, acc, ckpt, sources, expected)

    run = built(None)
    # what three steps would leave behind, made by hand: data drawn, optimizer state, EMA, RNG moved, ...
    micro = feeds.draw(run.feeds, 3, 0, run.logical_workers, run.device)
    run.batches_done, run.step = 3, 3
    for name, opt in run.variant.optimizers.items():
        model = run.variant.models[name]
        sum(p.square().sum() for p in model.parameters()).backward()
        opt.step()
        opt.zero_grad()
    step.ema_update(run.emas["G_ema"], run.accelerator.unwrap_model(run.variant.models["G"]), 0.5)
    run.variant.lecam_term(torch.randn(16), torch.randn(16))  # LeCam's EMAs move
    run.variant.ada.observe(torch.randn(16), 16)
    run.variant.ada.p = torch.tensor(0.07, dtype=torch.float64)
    torch.rand(5)
    run.best_fid = 12.5
    before = {
        "models": {
            n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in {**run.plain(), **run.emas}.items()
        },
        "optimizers": {n: o.state_dict() for n, o in run.variant.optimizers.items()},
        "rng": rng.get_state(),
        "feeds": [f.state() for f in run.feeds],
        "variant": run.variant.rank_state(),
        "wandb": run.tracker.wandb.run.id,
    }
    run_state.save(run, 3, improved=True)
    periodic.keep_best(run, 3)
    run.tracker.close()
    cluster.release(1)
    ckpt = run_state.find_resume("auto", run_dir)
    after = built(ckpt)
    try:
        assert (after.step, after.batches_done, after.best_fid) == (3, 3, 12.5)
        got = {n: m.state_dict() for n, m in {**after.plain(), **after.emas}.items()}
        assert got.keys() == before["models"].keys()
        for n, state in before["models"].items():
            for k, v in state.items():
                assert torch.equal(got[n][k], v), f"{n}.{k}"
        for n, want in before["optimizers"].items():
            have = after.variant.optimizers[n].state_dict()
            assert have["param_groups"] == want["param_groups"], n
            for i, s in want["state"].items():
                assert all(torch.equal(have["state"][i][k], v) for k, v in s.items()), n
        rng_now = rng.get_state()
        assert all(torch.equal(rng_now[k], v) for k, v in before["rng"].items())
        for f, state in zip(after.feeds, before["feeds"]):
            assert all(torch.equal(f.state()[k], v) for k, v in state.items()), f.name
        variant = after.variant.rank_state()
        assert variant.keys() == before["variant"].keys() and {"lecam_ema", "shared.augment_p", "augment_sums"} <= set(
            variant
        )
        assert all(torch.equal(variant[k], v) for k, v in before["variant"].items())
        assert after.tracker.wandb.run.id == before["wandb"]
        # the next batch is the one the first run would have drawn
        ours = feeds.draw(after.feeds, 1, 3, after.logical_workers, after.device)[0]
        theirs = feeds.draw(run.feeds, 1, 3, run.logical_workers, run.device)[0]
        assert torch.equal(ours["image"], theirs["image"]) and not torch.equal(ours["image"], micro[0]["image"])
    finally:
        feeds.close(run.feeds)
        feeds.close(after.feeds)
        after.tracker.close()
        cluster.release(1)


def test_another_number_of_processes_keeps_the_global_batch():
    """run.keep_global_batch: 16 per process x 2 processes = 32 images per step. The same number of
    processes leaves the config alone; 1 process takes train.grad_accum=2 (and 2 processes from a
    1-process run with accumulation 2 take 1 again); 4 processes cannot keep 16 per process, and the
    refusal names the setting that keeps 32; 3 processes cannot keep it at all."""
    from types import SimpleNamespace

    from distgan import run as run_state
    from distgan.errors import UserError

    def ckpt(world, batch, accum):
        theirs = {"data": {"batch_size": batch}, "train": {"grad_accum": accum}}
        return SimpleNamespace(path="ck", meta={"data": {"world_size": world}, "config": theirs})

    cfg = config.load_config(None, overrides=["data.batch_size=16"])
    assert run_state.keep_global_batch(ckpt(2, 16, 1), cfg, 2, False) is cfg
    assert run_state.keep_global_batch(ckpt(2, 16, 1), cfg, 1, False).train.grad_accum == 2
    assert cfg.train.grad_accum == 1  # (a copy: the caller's config is not changed)
    back = config.load_config(None, overrides=["data.batch_size=16", "train.grad_accum=2"])
    assert run_state.keep_global_batch(ckpt(1, 16, 2), back, 2, False).train.grad_accum == 1
    with pytest.raises(UserError, match=r"32 images per step .* Resume with data.batch_size=8 train.grad_accum=1"):
        run_state.keep_global_batch(ckpt(2, 16, 1), cfg, 4, False)
    with pytest.raises(UserError, match="a number of processes that divides 32"):
        run_state.keep_global_batch(ckpt(2, 16, 1), cfg, 3, False)
