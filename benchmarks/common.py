"""Shared by the benchmark scripts: what machine this is, and writing results/<name>-<machine>.{json,md}."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

# where results go; DISTGAN_BENCH_RESULTS redirects them (gpu_suite.sh --dry-run in the tests)
RESULTS = Path(os.environ.get("DISTGAN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


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


def loglog_png(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str) -> None:
    """A log-log line plot (one line per series, dashed where the name says 'floor'), drawn with
    Pillow: the benchmarks need no plotting library."""
    from PIL import Image, ImageDraw

    points = [p for pts in series.values() for p in pts if p[0] > 0 and p[1] > 0]
    if not points:
        return
    import math

    W, H, left, right, top, bottom = 900, 560, 80, 220, 40, 60
    xs, ys = [math.log10(p[0]) for p in points], [math.log10(p[1]) for p in points]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)

    def at(x, y):
        return (
            left + (math.log10(x) - x0) / (x1 - x0) * (W - left - right),
            H - bottom - (math.log10(y) - y0) / (y1 - y0) * (H - top - bottom),
        )

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for e in range(x0, x1 + 1):
        x, _ = at(10**e, 10**y0)
        d.line([x, top, x, H - bottom], fill=(225, 225, 225))
        d.text((x - 12, H - bottom + 6), f"1e{e}", fill=(0, 0, 0))
    for e in range(y0, y1 + 1):
        _, y = at(10**x0, 10**e)
        d.line([left, y, W - right, y], fill=(225, 225, 225))
        d.text((left - 40, y - 6), f"1e{e}", fill=(0, 0, 0))
    colours = [
        (31, 119, 180),
        (214, 39, 40),
        (44, 160, 44),
        (148, 103, 189),
        (255, 127, 14),
        (23, 190, 207),
        (140, 86, 75),
        (127, 127, 127),
    ]
    for i, (name, pts) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        pts = sorted(p for p in pts if p[0] > 0 and p[1] > 0)
        coords = [at(*p) for p in pts]
        if "floor" in name:  # dashed
            for a, b in zip(coords, coords[1:]):
                for k in range(0, 10, 2):
                    d.line(
                        [
                            a[0] + (b[0] - a[0]) * k / 10,
                            a[1] + (b[1] - a[1]) * k / 10,
                            a[0] + (b[0] - a[0]) * (k + 1) / 10,
                            a[1] + (b[1] - a[1]) * (k + 1) / 10,
                        ],
                        fill=colour,
                        width=2,
                    )
        else:
            if len(coords) > 1:
                d.line(coords, fill=colour, width=2)
            for x, y in coords:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([W - right + 12, top + 14 + 18 * i, W - right + 36, top + 14 + 18 * i], fill=colour, width=3)
        d.text((W - right + 42, top + 8 + 18 * i), name, fill=(0, 0, 0))
    d.text((left, 12), title, fill=(0, 0, 0))
    d.text(((W - right + left) // 2 - 40, H - 30), xlabel, fill=(0, 0, 0))
    d.text((6, top - 24), ylabel, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
