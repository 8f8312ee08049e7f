"""Beyond one backward: double backward (create_graph) and torch.func transforms, against torch.nn in float64."""

import pytest
import torch
import torch.nn.functional as F

import normzoo.functional as NF

D = torch.float64
rm, rv = torch.rand(6, dtype=D), torch.rand(6, dtype=D) + 0.5

# (normzoo, torch reference, input shape); both take (x, weight, bias)
FAMILIES = {
    "group_norm": (lambda x, w, b, c: NF.group_norm(x, 3, w, b, compile=c), lambda x, w, b: F.group_norm(x, 3, w, b),
                   (2, 6, 3, 4)),
    "group_norm_silu": (lambda x, w, b, c: NF.group_norm(x, 2, w, b, activation="silu", compile=c),
                        lambda x, w, b: F.silu(F.group_norm(x, 2, w, b)), (2, 6, 3)),
    "instance_norm": (lambda x, w, b, c: NF.instance_norm(x, None, None, w, b, compile=c),
                      lambda x, w, b: F.instance_norm(x, None, None, w, b), (2, 6, 5)),
    "batch_norm": (lambda x, w, b, c: NF.batch_norm(x, None, None, w, b, True, compile=c),
                   lambda x, w, b: F.batch_norm(x, None, None, w, b, True), (3, 6, 4)),
    "batch_norm_eval": (lambda x, w, b, c: NF.batch_norm(x, rm, rv, w, b, False, compile=c),
                        lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False), (3, 6, 4)),
    "layer_norm": (lambda x, w, b, c: NF.layer_norm(x, (6,), w, b, compile=c),
                   lambda x, w, b: F.layer_norm(x, (6,), w, b), (3, 4, 6)),
}


def _inputs(shape):
    x = (torch.randn(*shape, dtype=D) * 2 + 3).requires_grad_()
    w = (torch.rand(6, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=D).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradgradcheck_eager(name):
    f, _, shape = FAMILIES[name]
    assert torch.autograd.gradgradcheck(lambda x, w, b: f(x, w, b, False), _inputs(shape), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_second_derivative_matches_torch(name, compile):
    # d/dx |d/dx sum(y^3)|^2: the number the issue found off by 54 to 1020
    f, ref, shape = FAMILIES[name]
    x, w, b = _inputs(shape)
    results = []
    for fn in (lambda x, w, b: f(x, w, b, compile), ref):
        (gx,) = torch.autograd.grad(fn(x, w, b).pow(3).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (x, w, b)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn", ["vmap", "grad", "jacrev", "jvp"])
@pytest.mark.parametrize("name", ["group_norm", "layer_norm", "batch_norm_eval"])
def test_torch_func_matches_torch(fn, name):
    f, ref, shape = FAMILIES[name]
    x, w, b = (t.detach() for t in _inputs(shape))
    for compile in (False, True):
        ours = lambda x: f(x, w, b, compile)  # noqa: E731
        if fn == "vmap":  # per-sample calls over a leading batch of inputs
            xs = torch.stack([x, x * 2 + 1])
            got, want = torch.func.vmap(ours)(xs), torch.func.vmap(lambda x: ref(x, w, b))(xs)
        elif fn == "grad":
            got = torch.func.grad(lambda x: ours(x).pow(3).sum())(x)
            want = torch.func.grad(lambda x: ref(x, w, b).pow(3).sum())(x)
        elif fn == "jacrev":
            got, want = torch.func.jacrev(ours)(x), torch.func.jacrev(lambda x: ref(x, w, b))(x)
        else:
            v = torch.randn_like(x)
            got, want = torch.func.jvp(ours, (x,), (v,)), torch.func.jvp(lambda x: ref(x, w, b), (x,), (v,))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_mode_ad_matches_torch(name):
    """torch.autograd.forward_ad: tangents of x, weight and bias at once, through the engine's differentiable ops
    whether or not the call would take compiled kernels (no custom autograd.Function has a forward derivative)."""
    import torch.autograd.forward_ad as fwAD

    f, ref, shape = FAMILIES[name]
    primals = [t.detach() for t in _inputs(shape)]
    tangents = [torch.randn_like(t) for t in primals]
    results = []
    for fn in (lambda x, w, b: f(x, w, b, False), lambda x, w, b: f(x, w, b, True), ref):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))))
            results.append((out.primal, out.tangent))
    for got in results[:2]:
        torch.testing.assert_close(got, results[2], rtol=1e-9, atol=1e-9)


def test_first_derivative_after_double_backward_setup_is_unchanged():
    """create_graph=False keeps the compiled backward kernel; its answer matches the differentiable route's."""
    f, _, shape = FAMILIES["group_norm"]
    x, w, b = _inputs(shape)
    fast = torch.autograd.grad(f(x, w, b, True).pow(3).sum(), (x, w, b))
    slow = torch.autograd.grad(f(x, w, b, True).pow(3).sum(), (x, w, b), create_graph=True)
    for a, c in zip(fast, slow):
        torch.testing.assert_close(a, c.detach(), rtol=1e-10, atol=1e-10)
