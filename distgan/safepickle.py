"""Read a pickle of PyTorch modules (another trainer's network snapshot) without running its code.

`load(path, records)` unpickles with a `find_class` that resolves only an explicit allow-list:
plain containers (`collections.OrderedDict`), torch dtypes, and the three functions a pickled tensor
needs (its storage is read back by `torch.load(..., weights_only=True)`, the tensor rebuilt from it,
with no hooks and no extra state). A class named by `records` (module prefixes, e.g. R3GAN's
`training.`, `R3GAN.`, and `torch.nn.modules.`) becomes an inert `Record`: a plain object holding the
pickled `__dict__` (and any dict items), with no methods of the original class; nothing is imported,
constructed or called. Every other global (`os.system`, `builtins.eval`, `copyreg._reconstructor`,
...) is refused before anything runs, and so is a persistent id: one line, `UnsafePickle`.
docs/security.md says what this trusts.
"""

from __future__ import annotations

import collections
import io
import pickle

import torch

from distgan.errors import UserError

MAX_BYTES = 8 << 30  # a snapshot larger than this is refused before it is read


class UnsafePickle(UserError):
    """The pickle names something outside the allow-list, or is not a pickle of this kind."""


class Record:
    """An inert stand-in for an object of a class that is not constructed: its pickled attributes in
    `state`, any dict items in `items`, any list items in `elements`, and the class's dotted name."""

    kind = "?"

    def __init__(self, *args, **kwargs):  # a REDUCE calling the "class": refused, nothing runs
        raise UnsafePickle(f"the pickle calls class {self.kind} with arguments; only plain objects are read")

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafePickle(f"an object of {self.kind} carries a state of type {type(state).__name__}")
        self.__dict__.setdefault("state", {}).update(state)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("elements", []).append(value)

    def extend(self, values):
        for v in values:
            self.append(v)

    def get(self, name, default=None):
        return self.__dict__.get("state", {}).get(name, default)

    def __repr__(self) -> str:
        return f"Record({self.kind})"


def _record_class(module: str, name: str) -> type:
    return type(name, (Record,), {"kind": f"{module}.{name}", "__module__": "distgan.safepickle.records"})


def _storage(data: bytes):
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickle("a tensor storage is not stored as bytes")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # torch's own safe loader refused it
        raise UnsafePickle(f"a tensor storage does not read back safely: {exc}") from None


def _tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None, *rest):
    if not isinstance(storage, torch.TypedStorage) or hooks or rest:
        raise UnsafePickle("a tensor in the pickle carries hooks or an unknown storage")
    t = torch.empty((0,), dtype=storage.dtype)
    t.set_(storage._untyped_storage, offset, size, stride)
    return t


def _parameter(data, requires_grad=True, hooks=None, *state):
    if not isinstance(data, torch.Tensor) or hooks or any(s for s in state):
        raise UnsafePickle("a parameter in the pickle carries hooks or extra state")
    return data


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.storage", "_load_from_bytes"): _storage,
}
DTYPES = {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, records: tuple[str, ...]):
        super().__init__(file)
        self.records = records
        self.classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == "torch" and name in DTYPES:
            return getattr(torch, name)
        if any(module == p.rstrip(".") or module.startswith(p) for p in self.records) and name.isidentifier():
            return self.classes.setdefault((module, name), _record_class(module, name))
        raise UnsafePickle(
            f"the pickle names {module}.{name}, which is not on the allow-list (docs/security.md); nothing was run"
        )

    def persistent_load(self, pid):
        raise UnsafePickle("the pickle uses persistent ids (torch.save's zip format?); not a plain pickle")


class _Hashing:
    """A binary file read through `digest` (hashlib): the pickle's bytes are hashed as it reads them."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data

    def readline(self) -> bytes:
        data = self.f.readline()
        self.digest.update(data)
        return data


def load(path: str, records: tuple[str, ...], digest=None):
    """Unpickle `path` under the allow-list above; classes under the `records` module prefixes come
    back as `Record`s. `digest` (a hashlib object) is fed the whole file on the way, in one read."""
    import os

    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise UserError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if size > MAX_BYTES:
        raise UnsafePickle(f"'{path}' has {size} bytes, more than the {MAX_BYTES} a snapshot may have")
    with open(path, "rb") as f:
        head = f.read(2)
        if head[:1] != b"\x80":
            hint = " (a zip: torch.save's format, not a training-loop pickle)" if head == b"PK" else ""
            raise UnsafePickle(f"'{path}' is not a pickle of protocol 2 or newer{hint}")
        f.seek(0)
        source = f if digest is None else _Hashing(f, digest)
        try:
            data = _Unpickler(source, records).load()
            while digest is not None and source.read(1 << 20):  # any bytes after the pickle's STOP
                pass
            return data
        except UnsafePickle:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
            raise UnsafePickle(f"'{path}' does not unpickle as a network snapshot: {exc}") from None


def state_dict(record: Record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The parameters and buffers of a pickled nn.Module record, named and ordered as
    `module.state_dict()` would (its own `_parameters`, `_buffers`, then its children's)."""
    if not isinstance(record, Record):
        raise UnsafePickle(f"expected a pickled module at '{prefix or '.'}', found {type(record).__name__}")
    out = {}
    for key in ("_parameters", "_buffers"):
        for name, t in (record.get(key) or {}).items():
            if t is not None:
                if not isinstance(t, torch.Tensor):
                    raise UnsafePickle(f"'{prefix}{name}' is not a tensor")
                out[prefix + name] = t
    for name, child in (record.get("_modules") or {}).items():
        if child is not None:
            out.update(state_dict(child, f"{prefix}{name}."))
    return out


def parameter_names(record: Record, prefix: str = "") -> list[str]:
    """The names of a module record's parameters in `module.parameters()` order (an optimizer's indices)."""
    names = [prefix + n for n, t in (record.get("_parameters") or {}).items() if t is not None]
    for name, child in (record.get("_modules") or {}).items():
        if child is not None:
            names += parameter_names(child, f"{prefix}{name}.")
    return names


def child(record: Record, *path: str) -> Record:
    """record._modules[path[0]]._modules[path[1]] ...; a clear error when the structure differs."""
    for name in path:
        modules = record.get("_modules") if isinstance(record, Record) else None
        if not modules or name not in modules:
            raise UnsafePickle(f"the pickled module has no submodule '{name}' where one was expected")
        record = modules[name]
    return record


def children(record: Record) -> list[Record]:
    return list((record.get("_modules") or {}).values())
