"""What distgan takes from a checkpoint's stored config, and what it never does.

A checkpoint is data someone else may have written: its tensors are plain safetensors, and its
stored config is plain JSON, but a config *value* can be an action. A `pipe:` shard spec runs a
shell command, an http(s):// spec fetches from a server, `tracking.wandb.*` chooses where the run
and its samples are uploaded, and a local path (a shard folder, `variant.vgg_weights`) is read.
Such values are taken only from this invocation (a preset, a --config file, key=value overrides)
or from the built-in defaults; from a checkpoint, only with --trust-checkpoint-config.

Everything else in a stored config (model shape, losses, learning rates, steps) only sets
numbers inside this process, so `distgan train --resume CKPT` without a preset continues with
it, and `distgan sample`/`eval` rebuild the model from it. A run directory's `config.yaml` is
written for people to read and never read back.
"""

from __future__ import annotations

import copy
import shlex
import sys
from collections.abc import Iterable

from distgan.errors import UserError

# Config keys whose values reach outside the process.
SHARD_KEYS = ("data.shards", "data.shards_a", "data.shards_b")
FILE_KEYS = ("variant.vgg_weights", "train.eval_inception", "train.eval_ref", "model.vae", "model.align.encoder")
# W&B destination: never taken from a checkpoint; this invocation's values (or defaults) are used.
TRACKING_KEYS = ("tracking.wandb.mode", "tracking.wandb.project", "tracking.wandb.entity", "tracking.wandb.name")
OUTWARD = SHARD_KEYS + FILE_KEYS + TRACKING_KEYS

TRUST_FLAG = "--trust-checkpoint-config"


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = (tree or {}).get(part) if isinstance(tree, dict) else None
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _default(dotted: str):
    from distgan import config

    return config.get(config.Config(), dotted)


def harmless(key: str, value) -> bool:
    """Whether a stored value of `key` reaches nothing outside the process: no value, the
    default, or one of distgan's embedded data sets (`builtin:NAME` with a known NAME)."""
    if key == "tracking.wandb.mode":  # where a run goes is project/entity; these modes upload nothing new
        return value in ("auto", "offline", "disabled")
    if key in TRACKING_KEYS:
        return value == _default(key)
    if not value:
        return True
    if key in SHARD_KEYS and isinstance(value, str) and value.startswith("builtin:"):
        from distgan.data import builtin

        return value.split(":", 1)[1] in builtin.names()
    if key == "model.vae" and value == "builtin:tiny-vae":  # distgan's own, written to its cache
        return True
    return False


def override_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys that key=value overrides set."""
    return {item.split("=", 1)[0].strip() for item in overrides if "=" in item}


def decoder_keys(stored: dict) -> list[str]:
    """The file keys every use of a checkpoint's generator needs: model.vae for latent runs."""
    return ["model.vae"] if _get(stored, "data.kind") == "latents" else []


def checkpoint_config(
    stored: dict, *, given: set[str], needed: Iterable[str], trust: bool, where: str
) -> tuple[dict, list[str]]:
    """The stored config of checkpoint `where`, with every outward-reaching value that is not
    harmless dropped: tracking.* and keys the command does not need go back to their defaults
    (shard keys and files to ""), and a key in `needed` that the user did not set in `given`
    stops the command with a line that shows the stored value and how to pass it. With
    `trust`, stored values are kept. Returns (config dict, notes to print)."""
    cfg = copy.deepcopy(stored)
    notes = []
    for key in OUTWARD:
        value = _get(stored, key)
        if key in given or harmless(key, value):
            continue
        if trust:
            notes.append(f"using the checkpoint's {key}={value!r} ({TRUST_FLAG})")
            continue
        if key in needed:
            raise UserError(
                f"checkpoint '{where}' stores {key}={value!r}; distgan never takes a shard location, file or "
                f"URL from a checkpoint. Pass it yourself if you trust it ({shlex.quote(f'{key}={value}')}), or add {TRUST_FLAG}"
            )
        replacement = _default(key) if key in TRACKING_KEYS else ""
        _set(cfg, key, replacement)
    return cfg, notes


def differences(stored: dict, cfg, keys: Iterable[str] = OUTWARD) -> list[str]:
    """One line per outward-reaching key (of `keys`) whose value in this invocation's config
    differs from the checkpoint's stored one: this invocation's is the one used."""
    from distgan import config

    ours = config.to_dict(cfg)
    lines = []
    for key in keys:
        a, b = _get(stored, key), _get(ours, key)
        if a != b and (a or b):
            lines.append(f"note: the checkpoint was made with {key}={a!r}; this run uses {b!r}")
    return lines


def say(lines: Iterable[str]) -> None:
    for line in lines:
        print(line if line.startswith("note:") else f"note: {line}", file=sys.stderr)


def stream_keys(stored: dict) -> set[str]:
    """The config keys of the shard streams that the stored config's variant trains on."""
    from distgan import config, variants

    cfg = config.from_dict(stored)
    return {key for key, _ in variants.get(cfg.variant.name).data_streams(cfg).values()}
