import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distgan.data import stream
from distgan.data.builtin import digits


def make(source, **kw):
    args = dict(batch_size=8, resolution=16, channels=1, seed=0, shuffle_buffer=50)
    args.update(kw)
    return stream.ShardStream(source.urls, **args)


def take(ds, n, num_workers=0):
    return list(itertools.islice(iter(stream.make_loader(ds, num_workers)), n))


def test_batches_shape_range_and_labels(digits_shards):
    src = stream.resolve(str(digits_shards))
    assert len(src.urls) == 8 and src.manifest["count"] == 1797
    b = take(make(src), 3)
    assert b[0]["image"].shape == (8, 1, 16, 16) and b[0]["image"].dtype == torch.float32
    assert -1.0 <= float(b[0]["image"].min()) and float(b[0]["image"].max()) <= 1.0
    assert all(0 <= int(lab) <= 9 for x in b for lab in x["label"])


def test_images_match_the_source_after_resize(digits_shards):
    """Unshuffled, a batch holds exactly the source digits, resized like the trainer does."""
    from PIL import Image

    x, y, _ = digits()
    src = stream.resolve(str(digits_shards / "digits-000000.tar"))
    b = take(make(src, shuffle_buffer=1, batch_size=5, resolution=8), 1)[0]
    keys_seen = b["label"].tolist()
    assert keys_seen == y[:5].tolist()
    assert torch.equal(b["image"], torch.from_numpy(x[:5].transpose(0, 3, 1, 2)).float() / 127.5 - 1)
    b16 = take(make(src, shuffle_buffer=1, batch_size=1, resolution=16), 1)[0]
    ref = np.array(Image.fromarray(x[0, ..., 0]).resize((16, 16), Image.BILINEAR))
    assert torch.equal(b16["image"][0, 0], torch.from_numpy(ref).float() / 127.5 - 1)


def test_ranks_and_workers_read_disjoint_shards(digits_shards):
    src = stream.resolve(str(digits_shards))
    seen = {}
    for rank in range(2):
        batches = take(make(src, rank=rank, world_size=2), 40, num_workers=2)
        seen[rank] = set(itertools.chain.from_iterable(b["shards"] for b in batches))
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    assert seen[0] <= {0, 2, 4, 6} and seen[1] <= {1, 3, 5, 7}  # split by node: every 2nd shard


def test_fewer_shards_than_workers_does_not_crash(digits_shards):
    src = stream.resolve(str(digits_shards / "digits-000000.tar"))
    batches = take(make(src, rank=1, world_size=2), 6, num_workers=2)
    assert len(batches) == 6  # one shard, 2 ranks x 2 workers: every stream still runs


def test_stream_is_deterministic_and_resumable(digits_shards):
    src = stream.resolve(str(digits_shards))
    full = take(make(src), 12, num_workers=2)
    again = take(make(src), 12, num_workers=2)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full, again))
    # resume after 5 batches: worker 0 produced batches 0,2,4 and worker 1 batches 1,3
    ds = make(src)
    ds.start_positions = [full[4]["pos"], full[3]["pos"]]
    ds.worker_offset = 5 % 2
    rest = take(ds, 7, num_workers=2)
    for a, b in zip(full[5:], rest):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("spec", ["", "/nonexistent/shard-{000..003}.tar"])
def test_resolve_errors(spec):
    from distgan.errors import UserError

    with pytest.raises(UserError):
        stream.resolve(spec)


def test_loader_leaves_global_rng_alone(digits_shards):
    src = stream.resolve(str(digits_shards))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    it = iter(DataLoader(make(src), batch_size=None, generator=torch.Generator()))
    next(it)
    iter(stream.make_loader(make(src), 1))
    assert torch.equal(state, torch.get_rng_state())


def test_pipe_and_http_urls(digits_shards):
    """data.shards as a `pipe:` URL and as http:// from a server on 127.0.0.1."""
    import functools
    import http.server
    import threading

    local = take(make(stream.resolve(str(digits_shards / "digits-000003.tar")), shuffle_buffer=1), 2)
    piped = take(make(stream.resolve(f"pipe:cat {digits_shards}/digits-00000{{3..3}}.tar"), shuffle_buffer=1), 2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(digits_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/digits-000003.tar"
        served = take(make(stream.resolve(url), shuffle_buffer=1), 2)
    finally:
        server.shutdown()
    for other in (piped, served):
        for a, b in zip(local, other):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
