"""Checkpoints as plain safetensors files: atomic, keep-last-k, never unpickled.

RUN_DIR/checkpoints/step-00001000/
    model.safetensors      G.*, D.*, G_ema.* (every model of the variant and its EMA copies)
    optimizer.safetensors  G.state.<param index>.<name>, ...; param_groups in the metadata
    state.safetensors      per-rank RNG states and data-stream positions; the metadata "distgan"
                           entry holds step, config and everything else that is not a tensor

A step folder is written under a temporary name and renamed into place, so a crash mid-write
never leaves a folder that looks complete. Anyone can read the files with `safe_open`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distgan import files
from distgan.errors import RunFailed, UserError

FORMAT = 1
FILES = ("model.safetensors", "optimizer.safetensors", "state.safetensors")
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_steps(run_dir: Path) -> list[Path]:
    """Complete step folders of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve(path: str | Path) -> Path:
    """A step folder, or a run directory (its latest step), as a step folder that exists."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    if (p / "state.safetensors").exists() or STEP_DIR.match(p.name):
        return p
    steps = list_steps(p)
    if not steps:
        raise UserError(f"'{path}' is neither a checkpoint step folder nor a run directory with checkpoints")
    return steps[-1]


# -- flattening state into tensors + JSON -----------------------------------------------------


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as tensors ({name}.state.{index}.{key}) and JSON (the rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.state.{index}.{key}"] = _plain(value)
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(name: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    prefix = f"{name}.state."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def fingerprint(modules: dict[str, torch.nn.Module]) -> int:
    """A hash of every parameter and buffer, to check that DDP ranks hold identical models."""
    h = hashlib.sha256()
    for name in sorted(modules):
        for key, value in modules[name].state_dict().items():
            h.update(key.encode())
            h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


# -- saving -------------------------------------------------------------------------------------


def save(
    run_dir: Path,
    step: int,
    *,
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state_tensors: dict[str, torch.Tensor],
    meta: dict,
    keep_last: int,
) -> Path:
    """Write step `step` atomically and drop all but the newest `keep_last` step folders."""
    return write(run_dir, step, snapshot(models, optimizers, state_tensors), meta, keep_last)


@dataclass
class Snapshot:
    """A checkpoint's tensors copied to host memory: what training may change from now on is not in it."""

    models: dict[str, torch.Tensor]
    optimizers: dict[str, torch.Tensor]
    optimizer_meta: dict[str, dict]
    state: dict[str, torch.Tensor]


def snapshot(
    models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer], state_tensors: dict
) -> Snapshot:
    """Copy the models, optimizer states and run state to host memory (the part of a save the step
    waits for when the files are written in the background)."""
    model_tensors = {f"{n}.{k}": _plain(v) for n, m in models.items() for k, v in m.state_dict().items()}
    opt_tensors, opt_meta = {}, {}
    for name, opt in optimizers.items():
        t, m = optimizer_tensors(name, opt)
        opt_tensors.update(t)
        opt_meta[name] = m
    return Snapshot(model_tensors, opt_tensors, opt_meta, {k: _plain(v) for k, v in state_tensors.items()})


def step_path(run_dir: Path, step: int) -> Path:
    """RUN/checkpoints/step-NNNNNNNN: where step `step`'s checkpoint is (or will be) published."""
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


def write(run_dir: Path, step: int, snap: Snapshot, meta: dict, keep_last: int) -> Path:
    """Write a snapshot as step `step`: a temporary folder, fsynced, renamed (atomic), then all but the
    newest `keep_last` step folders dropped. Safe on a thread of its own (train.ckpt_async)."""
    final = step_path(run_dir, step)
    folder = final.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=folder))
    try:
        header = {"distgan": json.dumps({**meta, "format": FORMAT, "step": step}), "format": "pt"}
        save_file(snap.models, str(tmp / "model.safetensors"), metadata=header)
        optimizer_header = {**header, "optimizers": json.dumps(snap.optimizer_meta)}
        save_file(snap.optimizers, str(tmp / "optimizer.safetensors"), metadata=optimizer_header)
        save_file(snap.state, str(tmp / "state.safetensors"), metadata=header)
        for f in FILES:  # make the bytes durable before the rename publishes them
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_steps(run_dir)[:-keep_last]:
        _set_aside(old)
    # What killed writers left behind (SIGKILL skips the cleanup above): temp and doomed folders.
    for stale in folder.iterdir():
        if stale.name.startswith((".tmp-step-", ".del-")) and stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


