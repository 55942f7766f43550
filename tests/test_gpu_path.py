"""The training step written for a GPU: no host syncs between log steps, torch.compile, TF32 and
channels_last, and benchmarks/gpu_suite.sh's CPU dry run."""

import sys
import traceback

import pytest
import torch
from conftest import FAST, ROOT
from torch.utils._python_dispatch import TorchDispatchMode

from distgan import cluster, config, periodic, trainer
from distgan.data import feeds

READS = ("item", "__bool__", "tolist", "numpy", "cpu", "__float__", "__int__", "__index__")
# aten ops that make the host wait for the device on CUDA: a value read (item, bool, float, int all
# end in _local_scalar_dense), an output whose size depends on the data (boolean-mask indexing,
# nonzero, masked_select, unique), or a bool answer (equal, is_nonzero)
SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "equal",
    "is_nonzero",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "repeat_interleave",
}


def _is_cpu(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


class SyncOps(TorchDispatchMode):
    """Records every aten op that synchronises with a device (SYNC_OPS, indexing or index_put with a
    boolean mask) and every copy from a device to the host, by name. On the CPU nothing waits, but
    the same code on CUDA would."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        masked = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or [])
        )
        to_host = (name == "_to_copy" and _is_cpu(kwargs.get("device")) and args[0].device.type != "cpu") or (
            name == "copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu"
        )  # (both only on a GPU: on the CPU, the .to(cpu) patch above stands in)
        if name in SYNC_OPS or masked or to_host:
            self.record(name + (" (boolean mask)" if masked else ""))
        return func(*args, **kwargs)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "data.augment=translation,cutout",
            "data.augment_p=auto",
            "train.lr_decay=linear",
            "model.d.spectral_norm=true",
        ],
    ],
)
def test_steps_read_no_tensor_on_the_host_between_log_steps(tmp_path, monkeypatch, extra):
    """12 steps, log_every=10, from the real digit shards: every host read of a tensor value inside the
    loop (Tensor.item, __bool__, tolist, numpy, cpu, .to(cpu), float/int) and every aten op that waits
    for a device (SyncOps: value reads, boolean masks, nonzero, masked_select, equal, unique, copies to
    the host) happens in the periodic jobs of step 10 (the log) or of the last step, none in the steps
    themselves (NaN guard and stop flag included; also with ADA's adaptive p, a learning-rate
    schedule and spectral norm)."""
    cfg = config.load_config(
        "digits-dcgan",
        overrides=[
            *FAST,
            "train.steps=12",
            "train.log_every=10",
            "train.ckpt_every=1000",
            "train.sample_every=1000",
            *extra,
        ],
    )
    where = {"phase": "setup", "steps": 0}
    reads: list[tuple[str, int, str]] = []

    def record(name):
        frames = traceback.extract_stack()[:-2]
        # Adam reads its step count, a CPU tensor on the CPU; on CUDA distgan builds Adam with
        # capturable=True, which keeps it on the GPU and reads nothing (variants.gan.CAPTURABLE)
        if any(f.name == "_get_value" and "torch/optim" in f.filename for f in frames):
            return
        ours = [f for f in frames if "/distgan/" in f.filename or "/kernels/" in f.filename] or frames
        reads.append((where["phase"], where["steps"] + 1, name, ours[-1].filename, ours[-1].name))

    def counting(name, original):
        def read(self, *args, **kwargs):
            record(name)
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    to = torch.Tensor.to

    def moving(self, *args, **kwargs):  # .to("cpu"), .to(device="cpu")
        # (a torch.device is the training device's here: on the CPU it is "cpu" too, and moving there
        # is what every step does; a copy to the host by a torch.device is seen on a GPU, by SyncOps)
        if any(isinstance(a, str) and _is_cpu(a) for a in (*args, kwargs.get("device"))):
            record("to(cpu)")
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", moving)
    draw, jobs = feeds.draw, periodic.periodic

    def drawing(*args, **kwargs):
        where["phase"] = "step"  # the loop has begun
        return draw(*args, **kwargs)

    def jobs_after(run, *args, **kwargs):
        where["phase"] = "periodic"
        try:
            return jobs(run, *args, **kwargs)
        finally:
            where["phase"], where["steps"] = "step", run.step

    monkeypatch.setattr(feeds, "draw", drawing)
    monkeypatch.setattr(periodic, "periodic", jobs_after)
    with SyncOps(record):
        assert trainer.train(cfg, tmp_path / "run") == 0
    in_steps = [r for r in reads if r[0] == "step" and r[1] <= 12]
    assert in_steps == [], in_steps[:20]
    periodic_steps = sorted({r[1] for r in reads if r[0] == "periodic"})
    assert periodic_steps == [10, 12], periodic_steps  # the log step, and the last (log, grid, checkpoint)
    assert any(r[2] == "tolist" for r in reads if r[0] == "periodic" and r[1] == 10)


COMPILED = [*FAST, "model.g.width=8", "model.d.width=8", "train.ckpt_every=1000", "train.log_every=1"]


def _final_models(run):
    from distgan import checkpoint

    ckpt = checkpoint.load(checkpoint.list_steps(run)[-1])
    return {f"{n}.{k}": v for n in ("G", "D") for k, v in ckpt.model_state(n).items()}


@pytest.mark.parametrize("kernels_op", [True, False])
def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path, kernels_op, monkeypatch):
    """digits-sngan (spectral norm on every D layer) with train.compile=true, its SN layers as
    distgan's custom op or traced for Inductor (train.compile_kernels): 5 steps within tolerance of
    eager; 3 steps then a resume to 5 equal, bitwise, to 5 steps in one go. The op runs its torch
    arithmetic here (DISTGAN_KERNELS=torch: the interpreter would take most of a minute); its Triton
    path under compile is tests/test_spectral_norm.py::test_torch_compile_has_no_graph_breaks."""
    monkeypatch.setenv("DISTGAN_KERNELS", "torch")
    extra = [f"train.compile_kernels={str(kernels_op).lower()}"]
    runs = {}
    for name, compiled, plan in (("eager", False, [5]), ("compiled", True, [5]), ("split", True, [3, 5])):
        for steps in plan:
            cfg = config.load_config(
                "digits-sngan",
                overrides=[*COMPILED, *extra, f"train.steps={steps}", f"train.compile={str(compiled).lower()}"],
            )
            assert trainer.train(cfg, tmp_path / name, resume="auto" if steps != plan[0] else None) == 0
        runs[name] = _final_models(tmp_path / name)
    for k, v in runs["eager"].items():
        if v.is_floating_point():
            torch.testing.assert_close(runs["compiled"][k], v, rtol=1e-3, atol=1e-4, msg=k)
        assert torch.equal(runs["split"][k], runs["compiled"][k]), k


def test_channels_last_trains_like_contiguous(tmp_path, monkeypatch):
    """train.channels_last: the same function in another memory layout (SN weights stay contiguous,
    so the kernels still read them): 4 steps within float tolerance of the default layout, with the
    models' other conv weights really in channels_last while they train."""
    out, layouts, settings = {}, {}, cluster.gpu_settings

    def recording(cfg, device, models):
        settings(cfg, device, models)
        layouts[cfg.train.channels_last] = [
            (name, p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous())
            for m in models
            for name, p in m.named_parameters()
            if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1
        ]

    monkeypatch.setattr(cluster, "gpu_settings", recording)
    for flag in ("false", "true"):
        cfg = config.load_config("digits-sngan", overrides=[*COMPILED, "train.steps=4", f"train.channels_last={flag}"])
        assert trainer.train(cfg, tmp_path / flag) == 0
        out[flag] = _final_models(tmp_path / flag)
    assert all(standard and not last for _, last, standard in layouts[False]), layouts[False]
    sn = [x for x in layouts[True] if "parametrizations" in x[0]]
    plain = [x for x in layouts[True] if "parametrizations" not in x[0]]
    assert sn and plain  # digits-sngan: SN in D, none in G
    assert all(last and not standard for _, last, standard in plain), plain
    assert all(standard for _, _, standard in sn), sn
    for k, v in out["false"].items():
        if v.is_floating_point():
            torch.testing.assert_close(out["true"][k], v, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow  # ~80 s of benchmark processes: `make test-all` (run it before a GPU is lent)
def test_gpu_suite_dry_run(tmp_path):
    """benchmarks/gpu_suite.sh --dry-run: every step of the GPU suite on the CPU at toy sizes, writing
    its tables (and the roofline plot) where DISTGAN_BENCH_RESULTS says."""
    import json
    import os
    import subprocess

    # the interpreter running these tests, whatever venv it lives in (the script's own default is .venv/bin/python)
    env = {**os.environ, "DISTGAN_BENCH_RESULTS": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    for stem in (
        "gpu_check",
        "bench_minibatch_l1",
        "bench_spectral_norm",
        "bench_spectral_norm_roofline",
        "gpu_steps",
        "gpu_sync",
        "penalty_cost",
        "grouped_conv",
        "gat_b2_steps",
    ):
        assert f"{stem}-cpu{os.cpu_count()}.json" in names, names
    assert any(n.endswith(".png") for n in names)
    checks = json.loads((tmp_path / f"gpu_check-cpu{os.cpu_count()}.json").read_text())["rows"]
    assert {c["check"] for c in checks} >= {"minibatch_l1", "spectral_norm weight", "spectral_norm output"}
    assert all(c["ok"] for c in checks)
    steps = json.loads((tmp_path / f"gpu_steps-cpu{os.cpu_count()}.json").read_text())["rows"]
    assert [s["mode"] for s in steps] == ["eager", "compile", "compile, inductor SN"]
    assert all(s["steps/s"] > 0 for s in steps)
    cost = json.loads((tmp_path / f"penalty_cost-cpu{os.cpu_count()}.json").read_text())["rows"]
    assert [(c["mode"], c["speed_vs_exact_eager"] > 0, c["peak_mb"] > 0) for c in cost] == [
        ("exact eager", True, True),
        ("lazy compiled", True, True),
    ]
