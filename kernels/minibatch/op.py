"""Minibatch discrimination as PyTorch custom ops (forward and backward), for torch.compile: one opaque
op each, with fake-tensor implementations; the Triton kernels where `_backend.choose` picks Triton, else
the reference. Called only while compiling with `_backend.compile_ops` on (train.compile_kernels).
"""

from __future__ import annotations

import torch

from kernels import _backend
from kernels.minibatch import reference


def _use_triton(m: torch.Tensor) -> bool:
    return _backend.choose("minibatch_discrimination", None, m) == "triton"


@torch.library.custom_op("distgan::minibatch_l1", mutates_args=())
def minibatch_l1_op(m: torch.Tensor, exclude_self: bool, group_size: int) -> torch.Tensor:
    group = group_size or None
    if _use_triton(m):
        from kernels.minibatch import triton as minibatch_l1

        return minibatch_l1.minibatch_l1_forward(m, exclude_self, group)
    with torch.no_grad():
        return reference.minibatch_l1(m, exclude_self, group).clone()


@minibatch_l1_op.register_fake
def _(m, exclude_self, group_size):
    return m.new_empty(m.shape[:2])


@torch.library.custom_op("distgan::minibatch_l1_backward", mutates_args=())
def minibatch_l1_backward_op(m: torch.Tensor, grad: torch.Tensor, group_size: int) -> torch.Tensor:
    group = group_size or None
    if _use_triton(m):
        from kernels.minibatch import triton as minibatch_l1

        return minibatch_l1.minibatch_l1_backward(m, grad, group)
    return reference.minibatch_l1_backward(m, grad, group, reference.DEFAULT_MEMORY_BUDGET)


@minibatch_l1_backward_op.register_fake
def _(m, grad, group_size):
    return torch.empty_like(m)


def _mb_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.group_size = inputs[2]


def _mb_backward(ctx, grad):
    (m,) = ctx.saved_tensors
    return minibatch_l1_backward_op(m, grad.contiguous(), ctx.group_size), None, None


minibatch_l1_op.register_autograd(_mb_backward, setup_context=_mb_setup)


def minibatch_discrimination(m: torch.Tensor, exclude_self: bool, group_size: int | None) -> torch.Tensor:
    return minibatch_l1_op(m, exclude_self, group_size or 0)
