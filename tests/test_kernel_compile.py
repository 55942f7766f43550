"""Every Triton specialisation the public kernels API launches compiles for sm_80 and sm_90, without
a GPU: launches recorded under the interpreter, then compiled ahead of time (kernels/aot.py)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from kernels import aot

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records under the interpreter")


def compile_report(tmp_path, launches, archs="80,90"):
    (tmp_path / "records.json").write_text(json.dumps(launches))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernels.aot",
            "compile",
            str(tmp_path / "records.json"),
            "--archs",
            archs,
            "--out",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    return r, json.loads((tmp_path / "report.json").read_text())


def test_every_launched_specialisation_compiles_for_sm80_and_sm90(tmp_path):
    launches = aot.representative_launches()
    kernels_seen = {launch["kernel"] for launch in launches}
    assert kernels_seen == {
        "minibatch_l1_forward_kernel",
        "minibatch_l1_backward_kernel",
        "_wv_kernel",
        "_wtu_kernel",
        "_reduce_kernel",
        "_scale_kernel",
    }

    def dtypes(names):
        return {a["tensor"] for x in launches if x["kernel"] in names for a in x["args"].values() if "tensor" in a}

    assert {"float32", "bfloat16", "float16"} <= dtypes({"minibatch_l1_forward_kernel"})
    assert {"float32", "bfloat16", "float16"} <= dtypes({"_wv_kernel", "_wtu_kernel", "_scale_kernel"})
    forward = [x["args"] for x in launches if x["kernel"] == "minibatch_l1_forward_kernel"]
    assert {a["EXCLUDE_SELF"]["bool"] for a in forward} == {True, False}
    # BLOCK_K from 1 to 1024 (at 1024, BLOCK_J is at its floor of 1), BLOCK_I both 32 and 16
    assert {a["BLOCK_K"]["int"] for a in forward} == {1, 8, 16, 64, 128, 256, 1024}, forward
    r, report = compile_report(tmp_path, launches)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(report) == 2 * len(launches) and all(row["ok"] for row in report)
    assert {row["arch"] for row in report} == {"sm_80", "sm_90"}
    # spectral norm's kernels leave room for at least 4 programs per SM (register file: 64K per SM),
    # without spilling, on both targets
    for row in report:
        if row["kernel"] in ("_wv_kernel", "_wtu_kernel", "_reduce_kernel", "_scale_kernel"):
            assert 65536 // (row["registers"] * 32 * row["num_warps"]) >= 4, row
            assert row["stack_bytes"] == row["local_bytes"] == 0, row


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    launch = next(x for x in aot.representative_launches() if x["kernel"] == "minibatch_l1_forward_kernel")
    launch["args"]["BLOCK_K"] = {"int": 3}  # tl.arange needs a power of 2
    r, report = compile_report(tmp_path, [launch], archs="90")
    assert r.returncode == 1 and not report[0]["ok"] and "minibatch_l1_forward_kernel sm_90" in r.stderr
