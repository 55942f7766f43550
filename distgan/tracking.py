"""Logging: W&B through Accelerate's tracker (main process only) + RUN_DIR/metrics.jsonl, always.

`tracking.wandb.mode`:
- auto (default): online when an API key is configured (WANDB_API_KEY or a netrc entry),
  offline otherwise; an offline run lands in RUN_DIR/wandb/ and `wandb sync` uploads it later;
- online / offline: as named; disabled: no W&B at all.
The W&B run id is kept in RUN_DIR/wandb_run_id so that a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from distgan import files

RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class Tracker:
    """Metrics to JSONL and (optionally) W&B; every method is a no-op off the main process."""

    def __init__(self, accelerator, cfg, run_dir: Path, config_dict: dict):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.mode = wandb_mode(cfg.tracking.wandb.mode)
        self.jsonl = None
        if not self.main:
            return
        self.jsonl = files.open_append(Path(run_dir) / "metrics.jsonl")
        if self.mode == "disabled":
            return
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not RUN_ID.fullmatch(run_id):  # a copied or damaged run directory: start a W&B run of our own
            if run_id:
                print(
                    f"warning: ignoring {id_file} ({run_id[:40]!r} is not a W&B run id); starting a new W&B run",
                    file=sys.stderr,
                )
            run_id = uuid.uuid4().hex[:12]
        files.write_text(id_file, run_id)
        w = cfg.tracking.wandb
        init = {
            "mode": self.mode,
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
            "name": w.name or Path(run_dir).name,
        }
        if w.entity:
            init["entity"] = w.entity
        accelerator.init_trackers(w.project, config=config_dict, init_kwargs={"wandb": init})

    @property
    def wandb(self):
        if not self.main or self.mode == "disabled":
            return None
        return self.accelerator.get_tracker("wandb")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.main:
            return
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def event(self, name: str, step: int, **fields) -> None:
        if self.main:
            self.jsonl.write(json.dumps({"step": step, "event": name, "time": round(time.time(), 3), **fields}) + "\n")

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """`image`: (H, W, C) uint8, e.g. a sample grid."""
        if self.wandb is not None:
            self.wandb.log_images({name: [image]}, step=step)

    def close(self) -> None:
        if not self.main:
            return
        if self.wandb is not None:
            self.accelerator.end_training()
        self.jsonl.close()

    def run_dir_hint(self) -> str | None:
        run = getattr(self.wandb, "run", None) if self.wandb is not None else None
        return getattr(run, "dir", None)
