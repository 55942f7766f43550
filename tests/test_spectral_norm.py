"""kernels.spectral_norm (Triton under TRITON_INTERPRET=1, and the PyTorch fallback) against torch's
parametrization; kernels.spectral_norm_all (grouped) against per layer."""

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


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("kind", ["1x1", "3x5", "513x257", "conv", "convT"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_equals_torch(kind, dtype, backend):
    """Given the same W, u and v: u, v, the output and the gradients of W and of the input.

    bf16: ours runs the power iteration in fp32 (torch's in bf16), so the reference is torch's
    parametrization in fp32 on the same bf16-rounded weights and inputs, at bf16 tolerance."""
    base = layer(kind)
    ours = kernels.spectral_norm(copy.deepcopy(base), backend=backend).to(dtype)
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
    # Rounding is relative to the largest terms in play: dL/dW = G/sigma - c u v^T cancels terms up to
    # ~|x||y|/sigma (a 1x1 layer's dW is 0 up to the rounding of two such terms).
    sigma = (pt.original / theirs.weight).detach().abs().max().item()
    big_w = (x2.abs().max() * y2.abs().max()).item() / sigma
    for a, b, big in ((y1, y2, 0.0), (pu.original.grad, pt.original.grad, big_w), (x1.grad, x2.grad, 0.0)):
        scale = max(b.abs().max().item(), big, 1.0)
        torch.testing.assert_close(a.float() / scale, b / scale, **tol)


# the interpreted Triton case (23 s) in `make test-all`; its arithmetic is checked step by step above
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.slow), "torch"])
def test_sigma_converges_to_the_spectral_norm(backend):
    """A 200x130 weight whose top singular value is 1.5x the next: 60 iterations converge."""
    lin = nn.Linear(130, 200)
    g = torch.Generator().manual_seed(4)
    left, _ = torch.linalg.qr(torch.randn(200, 130, generator=g))
    right, _ = torch.linalg.qr(torch.randn(130, 130, generator=g))
    spectrum = torch.linspace(1.0, 0.01, 130)
    spectrum[0] = 1.5
    with torch.no_grad():
        lin.weight.copy_(left @ torch.diag(spectrum) @ right.T)
    lin = kernels.spectral_norm(lin, n_power_iterations=20, backend=backend)
    for _ in range(3):
        lin(torch.zeros(1, 130))
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


@pytest.mark.parametrize("kind", ["3x5", "convT"])
def test_several_power_iterations_per_step(kind):
    base = layer(kind)
    ours = kernels.spectral_norm(copy.deepcopy(base), n_power_iterations=3, backend="triton")
    theirs = parametrizations.spectral_norm(
        copy.deepcopy(base), n_power_iterations=3, dim=1 if kind == "convT" else None
    )
    theirs.load_state_dict(ours.state_dict())
    x = inputs(kind, torch.float32)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.parametrizations.weight[0]._v, theirs.parametrizations.weight[0]._v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_power_iteration_is_fp32_under_autocast(backend):
    """bf16 autocast (fp32 master weights): u, v, sigma as without autocast."""
    base = kernels.spectral_norm(layer("513x257"), backend=backend)
    plain, cast = copy.deepcopy(base), copy.deepcopy(base)
    x = inputs("513x257", torch.float32)
    plain(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast(x)
    for key in ("_u", "_v"):
        a, b = getattr(plain.parametrizations.weight[0], key), getattr(cast.parametrizations.weight[0], key)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(plain.weight, cast.weight, rtol=1e-6, atol=1e-7)


def discriminator(torch_sn=False, scale="weight"):
    """Every kind of layer in one D: conv, ConvTranspose (dim=1), and linear layers of odd sizes.
    With `torch_sn`, the same D with torch's spectral_norm; `scale` of the conv and linear layers
    (ConvTranspose keeps "weight", the only one it has)."""
    torch.manual_seed(0)
    D = nn.Sequential(
        nn.Conv2d(3, 16, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(16, 8, 3, 1, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 32, 4, 2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 130),
        nn.LeakyReLU(0.2),
        nn.Linear(130, 1),
    )
    for m in D:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if torch_sn:
                parametrizations.spectral_norm(m, dim=1 if isinstance(m, nn.ConvTranspose2d) else None)
            else:
                kernels.spectral_norm(
                    m, backend="triton", scale="weight" if isinstance(m, nn.ConvTranspose2d) else scale
                )
    return D


class CountLaunches:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def d_step(D, real, fake):
    """D on real, then on fake, then one backward: the GAN pattern."""
    loss = D(real).relu().mean() + (-D(fake)).relu().mean()
    loss.backward()
    return loss


def test_grouped_equals_per_layer_in_four_launches(monkeypatch):
    from kernels.spectral import triton as power_iteration

    counters = {}
    for name in ("_wv_kernel", "_wtu_kernel", "_reduce_kernel", "_scale_kernel"):
        counters[name] = CountLaunches(getattr(power_iteration, name))
        monkeypatch.setattr(power_iteration, name, counters[name])
    per_layer = discriminator()
    grouped = kernels.spectral_norm_all(copy.deepcopy(per_layer))
    theirs = discriminator(torch_sn=True)
    theirs.load_state_dict(per_layer.state_dict())
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)

    calls = lambda: sum(c.calls for c in counters.values())  # noqa: E731
    before = calls()
    d_step(grouped, real, fake)
    assert calls() - before == 2 * 4  # two forwards, 4 launches each, for the 5 layers
    before = calls()
    d_step(per_layer, real, fake)
    assert calls() - before == 2 * 4 * 5
    d_step(theirs, real, fake)

    for name, a in per_layer.state_dict().items():
        assert torch.equal(a, grouped.state_dict()[name]), name  # bitwise: the same arithmetic
        torch.testing.assert_close(a, theirs.state_dict()[name], rtol=1e-5, atol=1e-6)
    for (name, a), b, c in zip(per_layer.named_parameters(), grouped.parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad), name
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-4, atol=1e-6)
    # eval forwards use the stored vectors, never a stale grouped result
    grouped.eval()
    torch.testing.assert_close(grouped(real), per_layer.eval()(real), rtol=0, atol=0)


