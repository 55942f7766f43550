"""Writing files into folders the user names, safely.

Every file distgan writes (statistics, sample grids, shards' manifests, eval reports, run files) is
written to a name created exclusively in the destination folder (`tempfile.mkstemp`: O_CREAT |
O_EXCL, so never through a link someone planted there), flushed to disk, and published under its
name by `os.replace`, which replaces a link at that name rather than writing through it. A reader
never sees half a file, and a crash leaves at most a hidden `.NAME.*.tmp` file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from distgan.errors import UserError


def cache_root() -> Path:
    """distgan's cache folder (built-in shards, reference statistics, the built-in VAE): $DISTGAN_CACHE, else
    $XDG_CACHE_HOME/distgan or ~/.cache/distgan."""
    if os.environ.get("DISTGAN_CACHE"):
        return Path(os.environ["DISTGAN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distgan"


def sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's contents, read in 1 MB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike, what: str) -> dict:
    """The tensors of a local weights file: safetensors (by its extension) or a PyTorch state dict read
    with `torch.load(weights_only=True)` (no code runs). `what` names the setting and the format in
    the one-line errors: a missing file, an unreadable one, one that is not a dict of tensors."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"{what}: file '{path}' does not exist")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{what}: '{path}' cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what}: '{path}' holds no state dict of tensors")
    return state


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace `path` with what `write(file)` writes; the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp makes 0600)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def open_append(path: str | os.PathLike):
    """A text file opened for appending lines (a log), never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"'{path}' is a symbolic link; distgan does not write through links") from None
        raise
    return os.fdopen(fd, "a", buffering=1)
