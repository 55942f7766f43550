"""Shared by the benchmark scripts: what machine this is, and writing results/<name>-<machine>.{json,md}."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("accelerate", "webdataset", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


def machine_tag() -> str:
    return (
        f"gpu-{torch.cuda.get_device_name(0).split()[-1].lower()}"
        if torch.cuda.is_available()
        else f"cpu{os.cpu_count()}"
    )


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "unknown"


def code_hash() -> str:
    """A hash of the code that trains and measures (distgan/ and kernels/, sources and presets):
    results made by other code are recomputed or shown as stale, never silently reused."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted([*root.glob("distgan/**/*.py"), *root.glob("distgan/presets/*.yaml"), *root.glob("kernels/*.py")]):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def write(name: str, rows: list[dict], columns: list[str], notes: str, extra: dict | None = None) -> None:
    """Print the table and write results/<name>-<machine>.json and .md."""
    info = machine()
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)
    table = header + body
    print(table)
    RESULTS.mkdir(exist_ok=True)
    tag = machine_tag()
    payload = {
        "benchmark": name,
        "machine": info,
        "git": git_rev(),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "rows": rows,
        **(extra or {}),
    }
    (RESULTS / f"{name}-{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = (
        f"# {name}\n\nMachine: {info['cpu']}, {info['cores']} cores, device {info['device']}; "
        f"versions {json.dumps(info['versions'])}; git {payload['git']}.\n\n"
        f"Command: `{payload['command']}`\n\n{table}\n{notes}\n"
    )
    (RESULTS / f"{name}-{tag}.md").write_text(md)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)