class BackgroundWriter:
    """train.ckpt_async: checkpoint files written on a thread while training goes on, at most one
    save in flight. `submit` first waits for the pending save (so saves land in order and never
    pile up); `wait` is called before anything reads the files (keep-best's copy) and when the run
    ends, by error or signal too. A write that failed raises RunFailed at the next `wait`. The
    thread is not a daemon: an interpreter that exits still finishes the pending save."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.step = -1

    def submit(self, step: int, write_fn) -> None:
        self.wait()

        def run():
            try:
                write_fn()
            except BaseException as exc:  # handed to the training thread at its next wait
                self.error = exc

        self.step = step
        self.thread = threading.Thread(target=run, name=f"distgan-checkpoint-{step}", daemon=False)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            exc, self.error = self.error, None
            raise RunFailed(f"checkpoint step {self.step} could not be written: {exc}") from exc


def keep_copy(run_dir: Path, step: int, name: str, info: dict) -> Path:
    """RUN_DIR/checkpoints/<name>: the files of step `step` (hard links where the file system has
    them, else copies) and `info` as best.json. The keep-last pruning of step folders does not touch it.

    Crash-safe at every instant: the copy is completed in a hidden folder `.<name>-<step>`, then
    `<name>`, a symbolic link, is switched to it by one rename (a link replaces a link atomically,
    which a folder cannot). A kill anywhere leaves `<name>` on a complete copy, the old or the new;
    `recover_best` finishes the job on resume."""
    folder = checkpoints_dir(run_dir)
    source, link = step_path(run_dir, step), folder / name
    target = folder / f".{name}-{step:08d}"
    if not _complete(target) or read_best_in(target) != info:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{name}-", dir=folder))
        try:
            for f in FILES:
                try:
                    os.link(source / f, tmp / f)
                except OSError:
                    shutil.copy2(source / f, tmp / f)
            files.write_text(tmp / "best.json", json.dumps(info) + "\n")  # flushed to disk
            if target.exists():  # an unfinished or other copy of this step from before a crash
                _set_aside(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if link.is_dir() and not link.is_symlink():  # a copy written by distgan before links: set aside once
        _set_aside(link)
    new_link = folder / f".tmp-link-{name}-{os.getpid()}"
    if new_link.is_symlink():
        new_link.unlink()
    os.symlink(target.name, new_link)  # relative: the run folder can be moved
    os.replace(new_link, link)
    _fsync_dir(folder)
    _prune_copies(folder, name)
    return link


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*FILES, "best.json"))


def read_best_in(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "best.json").read_text())
    except (OSError, ValueError):
        return None


def _prune_copies(folder: Path, name: str) -> None:
    """Remove the hidden copies of `name` that its link does not point at, and what killed writers left."""
    link = folder / name
    current = os.readlink(link) if link.is_symlink() else None
    for entry in folder.iterdir():
        stale = entry.name.startswith((f".tmp-step-{name}-", ".del-"))
        if stale or entry.name.startswith(f".{name}-") and entry.name != current:
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".tmp-link-{name}-") and entry.is_symlink():
            entry.unlink()


def read_best(run_dir: Path, name: str) -> dict | None:
    """The best.json of RUN_DIR/checkpoints/<name>/, if there is one."""
    return read_best_in(checkpoints_dir(run_dir) / name)


def recover_best(run_dir: Path, name: str, metric: str) -> dict | None:
    """On resume: make RUN_DIR/checkpoints/<name> hold the best of the step checkpoints that recorded
    an improvement (their metadata's "keep_best" entry, written before the checkpoint was published),
    in case a kill came between publishing that step and switching the link; clear leftovers.
    Returns the best record ({"step", metric}) or None."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return None
    best = read_best(run_dir, name)
    candidate = None
    for path in list_steps(run_dir):
        try:
            record = read_meta(path)[1].get("keep_best") or {}
        except UserError:
            continue
        if record.get("name") == name and isinstance(record.get(metric), (int, float)):
            if candidate is None or record[metric] < candidate[metric]:
                candidate = {"step": int(path.name.split("-")[1]), metric: float(record[metric])}
    if candidate is not None and (best is None or candidate[metric] < float(best.get(metric, float("inf")))):
        keep_copy(run_dir, candidate["step"], name, candidate)
        best = candidate
    _prune_copies(folder, name)
    return best


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`, moving an existing `final` out of the way in one
    rename first (never half-deleted under its name), and make the renames durable."""
    folder = final.parent
    if final.exists():
        _set_aside(final)
    os.rename(tmp, final)
    _fsync_dir(folder)


def _set_aside(path: Path) -> None:
    """Move `path` out of the way in one rename, into a `.del-*` folder beside it that the next save
    or keep_copy removes: never half-deleted under its own name."""
    os.rename(path, Path(tempfile.mkdtemp(prefix=".del-", dir=path.parent)) / "old")


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (a power cut after this keeps them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- loading ------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    meta: dict  # step, config, data, world_size, ...
    models: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict
    state: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model_state(self, name: str) -> dict[str, torch.Tensor]:
        prefix = f"{name}."
        return {k[len(prefix) :]: v for k, v in self.models.items() if k.startswith(prefix)}

    def optimizer_state(self, name: str) -> dict:
        if name not in self.optimizer_meta:
            raise UserError(f"checkpoint '{self.path}' has no optimizer '{name}'")
        return optimizer_state(name, self.optimizer_tensors, self.optimizer_meta[name])


def _read(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise UserError(f"checkpoint file '{path}' is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint file '{path}' is unreadable (truncated or corrupt?): {exc}") from None
    return metadata, tensors


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """(step folder, its JSON metadata) without reading any tensor: what a command needs to decide
    its config before the trainer loads the checkpoint whole."""
    folder = resolve(path)
    file = folder / "model.safetensors"
    if not file.is_file():
        raise UserError(f"checkpoint file '{file}' is missing")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("distgan")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint file '{file}' is unreadable (truncated or corrupt?): {exc}") from None
    try:
        return folder, json.loads(raw)
    except (TypeError, json.JSONDecodeError):
        raise UserError(f"'{file}' is not a distgan checkpoint (no 'distgan' metadata)") from None


def load(path: str | Path, only_models: bool = False) -> Checkpoint:
    """Open a step folder (or a run directory's latest) and read it whole, checking every file."""
    folder = resolve(path)
    meta_raw, models = _read(folder / "model.safetensors")
    try:
        meta = json.loads(meta_raw["distgan"])
    except (KeyError, json.JSONDecodeError):
        raise UserError(
            f"'{folder / 'model.safetensors'}' is not a distgan checkpoint (no 'distgan' metadata)"
        ) from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint '{folder}' has format {meta.get('format')}; this distgan reads format {FORMAT}")
    if only_models:
        return Checkpoint(folder, meta, models, {}, {}, {})
    opt_meta_raw, opt_tensors = _read(folder / "optimizer.safetensors")
    _, state = _read(folder / "state.safetensors")
    return Checkpoint(folder, meta, models, opt_tensors, json.loads(opt_meta_raw.get("optimizers", "{}")), state)


def load_model(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict with a user-facing error when the checkpoint was made by another model config."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"'{k}' has shape {tuple(state[k].shape)} there but {tuple(own[k].shape)} here")
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
        raise UserError(
            f"{what} does not fit the configured model ({'; '.join(parts)}): was it made with another model config?"
        )
    module.load_state_dict(state)


# -- the run state: what each rank contributes to a checkpoint, and what it gets back ------------------


def rank_state(
    rng_state: dict[str, torch.Tensor], feeds, variant_state: dict[str, torch.Tensor], fingerprint_value: int
) -> dict[str, torch.Tensor]:
    """One rank's part of state.safetensors: its RNG states (rng.*), every feed's resume position
    (data.*, see data/feeds.py), the variant's per-rank tensors (variant.*, e.g. CycleGAN's image
    pools) and the fingerprint of its models. `gather_rank_states` stacks them over ranks."""
    local = {f"rng.{k}": v for k, v in rng_state.items()}
    for feed in feeds:
        local.update(feed.state())
    local.update({f"variant.{k}": v for k, v in variant_state.items()})
    local["fingerprint"] = torch.tensor([fingerprint_value], dtype=torch.int64)
    return local


def gather_rank_states(gathered: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """`rank_state` of every rank, stacked on a first axis of ranks (what accelerator.gather gives),
    as the state tensors to save (rng.* renamed rng.rank.*) and the list of fingerprints."""
    state = {(f"rng.rank.{k[4:]}" if k.startswith("rng.") else k): v for k, v in gathered.items()}
    fingerprints = state.pop("fingerprint").flatten().tolist()
    return state, fingerprints


def run_meta(config: dict, fingerprints: list[int], variant: str, batches: int, world: int, num_workers: int) -> dict:
    """The JSON metadata of a checkpoint, besides its step."""
    import time

    return {
        "config": config,
        "fingerprints": fingerprints,
        "variant": variant,
        "data": {"batches": batches, "world_size": world, "num_workers": num_workers},
        "time": time.time(),
    }


@dataclass
class ResumePoint:
    """What one rank takes back from a checkpoint: the inverse of `rank_state` + `run_meta`."""

    step: int
    exact: bool  # same processes and loader workers: streams and RNG continue where they were
    batches: int = 0  # micro-batches drawn so far (0 when not exact: the streams restart)
    feeds: dict[str, tuple[list[int], list[int], torch.Tensor | None]] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] | None = None
    variant: dict[str, torch.Tensor] = field(default_factory=dict)


def resume_point(
    ckpt: Checkpoint, rank: int, world: int, num_workers: int, additive: tuple[str, ...] = ()
) -> ResumePoint:
    """Rank `rank`'s part of `ckpt`, for a run of `world` processes with `num_workers` loader workers
    each. With another layout the stream positions and RNG states do not map to this run's (the
    caller reseeds them from the step), and the variant's per-rank state is redistributed by rule:
    rank r takes old rank (r mod old world)'s rows (`shared.*` keys are the same on every rank anyway),
    except the `additive` keys (partial sums over ranks, e.g. ADA's), whose sum over the old ranks
    goes to rank 0 and zeros to the others, so their total over ranks is unchanged."""
    data = ckpt.meta["data"]
    if data["world_size"] != world or data["num_workers"] != num_workers:
        old = data["world_size"]
        own = {}
        for k, v in ckpt.state.items():
            if k.startswith("variant."):
                name = k[len("variant.") :]
                if name in additive:
                    own[name] = v.sum(0) if rank == 0 else torch.zeros_like(v[0])
                else:
                    own[name] = v[rank % old]
        return ResumePoint(ckpt.step, exact=False, variant=own)
    feeds = {}
    for key, v in ckpt.state.items():
        if key.startswith("data.") and key.endswith(".positions"):
            prefix = key[: -len("positions")]
            read = ckpt.state.get(prefix + "shards_read")
            feeds[prefix] = (
                v[rank].tolist(),
                ckpt.state[prefix + "skipped"][rank].tolist(),
                None if read is None else read[rank],
            )
    rng_state = {k.split(".", 2)[2]: v[rank] for k, v in ckpt.state.items() if k.startswith("rng.")}
    own = {k[len("variant.") :]: v[rank] for k, v in ckpt.state.items() if k.startswith("variant.")}
    return ResumePoint(ckpt.step, True, data["batches"], feeds, rng_state, own)
