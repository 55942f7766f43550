"""kernels.spectral_norm (PyTorch implementation) against torch's parametrization."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import kernels


def layer(kind):
    torch.manual_seed(0)
    return {
        "1x1": lambda: nn.Linear(1, 1),
        "3x5": lambda: nn.Linear(5, 3),
        "513x257": lambda: nn.Linear(257, 513),
        "conv": lambda: nn.Conv2d(3, 64, 4),
        "convT": lambda: nn.ConvTranspose2d(64, 3, 4),
    }[kind]()


def inputs(kind, dtype):
    shape = {"1x1": (4, 1), "3x5": (4, 5), "513x257": (4, 257), "conv": (2, 3, 8, 8), "convT": (2, 64, 3, 3)}[kind]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("kind", ["1x1", "3x5", "513x257", "conv", "convT"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_equals_torch(kind, dtype):
    """Given the same W, u and v: u, v, the output and the gradients of W and of the input.

    bf16: ours runs the power iteration in fp32 (torch's in bf16), so the reference is torch's
    parametrization in fp32 on the same bf16-rounded weights and inputs, at bf16 tolerance."""
    base = layer(kind)
    ours = kernels.spectral_norm(copy.deepcopy(base)).to(dtype)
    theirs = parametrizations.spectral_norm(copy.deepcopy(base), dim=1 if kind == "convT" else None)
    theirs.load_state_dict(ours.float().to(dtype).state_dict())  # the same W, u, v, rounded to dtype
    x1 = inputs(kind, dtype).requires_grad_(True)
    x2 = x1.detach().float().requires_grad_(True)
    y1, y2 = ours(x1), theirs(x2)
    y1.float().square().sum().backward()
    y2.square().sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    pu, pt = ours.parametrizations.weight, theirs.parametrizations.weight
    torch.testing.assert_close(pu[0]._u.float(), pt[0]._u, **tol)
    torch.testing.assert_close(pu[0]._v.float(), pt[0]._v, **tol)
    # bf16 rounds relative to the largest terms in play: |dL/dW| has terms up to ~|x||y|/sigma
    # (a 1x1 layer's dW is 0 up to the rounding of two such terms).
    sigma = (pt.original / theirs.weight).detach().abs().max().item()
    big_w = (x2.abs().max() * y2.abs().max()).item() / sigma
    for a, b, big in ((y1, y2, 0.0), (pu.original.grad, pt.original.grad, big_w), (x1.grad, x2.grad, 0.0)):
        scale = max(b.abs().max().item(), big, 1.0) if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(a.float() / scale, b / scale, **tol)


def test_sigma_converges_to_the_spectral_norm():
    lin = kernels.spectral_norm(layer("513x257"))
    for _ in range(300):
        lin(torch.zeros(1, 257))
    w = lin.parametrizations.weight.original.detach()
    sigma = (w / lin.weight.detach()).mean()
    exact = torch.linalg.matrix_norm(w.double(), ord=2)
    assert abs(sigma.double() - exact) / exact < 1e-4


def test_eval_uses_stored_vectors():
    lin = kernels.spectral_norm(layer("3x5")).eval()
    u = lin.parametrizations.weight[0]._u.clone()
    lin(torch.randn(2, 5))
    assert torch.equal(u, lin.parametrizations.weight[0]._u)


@pytest.mark.parametrize("kind", ["3x5", "conv", "convT"])
def test_state_dict_round_trips_with_torch(kind):
    dim = 1 if kind == "convT" else None
    x = inputs(kind, torch.float32)
    trained_theirs = parametrizations.spectral_norm(layer(kind), dim=dim)
    trained_theirs(x)
    ours = kernels.spectral_norm(layer(kind))
    ours.load_state_dict(trained_theirs.state_dict())
    torch.testing.assert_close(ours.eval()(x), trained_theirs.eval()(x))
    trained_ours = kernels.spectral_norm(layer(kind))
    trained_ours(x)
    theirs = parametrizations.spectral_norm(layer(kind), dim=dim)
    theirs.load_state_dict(trained_ours.state_dict())
    torch.testing.assert_close(theirs.eval()(x), trained_ours.eval()(x))


def test_spectral_norm_config_wraps_every_layer():
    from distgan import config, models

    cfg = config.load_config("digits-sngan")
    D = models.build_discriminator(cfg)
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
