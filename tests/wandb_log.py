"""Read the records of an offline W&B run file (run-ID.wandb), to check what a run logged.

The file is a LevelDB-style log (32 KiB blocks; each chunk: crc32 u32, length u16, type u8)
behind a 7-byte W&B header; each record is a `wandb_internal_pb2.Record` protobuf.
"""

import struct
import time
from pathlib import Path

from google.protobuf.message import DecodeError

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", ident
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too small for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            parts = [chunk]
        else:
            parts.append(chunk)
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def finished(path: Path, wait_s: float = 30.0) -> list:
    """Every record of a run that has ended, once its `exit` record is on disk. W&B's service process
    writes the file on its own schedule, and under load a run's `finish` has been seen to return before
    the records were there (a CI run of the whole suite on 2 busy cores), so this re-reads the file for up
    to `wait_s` seconds before it gives up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            found = list(records(path))
        except DecodeError:  # a record caught half-written
            found = []
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} holds no exit record after {wait_s:.0f} s: the run's file is incomplete")
        time.sleep(0.5)


def history(path: Path) -> list[dict]:
    """Every wandb.log() call of the run, as {key: JSON text}."""
    return [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in finished(path)
        if r.WhichOneof("record_type") == "history"
    ]


def run_record(path: Path):
    """The run's RunRecord (project, entity, run_id, config): where W&B would upload it."""
    return next(r.run for r in finished(path) if r.WhichOneof("record_type") == "run")
