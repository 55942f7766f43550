"""How long the README's two quick-start commands take from a fresh clone, on this machine.

Clones the repository's committed HEAD into a temporary folder (what a new user or CI gets), then
times, one after another in that clone: `make venv` (the one-off set-up both commands start
with), `make demo` (train the default preset, then sample a grid) and `make test` (the suite CI
runs). Writes results/timings-<machine>.{json,md} with the revision, the commands and the test
summary line.

    python benchmarks/timings.py [--skip-test]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({r.returncode}) after {seconds:.0f} s:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    print(f"  {seconds:.0f} s", flush=True)
    return seconds, r.stdout + r.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-test", action="store_true", help="time only the set-up and the demo")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "distgan"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True, check=True
        ).stdout.strip()
        for target in ("venv", "demo", *([] if args.skip_test else ["test"])):
            seconds, out = timed(["make", target], clone)
            row = {"command": f"make {target}", "seconds": round(seconds, 1), "minutes": f"{seconds / 60:.1f}"}
            if target == "test":
                summary = [line for line in out.splitlines() if re.search(r"\d+ passed", line)]
                row["result"] = summary[-1].strip("= ") if summary else "?"
            if target == "demo":
                done = [line for line in out.splitlines() if line.startswith(("done:", "wrote"))]
                row["result"] = "; ".join(done)
            rows.append(row)
    notes = (
        f"Fresh `git clone` of revision {rev}, the commands run one after another in it (so `make demo` and "
        "`make test` find the virtual environment `make venv` made; on a really fresh machine the first of "
        "them makes it). `make demo` trains the default preset for its full train.steps and samples a 100-image "
        "grid; `make test` is `TRITON_INTERPRET=1 pytest -q` (CI's `.ci/run`)."
    )
    common.write("timings", rows, ["command", "seconds", "minutes", "result"], notes, extra={"clone_git": rev})


if __name__ == "__main__":
    main()
