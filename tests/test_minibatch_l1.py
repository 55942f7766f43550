"""kernels.minibatch_discrimination: Triton (under TRITON_INTERPRET=1) and the chunked fallback
against the float64 naive reference, forward, backward and double backward."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels.minibatch import reference

# Only the Triton tests need the interpreter on a CPU; the fallback's run without it.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (make test sets it)"
)

# (rtol, atol as a fraction of the largest |reference| value) per dtype. The inputs are rounded to
# the dtype before the float64 reference sees them, so what is left is fp32 accumulation and the
# rounding of the output (bf16: 8 bits, fp16: 11 bits) and of the incoming gradient.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 8e-3),
    torch.float16: (2e-3, 1e-3),
}


def make(b, o, k, dtype=torch.float32, seed=0, scale=None, noncontiguous=False):
    """M with every pair term exp(-|M_i - M_j|_1) near exp(-1): entries of std 1/K make the expected
    L1 distance over K components 2/sqrt(pi) ~ 1.1, so no term is negligible at any K."""
    scale = 1.0 / k if scale is None else scale
    gen = torch.Generator().manual_seed(seed)
    if noncontiguous:  # (B, K, O) storage, viewed as (B, O, K): strides (O*K, 1, O)
        m = (torch.randn(b, k, o, generator=gen, dtype=torch.float64) * scale).to(dtype).transpose(1, 2)
        assert not m.is_contiguous()
    else:
        m = (torch.randn(b, o, k, generator=gen, dtype=torch.float64) * scale).to(dtype)
    g = torch.randn(b, o, generator=gen, dtype=torch.float64)
    return m, g


def check(b, o, k, dtype=torch.float32, exclude_self=True, group_size=None, noncontiguous=False, backend="triton"):
    m, g = make(b, o, k, dtype, noncontiguous=noncontiguous)
    ref_in = m.detach().to(torch.float64).requires_grad_(True)
    ref = reference.minibatch_l1_naive(ref_in, exclude_self, group_size)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, g)
    x = m.detach().clone().requires_grad_(True)
    if noncontiguous:
        x = m.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    out = kernels.minibatch_discrimination(x, exclude_self=exclude_self, group_size=group_size, backend=backend)
    assert out.dtype == dtype and out.shape == (b, o)
    (grad,) = torch.autograd.grad(out, x, g.to(dtype))
    assert grad.dtype == dtype and grad.shape == (b, o, k)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        out.double(), ref, rtol=rtol, atol=atol * float(ref.detach().abs().max().clamp(min=1e-30))
    )
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=rtol, atol=atol * float(ref_grad.detach().abs().max().clamp(min=1e-30))
    )


# Every B, O and K of the issue appears; the product is trimmed to keep the interpreter fast.
SHAPES = [(b, o, k) for b in (1, 2, 3, 17) for o in (1, 5) for k in (1, 5, 16, 50)]
SHAPES += [(100, 5, 16), (257, 1, 1), (257, 1, 16)]
# the big ones take 15-55 s each under the interpreter on 2 cores: in `make test-all`
SHAPES += [pytest.param(*s, marks=pytest.mark.slow) for s in ((100, 100, 5), (257, 5, 50), (17, 100, 50))]


@pytest.mark.parametrize("b,o,k", SHAPES)
@needs_interpreter
def test_triton_matches_reference(b, o, k):
    check(b, o, k)


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("group_size", [None, 1, 4, 7, 64])
@needs_interpreter
def test_triton_exclude_self_and_groups(exclude_self, group_size):
    check(37, 3, 5, exclude_self=exclude_self, group_size=group_size)


@pytest.mark.parametrize("b,o,k", [(17, 5, 5), (100, 3, 16)])
@needs_interpreter
def test_triton_noncontiguous_input(b, o, k):
    check(b, o, k, noncontiguous=True, group_size=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@needs_interpreter
def test_triton_dtypes(dtype):
    check(33, 4, 16, dtype=dtype, group_size=11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("exclude_self,group_size", [(True, None), (False, 6)])
def test_fallback_matches_reference(dtype, exclude_self, group_size):
    check(29, 6, 7, dtype=dtype, exclude_self=exclude_self, group_size=group_size, backend="torch")


def test_fallback_blocks_cover_every_pair():
    """A budget so small that every block is 1 x 1 rows gives the same result."""
    m, g = make(23, 3, 4, torch.float64)
    x = m.clone().requires_grad_(True)
    tiny = reference.minibatch_l1(x, True, 5, memory_budget=1)
    full = reference.minibatch_l1_naive(m, True, 5)
    torch.testing.assert_close(tiny, full)
    (gt,) = torch.autograd.grad(tiny, x, g)
    y = m.clone().requires_grad_(True)
    (gf,) = torch.autograd.grad(reference.minibatch_l1_naive(y, True, 5), y, g)
    torch.testing.assert_close(gt, gf)


@needs_interpreter
def test_every_output_element_written():
    """Output buffers poisoned with NaN: the kernels must overwrite every element."""
    from kernels.minibatch import triton as minibatch_l1

    m, g = make(45, 3, 7)
    m, g = m.float(), g.float()
    out = torch.full((45, 3), float("nan"))
    dm = torch.full((45, 3, 7), float("nan"))
    minibatch_l1.minibatch_l1_forward(m, True, 10, out=out)
    minibatch_l1.minibatch_l1_backward(m, g, 10, out=dm)
    assert torch.isfinite(out).all() and torch.isfinite(dm).all()
    torch.testing.assert_close(out.double(), reference.minibatch_l1_naive(m.double(), True, 10), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_double_backward_gradient_penalty(backend):
    """A WGAN-GP style penalty through a layer with this op matches the float64 reference."""
    from distgan.models.layers import MinibatchDiscrimination

    torch.manual_seed(0)
    layer = MinibatchDiscrimination(6, num_kernels=4, kernel_dim=3, backend=backend)
    head = torch.nn.Linear(10, 1)
    x = torch.randn(9, 6)

    def penalty(dtype, use_backend):
        lay = MinibatchDiscrimination(6, num_kernels=4, kernel_dim=3, backend=use_backend).to(dtype)
        lay.load_state_dict(layer.state_dict())
        h = torch.nn.Linear(10, 1).to(dtype)
        h.load_state_dict(head.state_dict())
        xi = x.to(dtype).requires_grad_(True)
        out = h(lay(xi)).sum()
        (gx,) = torch.autograd.grad(out, xi, create_graph=True)
        gp = (gx.norm(dim=1) - 1).pow(2).mean()
        return torch.autograd.grad(gp, lay.T)[0]

    if backend == "triton":
        ref = penalty(torch.float64, "torch")
        got = penalty(torch.float32, "triton")
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    else:
        x64 = x.double().requires_grad_(True)
        T = layer.T.detach().double().requires_grad_(True)

        def naive_d(xi):
            m = (xi @ T).view(len(xi), 4, 3)
            feats = torch.cat([xi, reference.minibatch_l1_naive(m)], 1)
            return torch.nn.functional.linear(feats, head.weight.double(), head.bias.double()).sum()

        (gx,) = torch.autograd.grad(naive_d(x64), x64, create_graph=True)
        gp = (gx.norm(dim=1) - 1).pow(2).mean()
        (want,) = torch.autograd.grad(gp, T)
        torch.testing.assert_close(penalty(torch.float64, "torch"), want)


@needs_interpreter
def test_backend_choice_and_warning(monkeypatch):
    from kernels import _backend

    m = torch.randn(4, 2, 3)
    assert _backend.choose("x", "torch", m) == "torch"
    assert _backend.choose("x", None, m) == "triton"  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.choose("x", None, m) == "torch"
    monkeypatch.setenv("DISTGAN_KERNELS", "torch")
    assert _backend.choose("x", None, m) == "torch"
    monkeypatch.delenv("DISTGAN_KERNELS")
    _backend._warned.discard("y")
    with pytest.warns(UserWarning, match="Triton requested"):
        assert _backend.choose("y", "triton", m) == "torch"
    with pytest.raises(ValueError):
        _backend.choose("x", "cuda", m)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, O, K\)"):
        kernels.minibatch_discrimination(torch.randn(3, 4))
    with pytest.raises(ValueError, match="group_size"):
        kernels.minibatch_discrimination(torch.randn(3, 4, 2), group_size=0)


@pytest.mark.slow  # ~50 s: in `make test-all`
def test_fallback_memory_stays_within_budget():
    """B=4096, O=128, K=16 forward + backward on the fallback: peak RSS growth over the inputs and
    outputs stays under the 256 MB budget (the naive version would need > 130 GB)."""
    code = textwrap.dedent(
        """
        import resource, torch
        from kernels.minibatch import reference
        torch.manual_seed(0)
        b, o, k = 4096, 128, 16
        m = (torch.randn(b, o, k) * 0.3).requires_grad_(True)
        g = torch.randn(b, o)
        warm = reference.minibatch_l1(m[:64].detach().clone().requires_grad_(True))  # load kernels
        dm_buf = torch.empty(b, o, k); dm_buf.fill_(0); out_buf = torch.empty(b, o); out_buf.fill_(0)
        del dm_buf, out_buf
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = reference.minibatch_l1(m)
        (dm,) = torch.autograd.grad(out, m, g)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - base, b * o * k * 4 + b * o * 4)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    grown, outputs = map(int, r.stdout.split())
    assert grown - outputs <= reference.DEFAULT_MEMORY_BUDGET, (grown, outputs)


@pytest.mark.parametrize("ops", [True, False])
def test_torch_compile_calls_the_custom_op_without_graph_breaks(ops, monkeypatch):
    """Under torch.compile, minibatch discrimination is one `distgan::minibatch_l1` op (its backward
    the registered `distgan::minibatch_l1_backward`), or the traced fallback with compile_ops off:
    one graph, no breaks, and eager's output and gradients."""
    from kernels import _backend

    monkeypatch.setattr(_backend, "compile_ops", ops)
    g = torch.Generator().manual_seed(7)
    m = torch.randn(12, 4, 5, generator=g)

    def f(x):
        return kernels.minibatch_discrimination(x, group_size=6)

    explained = torch._dynamo.explain(f)(m)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    called = [str(n.target) for gr in explained.graphs for n in gr.graph.nodes if n.op == "call_function"]
    assert sum("distgan.minibatch_l1" in c for c in called) == (1 if ops else 0), called
    x1, x2 = m.clone().requires_grad_(True), m.clone().requires_grad_(True)
    y1, y2 = torch.compile(f, backend="aot_eager")(x1), f(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    w = torch.randn(y1.shape, generator=g)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
