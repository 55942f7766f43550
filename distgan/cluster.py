"""The processes of a run and the device they drive: the Accelerator and its settings (TF32,
channels_last, compile), BatchNorm buffers averaged over ranks, the stop signal every rank agrees on,
and what a rank says when it loses the others.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from distgan import checkpoint, config
from distgan.errors import RunFailed, UserError


def make_accelerator(cfg: config.Config, with_wandb: bool):
    from datetime import timedelta

    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    precision = cfg.train.mixed_precision
    try:
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision=None if precision == "auto" else precision,
            log_with="wandb" if with_wandb else None,
            # No buffer broadcast at every forward: BatchNorm stats are averaged once per step
            # (average_buffers) and spectral norm's u, v are identical on every rank by construction.
            # Broadcasting in place would also break a D called on real and then fake before backward.
            kwargs_handlers=[
                DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist.timeout_s)),
            ],
        )
    except (ValueError, RuntimeError) as exc:
        raise UserError(
            f"cannot set up Accelerate with train.mixed_precision={cfg.train.mixed_precision}: {exc}"
        ) from None
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        release(accelerator.num_processes)
        raise UserError(
            "fp16 mixed precision needs a GPU: on the CPU Accelerate applies neither fp16 autocast nor a gradient "
            "scaler, so the run would silently be fp32. Use train.mixed_precision=bf16 (or no) on the CPU"
        )
    return accelerator


def release(world: int) -> None:
    """Let a later train() in this process build a fresh Accelerator (single-process runs only)."""
    if world == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def gpu_settings(cfg: config.Config, device: torch.device, models) -> None:
    """train.tf32, train.channels_last and train.compile, applied to the models in place (their
    state-dict keys do not change, so checkpoints are the same with and without them)."""
    t = cfg.train
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    if t.channels_last:
        for m in models:
            m.to(memory_format=torch.channels_last)
            for sub in m.modules():  # the spectral-norm kernels read W in its standard layout
                for plist in getattr(sub, "parametrizations", {}).values():
                    plist.original.data = plist.original.data.contiguous()
    if t.compile:  # (config.validate refuses the variants torch.compile cannot train)
        from kernels import _backend

        _backend.compile_ops = t.compile_kernels
        for m in models:
            m.compile()


def channels_last(batch: dict) -> dict:
    """train.channels_last: the batch's image tensors (N, C, H, W) in channels_last memory format."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in batch.items()}


@torch.no_grad()
def average_buffers(modules: list[torch.nn.Module], world: int) -> None:
    """Average floating-point buffers (BatchNorm running stats) over ranks, once per step.

    DDP keeps parameters identical but each rank updates its buffers from its own batch (and D's
    again in the G step, which runs outside DDP), so without this they would drift apart (DDP's
    own buffer broadcast is off). One all-reduce for all of them keeps every rank's model identical.
    Spectral norm's u, v are left out: they are a deterministic function of the (identical)
    weights and their own previous values, so they are already identical on every rank."""
    from kernels.spectral.reference import SpectralNorm

    buffers = [
        b
        for m in modules
        for sub in m.modules()
        if not isinstance(sub, SpectralNorm)
        for b in sub.buffers(recurse=False)
        if b.is_floating_point()
    ]
    if world == 1 or not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(
        buffers, [v.view_as(b).to(b.dtype) for v, b in zip(flat.split([b.numel() for b in buffers]), buffers)]
    )


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and stops.
    A second SIGINT stops at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agree_to_stop(signum: int, device, world: int) -> int:
    """Every rank stops at the same step: the largest signal number seen by any rank."""
    if world == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def comm_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because a peer is gone or stuck (gloo and NCCL)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out"))


def lost_contact(exc: BaseException, run) -> None:
    # The launcher SIGTERMs the survivors when it sees a rank die: finish saying why first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    steps = checkpoint.list_steps(run.run_dir)
    last = f"'{steps[-1]}' is intact" if steps else "none was written yet"
    raise RunFailed(
        f"rank {run.rank}: lost contact with the other ranks during step {run.step + 1} "
        f"({str(exc).strip().splitlines()[0][:200]}). Another rank died (see the launcher's summary), "
        f"hung for longer than dist.timeout_s={run.cfg.dist.timeout_s}, or the network failed. The newest "
        f"checkpoint, {last}; continue with --resume auto once every rank can run."
    ) from None


class _Counter:
    def __init__(self):
        self.n = 0

    def pop(self) -> int:
        n, self.n = self.n, 0
        return n


def count_allreduces(models) -> _Counter:
    """Count DDP's gradient all-reduces (one per bucket), through a comm hook that then runs the
    standard averaging all-reduce; logged as dist/grad_allreduces_per_step, so anyone can see that
    accumulation micro-batches add none."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    counter = _Counter()

    def hook(state, bucket):
        counter.n += 1
        return default_hooks.allreduce_hook(state, bucket)

    for m in models:
        if isinstance(m, DistributedDataParallel):
            m.register_comm_hook(None, hook)
    return counter