@pytest.mark.parametrize(
    "group, ops, scale",
    [(g, o, "weight") for g in (False, True) for o in (True, False)] + [(g, True, "output") for g in (False, True)],
)
def test_torch_compile_has_no_graph_breaks(group, ops, scale, monkeypatch):
    """Compiled, with the custom ops (kernels/spectral/op.py: the Triton kernels, one opaque op per layer) or
    with the traced fallback for Inductor (compile_ops=False): one graph, no breaks, and the eager
    outputs, gradients and u, v; also with scale="output", whose gradient reaches W through sigma."""
    from kernels import _backend

    monkeypatch.setattr(_backend, "compile_ops", ops)
    D = discriminator(scale=scale)
    if group:
        kernels.spectral_norm_all(D)
    ref = copy.deepcopy(D)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    explained = torch._dynamo.explain(copy.deepcopy(D))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    called = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("distgan.spectral_norm" in c for c in called) == (5 if ops else 0), called
    compiled = torch.compile(D, backend="aot_eager")
    y1, y2 = compiled(x), ref(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    for a, b in zip(D.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D[0].parametrizations.weight[0]._u, ref[0].parametrizations.weight[0]._u)


# -- the dtype contract of a drop-in (cases of PyTorch's test/nn/test_parametrization.py) ------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["3x5", "conv", "convT"])
def test_float64_weights_iterate_in_float64_and_pass_gradcheck(kind, backend):
    """PyTorch's test_new_spectral_norm gradchecks the parametrized layer in float64; a float32
    iteration fails it. backend="triton" too: float64 never reaches the kernels (they compute in
    fp32), whichever backend is asked for."""
    if backend == "triton":
        from kernels import aot

        with aot.record() as launches:
            for m in (layer(kind).double(), layer(kind)):  # float64 launches nothing; float32 does
                _ = kernels.spectral_norm(m, backend="triton").train().weight
        assert {x["args"]["w_proto"]["tensor"] for x in launches if "w_proto" in x["args"]} == {"float32"}, launches
    m = kernels.spectral_norm(layer(kind).double(), backend=backend)
    pu = m.parametrizations.weight[0]
    assert pu._u.dtype == pu._v.dtype == torch.float64
    x = inputs(kind, torch.float64).requires_grad_(True)
    m.eval()  # the stored vectors fixed: W / sigma(W) is then a function gradcheck can differentiate
    assert torch.autograd.gradcheck(lambda inp: m(inp), (x,), eps=1e-6, atol=1e-5)
    # training forwards: u, v and the output equal PyTorch's to float64 precision
    theirs = parametrizations.spectral_norm(layer(kind).double(), dim=1 if kind == "convT" else None)
    theirs.load_state_dict(m.state_dict())
    m.train()
    for _ in range(3):
        torch.testing.assert_close(m(x), theirs(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pu._u, theirs.parametrizations.weight[0]._u, rtol=1e-12, atol=1e-12)
    # sigma of the normalised weight is 1 (test_new_spectral_norm_value), from an SVD in float64
    with torch.no_grad():
        pu.power_iteration(m.parametrizations.weight.original, 3000)
    m.eval()
    assert torch.linalg.matrix_norm(reference_matrix(m, kind), ord=2).item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_models_grouped_by_spectral_norm_all_iterate_in_float64(backend):
    """distgan's models group their SN layers (models.apply_spectral_norm -> spectral_norm_all): float64
    weights there too give torch's float64 spectral norm, to 1e-12 (an fp32 iteration is ~1e-8 off)."""
    ours, theirs = discriminator().double(), discriminator(torch_sn=True).double()
    for m in ours.modules():
        if hasattr(m, "parametrizations"):
            m.parametrizations.weight[0].backend = backend
    theirs.load_state_dict(ours.state_dict())
    kernels.spectral_norm_all(ours)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def reference_matrix(m, kind):
    w = m.weight.detach()
    return (w.transpose(0, 1) if kind == "convT" else w).flatten(1)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_weights_are_refused_with_a_clear_error(dtype):
    with pytest.raises(TypeError, match="does not support complex weights .* conjugate transposes"):
        kernels.spectral_norm(nn.Linear(4, 3).to(dtype))
    with pytest.raises(TypeError, match="floating-point"):
        kernels.spectral_norm(_int_module())


def _int_module():
    m = nn.Module()
    m.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int64), requires_grad=False)
    return m


