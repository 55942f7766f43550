"""Ahead-of-time compilation of the Triton kernels for named GPUs, without a GPU.

The kernels are normally only ever run here under the interpreter. This module checks that they
compile for real: `record()` notes every kernel launch that the public API makes under
TRITON_INTERPRET=1 (kernel, argument types, constexprs, num_warps), and `compile_records` compiles
each distinct specialisation with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`, in a process without the interpreter. The cubin's resource usage comes from the wheel's
`cuobjdump --dump-resource-usage`: registers, stack and local (spill) bytes, shared memory.

    python -m kernels.aot compile RECORDS.json --archs 80,90 --out REPORT.json

`tests/test_kernel_compile.py` runs it in `make test`; `benchmarks/kernel_resources.py` writes the
report to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_DTYPES = {
    "float32": "fp32",
    "float16": "fp16",
    "bfloat16": "bf16",
    "float64": "fp64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "i1",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if value is None:
        return {"none": None}
    return {"other": repr(value)}


@contextlib.contextmanager
def record():
    """Collect the launches made in the block (under TRITON_INTERPRET=1) as JSON-able dicts."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        import inspect

        names = self.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        params = inspect.signature(self.fn).parameters.values()
        launches.append(
            {
                "module": self.fn.__module__,
                "kernel": self.fn.__name__,
                "args": {k: _describe(v) for k, v in bound.items()},
                "constexprs": [p.name for p in params if "constexpr" in str(p.annotation)],
                "options": {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS},
            }
        )
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def distinct(launches: list[dict]) -> list[dict]:
    """One launch per specialisation: tensor dtypes, constexpr values and launch options (integer
    arguments count by type, as `compile_records` types them)."""
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(
            [
                launch["module"],
                launch["kernel"],
                launch["options"],
                {
                    k: v
                    if "int" not in v or k in launch["constexprs"]
                    else {"int": "i64" if abs(v["int"]) >= 2**31 else "i32"}
                    for k, v in launch["args"].items()
                },
            ],
            sort_keys=True,
        )
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def representative_launches() -> list[dict]:
    """Under the interpreter: every kind of launch the public kernels API makes, on small inputs.
    minibatch discrimination forward and backward at the K that select each block shape, with and
    without exclude_self, in fp32, bf16 and fp16; spectral norm of linear, conv and transposed-conv
    layers, contiguous or not, in fp32, bf16 and fp16, with 1 and 2 power iterations, alone and
    grouped by spectral_norm_all."""
    import torch

    import kernels

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("representative_launches records under the interpreter: set TRITON_INTERPRET=1 first")
    g = torch.Generator().manual_seed(0)
    with record() as launches:
        # the block shapes of block_sizes: BLOCK_K from 1 to 1024 (at 1024 BLOCK_J is at its floor of 1)
        # in every dtype at the K the models use and at 513; the other shapes and exclude_self=False in fp32
        cases = [
            (dtype, k, True) for dtype in (torch.float32, torch.bfloat16, torch.float16) for k in (1, 5, 8, 16, 33, 513)
        ]
        cases += [(torch.float32, k, True) for k in (65, 129)] + [(torch.float32, k, False) for k in (5, 513)]
        for dtype, k, exclude_self in cases:
            m = torch.randn(6, 2, k, generator=g).to(dtype).requires_grad_(True)
            out = kernels.minibatch_discrimination(m, exclude_self=exclude_self, backend="triton", group_size=3)
            out.float().sum().backward()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for iters in (1, 2):
                layers = [torch.nn.Linear(7, 5), torch.nn.Conv2d(3, 4, 3), torch.nn.ConvTranspose2d(4, 3, 3)]
                for layer in layers:
                    sn = kernels.spectral_norm(layer, n_power_iterations=iters, backend="triton").to(dtype)
                    sn.train()
                    _ = sn.weight
                group = torch.nn.Sequential(
                    *(kernels.spectral_norm(torch.nn.Linear(5, 5), backend="triton") for _ in range(3))
                ).to(dtype)
                kernels.spectral_norm_all(group)
                group(torch.randn(2, 5, generator=g).to(dtype))
    return distinct(launches)


def _signature(fn, launch: dict) -> tuple[dict, dict]:
    sig, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        desc = launch["args"].get(param.name)
        if param.is_constexpr:
            sig[param.name] = "constexpr"
            constexprs[(i,)] = next(iter(desc.values())) if desc else param.default
            continue
        kind, value = next(iter(desc.items()))
        if kind == "tensor":
            sig[param.name] = "*" + _DTYPES[value]
        elif kind == "int":
            sig[param.name] = "i64" if abs(value) >= 2**31 else "i32"
        elif kind == "float":
            sig[param.name] = "fp32"
        elif kind == "bool":
            sig[param.name] = "i1"
        else:
            raise ValueError(f"{fn.__name__}: argument {param.name} of kind {kind} cannot be typed")
    return sig, constexprs


def resource_usage(cubin: bytes) -> dict:
    """registers, stack, local and shared bytes of a cubin's one function (cuobjdump)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-300:]}")
    return dict(zip(("registers", "stack_bytes", "shared_bytes", "local_bytes"), map(int, m.groups())))


def compile_records(launches: list[dict], archs: list[int]) -> list[dict]:
    """Compile each launch for each arch (this process must not run the interpreter)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile with TRITON_INTERPRET unset: the interpreter replaces the JIT functions")
    report = []
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        sig, constexprs = _signature(fn, launch)
        options = {"num_warps": 4, **launch["options"]}
        for arch in archs:
            row = {
                "kernel": launch["kernel"],
                "arch": f"sm_{arch}",
                "num_warps": options["num_warps"],
                "signature": {k: v for k, v in sig.items() if v != "constexpr"},
                "constexprs": {fn.params[i[0]].name: v for i, v in constexprs.items()},
            }
            try:
                kernel = triton.compile(
                    ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32), options=options
                )
                row.update(resource_usage(kernel.asm["cubin"]), ok=True)
            except Exception as exc:  # reported, and the caller fails on it
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}")
            report.append(row)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile recorded launches for the given archs")
    c.add_argument("records")
    c.add_argument("--archs", default="80,90")
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    launches = json.loads(Path(args.records).read_text())
    report = compile_records(launches, [int(a) for a in args.archs.split(",")])
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in report if not r["ok"]]
    for r in failed:
        print(f"{r['kernel']} {r['arch']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
