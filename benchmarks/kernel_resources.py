"""Registers, stack/local (spill) bytes and shared memory of every Triton specialisation the public
kernels API launches, compiled ahead of time for sm_80 and sm_90 (no GPU needed; kernels/aot.py).

    TRITON_INTERPRET=1 python benchmarks/kernel_resources.py

Programs per SM by registers = floor(65536 / (registers x 32 x num_warps)), the register file's
limit (other limits, such as shared memory and the 32 or 64 resident blocks, can be lower).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1: the launches are recorded under the interpreter")
    from kernels import aot

    launches = aot.representative_launches()
    with tempfile.TemporaryDirectory() as tmp:
        records, out = Path(tmp) / "records.json", Path(tmp) / "report.json"
        records.write_text(json.dumps(launches))
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
        subprocess.run(
            [sys.executable, "-m", "kernels.aot", "compile", str(records), "--archs", "80,90", "--out", str(out)],
            check=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        report = json.loads(out.read_text())
    rows = []
    for row in report:
        dtypes = sorted({v for v in row["signature"].values() if v.startswith("*") and v not in ("*i32", "*i64")})
        rows.append(
            {
                "kernel": row["kernel"],
                "tensors": ",".join(d[1:] for d in dtypes),
                "constexprs": " ".join(f"{k}={v}" for k, v in row["constexprs"].items() if k != "F"),
                "arch": row["arch"],
                "warps": row["num_warps"],
                "registers": row["registers"],
                "stack B": row["stack_bytes"],
                "local B": row["local_bytes"],
                "shared B": row["shared_bytes"],
                "programs/SM by registers": 65536 // (row["registers"] * 32 * row["num_warps"]),
            }
        )
    common.write(
        "kernel_resources",
        rows,
        [
            "kernel",
            "tensors",
            "constexprs",
            "arch",
            "warps",
            "registers",
            "stack B",
            "local B",
            "shared B",
            "programs/SM by registers",
        ],
        "Compiled with triton.compile(ASTSource, target=GPUTarget('cuda', arch, 32)) on this CPU; resource usage "
        "from the wheel's cuobjdump --dump-resource-usage. Each row is one specialisation that the public API "
        "launched under the interpreter (tests/test_kernel_compile.py compiles the same set in make test). "
        "Programs/SM by registers = 65536 // (registers x 32 x warps).",
    )


if __name__ == "__main__":
    main()