# -- scale="output": 1/sigma on the layer's output, W / sigma never written ---------------------------


@pytest.mark.parametrize("kind", ["3x5", "513x257", "conv"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_scale_is_the_same_layer(kind, backend):
    """op(x, W) / sigma + b against op(x, W / sigma) + b: outputs, u, v and the gradients of W, b and x,
    in training and in eval; the state dicts keep the same keys."""
    base = layer(kind)
    ref = kernels.spectral_norm(copy.deepcopy(base), backend=backend)
    out = kernels.spectral_norm(copy.deepcopy(base), backend=backend, scale="output")
    out.load_state_dict(ref.state_dict())  # the same u, v to start from
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(out, mode)()
        x1 = inputs(kind, torch.float32).requires_grad_(True)
        x2 = x1.detach().clone().requires_grad_(True)
        y1, y2 = ref(x1), out(x2)
        y1.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
        for a, b in zip(ref.state_dict().values(), out.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        for a, b in (
            (ref.parametrizations.weight.original.grad, out.parametrizations.weight.original.grad),
            (ref.bias.grad, out.bias.grad),
            (x1.grad, x2.grad),
        ):
            scale = max(a.abs().max().item(), 1.0)
            torch.testing.assert_close(b / scale, a / scale, rtol=1e-5, atol=1e-6)
        for p in (*ref.parameters(), *out.parameters()):
            p.grad = None


def test_output_scale_grouped_writes_no_weight(monkeypatch):
    """Grouped, scale="output": 4 launches per forward, the last one a program per layer (sigma and v:
    no W / sigma), and the same u, v, outputs and gradients as scale="weight", bitwise per layer vs grouped."""
    from kernels.spectral import triton as power_iteration

    grids = []
    original = power_iteration._scale_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid[0])
            return original[grid]

    monkeypatch.setattr(power_iteration, "_scale_kernel", Spy())

    def d(scale):
        torch.manual_seed(0)
        convs = [nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 4, 3)]
        net = nn.Sequential(
            *(kernels.spectral_norm(c, backend="triton", scale=scale) for c in convs),
            nn.Flatten(),
            kernels.spectral_norm(nn.Linear(4 * 2 * 2, 1), backend="triton", scale=scale),
        )
        return kernels.spectral_norm_all(net)

    ref, grouped, per_layer = d("weight"), d("output"), d("output")
    grouped.load_state_dict(ref.state_dict())
    per_layer.load_state_dict(ref.state_dict())
    per_layer._distgan_sn_owners = []  # each layer runs its own iteration
    real = torch.randn(2, 3, 11, 11, generator=torch.Generator().manual_seed(5))
    fake = real.flip(0)
    d_step(ref, real, fake)
    grids.clear()
    d_step(grouped, real, fake)
    assert grids == [1 * 4, 1 * 4]  # a program per layer, twice: sigma and v only
    d_step(per_layer, real, fake)
    for (name, a), b, c in zip(
        ref.state_dict().items(), grouped.state_dict().values(), per_layer.state_dict().values()
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(b, c), name
    for a, b, c in zip(ref.parameters(), grouped.parameters(), per_layer.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
        assert torch.equal(b.grad, c.grad)


def test_output_scale_is_refused_where_it_is_not_exact():
    with pytest.raises(ValueError, match="scale='output' applies to the weight of Linear and Conv"):
        kernels.spectral_norm(nn.ConvTranspose2d(4, 3, 3), scale="output")
    with pytest.raises(ValueError, match="scale must be"):
        kernels.spectral_norm(nn.Linear(3, 3), scale="input")


def test_large_layers_fill_the_chip():
    """Every pass over a 4096 x 4096 weight runs at least 4 x 132 programs (an H100/H200's SMs)."""
    from kernels.spectral import triton as power_iteration

    geo = power_iteration.layer_geometry(4096, 4096)
    assert geo["pass1"] >= 4 * 132 and geo["pass2"] >= 4 * 132 and geo["pass4"] >= 4 * 132, geo
