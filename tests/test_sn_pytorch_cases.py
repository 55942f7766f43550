"""PyTorch's own cases for its spectral-norm parametrization (test/nn/test_parametrization.py:
test_new_spectral_norm, _load_state_dict, _dim, _forward and _value), rewritten against
kernels.spectral_norm and run on both backends: the Triton kernels (under TRITON_INTERPRET=1) and
the PyTorch fallback. float64 cases iterate in float64 on either backend, as PyTorch's does (the
kernels accumulate in fp32), so the float32 repeats of the behavioural checks are what runs the
kernels. Complex weights are refused, where PyTorch's handles them: see test_spectral_norm.py."""

import copy
import os

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.nn.utils import parametrize

import kernels

BACKENDS = [
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run on the CPU under the interpreter"
        ),
    ),
    "torch",
]


def sn(module, backend, name="weight"):
    return kernels.spectral_norm(module, name, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_structure_removal_and_stacking(backend):
    torch.manual_seed(0)
    m = sn(nn.Linear(5, 7).double(), backend)
    plist = m.parametrizations.weight
    assert plist[0]._u.shape == (7,)
    assert "original" in plist._parameters  # trainable
    assert "_u" in plist[0]._buffers and "_v" in plist[0]._buffers
    assert m.weight is not None and "weight" not in m._buffers and "weight" not in m._parameters
    assert plist.original.shape == m.weight.shape and plist.original.stride() == m.weight.stride()
    m = parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations") and "weight" in m._parameters
    # twice on one parameter, and once on another
    m = sn(sn(m, backend), backend)
    m = sn(m, backend, "bias")
    m = parametrize.remove_parametrizations(m, "bias")
    assert "bias" in m._parameters and hasattr(m, "parametrizations") and "weight" not in m._parameters
    m = parametrize.remove_parametrizations(m, "weight")
    assert not parametrize.is_parametrized(m) and "weight" in m._parameters


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_and_eval_behaviour(backend, requires_grad, dtype):
    """u, v move in training and not in eval; eval repeats the last training output; gradients reach
    the original weight, also through two forwards and through mixed training/eval forwards
    (gradcheck in float64, with u, v reset before each evaluation as PyTorch's test does)."""
    torch.manual_seed(1)

    def make():
        m = nn.Linear(3, 4).to(dtype)
        m.weight.requires_grad_(requires_grad)
        m = sn(m, backend)
        return m, m.parametrizations.weight[0]

    x = torch.randn(2, 3, dtype=dtype)
    m, s = make()
    u0, v0 = s._u.clone(), s._v.clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    m(x).sum().backward()
    opt.step()
    out = m(x)
    if requires_grad:
        assert not torch.equal(u0, s._u) and not torch.equal(v0, s._v)
        (g,) = torch.autograd.grad(out.sum(), m.parametrizations.weight.original)
        assert torch.isfinite(g).all()

    saved_u, saved_v = s._u.clone(), s._v.clone()

    def twice(inp):
        s._u.data.copy_(saved_u)
        s._v.data.copy_(saved_v)
        return m(inp) + m(inp)

    twice(x.clone().requires_grad_()).sum().backward()
    if dtype == torch.float64:
        assert gradcheck(twice, (x.clone().requires_grad_(),), check_batched_grad=False)

    # removing the parametrization in eval keeps the function (no further power iteration)
    for forwards in (1, 3):
        m, _ = make()
        for _ in range(forwards):
            before = m(x).detach()
        m.eval()
        m = parametrize.remove_parametrizations(m, "weight")
        torch.testing.assert_close(m(x), before)  # (PyTorch's default tolerance, as its test)

    m, s = make()
    m(x)
    last = m(x).detach()
    last_u, last_v = s._u.clone(), s._v.clone()
    m.eval()
    torch.testing.assert_close(m(x), last)
    torch.testing.assert_close(m(x), last)
    assert torch.equal(s._u, last_u) and torch.equal(s._v, last_v)
    if dtype != torch.float64:
        return
    saved_u, saved_v = s._u.clone(), s._v.clone()

    def mixed(inp):
        s._u.data.copy_(saved_u)
        s._v.data.copy_(saved_v)
        outs = []
        for mode in ("train", "eval", "train", "eval"):
            getattr(m, mode)()
            outs.append(m(inp))
        return sum(outs)

    assert gradcheck(mixed, (x.clone().requires_grad_(),))
    if requires_grad:
        assert gradcheck(lambda w: m(x), (m.parametrizations.weight.original,))


@pytest.mark.parametrize("forwards", [0, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict(backend, forwards):
    torch.manual_seed(2)
    x = torch.randn(2, 3)
    m = sn(nn.Linear(3, 5), backend).train()
    for _ in range(forwards):
        m(x)
    state = copy.deepcopy(m.state_dict())
    assert set(state) == {
        "parametrizations.weight.original",
        "bias",
        "parametrizations.weight.0._u",
        "parametrizations.weight.0._v",
    }
    loose = copy.deepcopy(state)
    loose["nonsense"] = "nonsense"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
        m.load_state_dict(loose, strict=True)
    m.load_state_dict(loose, strict=False)
    for key in ("parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v"):
        del loose[key]
        m.load_state_dict(loose, strict=False)
    loose["weight"] = m.weight.detach().clone()
    m.load_state_dict(loose, strict=False)
    del loose._metadata["parametrizations.weight.0"]
    m.load_state_dict(loose, strict=False)
    del loose["weight"], loose["bias"]
    m.load_state_dict(loose, strict=False)

    def outputs(module):
        with torch.no_grad():
            seq = []
            for mode in ("eval", "train", "train", "eval"):
                getattr(module, mode)()
                seq.append(module(x))
            return seq

    m = sn(parametrize.remove_parametrizations(m, "weight"), backend)  # re-wrapping does not matter
    m.load_state_dict(state)
    first = outputs(m)
    m = sn(parametrize.remove_parametrizations(m, "weight"), backend)
    m.load_state_dict(state)
    for a, b in zip(outputs(m), first):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dim_of_a_transposed_convolution(backend):
    m = sn(nn.ConvTranspose2d(3, 4, (5, 6)), backend)
    m(torch.randn(2, 3, 10, 12))  # no shape mismatch
    assert m.parametrizations.weight[0]._u.shape == m.parametrizations.weight.original[0, :, 0, 0].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_is_one_power_iteration_then_w_over_sigma(backend):
    torch.manual_seed(3)
    x = torch.randn(3, 5)
    m = sn(nn.Linear(5, 7), backend)
    w = m.parametrizations.weight.original.detach().clone()
    v = m.parametrizations.weight[0]._v.clone()
    u = nn.functional.normalize(w @ v, dim=0, eps=1e-12)
    v = nn.functional.normalize(w.t() @ u, dim=0, eps=1e-12)
    expected = nn.functional.linear(x, w / torch.dot(u, w @ v), m.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_on_a_diagonal_matrix(backend):
    """sigma of a diagonal matrix is its largest |entry|: W / sigma = diag(x / max |x|)."""
    m = nn.Linear(2, 2)
    with torch.no_grad():
        x = torch.diagonal(m.weight).clone()
        m.weight = nn.Parameter(torch.diag(x))
        sn(m, backend)
        torch.testing.assert_close(m.weight, torch.diag(x / x.abs().max()))
