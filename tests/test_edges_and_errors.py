"""torch's own edge cases, and bad input getting clear errors."""

import math

import pytest
import torch
from torch import nn

import normzoo
import normzoo.functional as NF


def _oracle_group_norm(x, G, eps):
    xd = x.double().reshape(x.shape[0], G, -1)
    m = xd.mean(-1, keepdim=True)
    v = ((xd - m) ** 2).mean(-1, keepdim=True)
    return ((xd - m) / torch.sqrt(v + eps)).reshape(x.shape)


@pytest.mark.parametrize("compile", [False, True])
def test_empty_batch_behaves_as_torch(compile):
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    for z, t in [(normzoo.GroupNorm(2, 4, compile=compile), nn.GroupNorm(2, 4)),
                 (normzoo.BatchNorm2d(4, compile=compile), nn.BatchNorm2d(4)),
                 (normzoo.InstanceNorm2d(4, affine=True, compile=compile), None)]:
        y = z(x)
        assert y.shape == x.shape
        if t is not None:
            assert t(x).shape == x.shape
        y.sum().backward()
        assert z.weight.grad is not None and torch.equal(z.weight.grad, torch.zeros(4))
    with pytest.raises(IndexError):  # torch's InstanceNorm fails on an empty batch; normzoo returns it empty
        nn.InstanceNorm2d(4, affine=True)(x)
    bn, tbn = normzoo.BatchNorm2d(4, compile=compile), nn.BatchNorm2d(4)
    bn(x), tbn(x)
    for a, b in zip(bn.buffers(), tbn.buffers()):
        assert torch.equal(a, b)  # running stats untouched, num_batches_tracked counted
    assert normzoo.LayerNorm(4, compile=compile)(torch.randn(0, 4)).shape == (0, 4)


EMPTY_CASES = {  # name -> (function name, input shape, args after the input, kwargs)
    "bn 1-D (0,) train": ("batch_norm", (0,), lambda C: (torch.zeros(C), torch.ones(C)), dict(training=True)),
    "bn 1-D (0,) eval": ("batch_norm", (0,), lambda C: (torch.zeros(C), torch.ones(C)), dict(training=False)),
    "bn 1-D (0,) no stats": ("batch_norm", (0,), lambda C: (None, None), dict(training=True)),
    "bn (0, C) train": ("batch_norm", (0, 4), lambda C: (torch.zeros(C), torch.ones(C)), dict(training=True)),
    "bn (0, C, L) eval": ("batch_norm", (0, 4, 5), lambda C: (torch.zeros(C), torch.ones(C)), {}),
    "bn (N, C, 0) train": ("batch_norm", (2, 4, 0), lambda C: (torch.zeros(C), torch.ones(C)), dict(training=True)),
    "bn (N, 0) train": ("batch_norm", (2, 0), lambda C: (None, None), dict(training=True)),
    "bn (N, 0, L) eval": ("batch_norm", (2, 0, 3), lambda C: (torch.zeros(0), torch.ones(0)), {}),
    "gn (0, C, H, W)": ("group_norm", (0, 4, 3, 3), lambda C: (2,), {}),
    "gn (0, C)": ("group_norm", (0, 4), lambda C: (2,), {}),
    "gn (N, C, 0)": ("group_norm", (2, 4, 0), lambda C: (2,), {}),
    "gn (N, 0, L)": ("group_norm", (2, 0, 3), lambda C: (1,), {}),
    "ln (0, D)": ("layer_norm", (0, 4), lambda C: ((4,),), {}),
    "ln (0, L, D)": ("layer_norm", (0, 3, 4), lambda C: ((4,),), {}),
    "ln (N, 0)": ("layer_norm", (2, 0), lambda C: ((0,),), {}),
    "in (N, C, 0)": ("instance_norm", (2, 4, 0), lambda C: (), {}),
    "in (N, 0, L)": ("instance_norm", (2, 0, 3), lambda C: (), {}),
}


@pytest.mark.parametrize("case, weighted", [
    (case, weighted) for case, (fn, shape, _, _) in EMPTY_CASES.items() for weighted in (False, True)
    # layer_norm's affine has normalized_shape; torch refuses an empty weight when C = 0
    if not (weighted and (fn == "layer_norm" or (len(shape) > 1 and shape[1] == 0)))])
def test_empty_inputs_of_each_functional_as_torch(case, weighted):
    """Every empty input torch.nn.functional answers with an empty tensor gets the same shape and dtype from
    normzoo, with a backward that gives the input an (empty) gradient and weight and bias zeros (the sum of
    nothing), and running statistics untouched. (torch's own group_norm gives weight a NaN gradient on (N, C, 0),
    and its batch_norm raises an IndexError for an empty weight when C = 0; the one empty case torch refuses,
    instance_norm on a (0, C, *) batch, is in test_empty_batch_behaves_as_torch.)"""
    fn, shape, args, kwargs = EMPTY_CASES[case]
    C = shape[1] if len(shape) > 1 else 4
    with torch.no_grad():
        expected = getattr(nn.functional, fn)(torch.randn(shape), *args(C), **kwargs)
    x = torch.randn(shape, requires_grad=True)
    a = args(C)
    affine = dict(weight=torch.ones(C, requires_grad=True), bias=torch.zeros(C, requires_grad=True)) if weighted else {}
    y = getattr(NF, fn)(x, *a, **affine, **kwargs, compile=False)
    assert y.shape == expected.shape == x.shape and y.dtype == expected.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for p in affine.values():
        assert torch.equal(p.grad, torch.zeros_like(p))
    if fn == "batch_norm" and a[0] is not None:
        assert torch.equal(a[0], torch.zeros_like(a[0])) and torch.equal(a[1], torch.ones_like(a[1]))


def test_missing_weight_or_bias():
    x = torch.randn(3, 8, 5)
    w = torch.rand(8) + 0.5
    b = torch.randn(8)
    for weight, bias in [(None, None), (w, None), (None, b), (w, b)]:
        torch.testing.assert_close(NF.group_norm(x, 4, weight, bias, compile=False),
                                   nn.functional.group_norm(x, 4, weight, bias))
        torch.testing.assert_close(NF.layer_norm(x, (5,), None if weight is None else w[:5],
                                                 None if bias is None else b[:5], compile=False),
                                   nn.functional.layer_norm(x, (5,), None if weight is None else w[:5],
                                                            None if bias is None else b[:5]))
        torch.testing.assert_close(
            NF.batch_norm(x, torch.zeros(8), torch.ones(8), weight, bias, True, compile=False),
            nn.functional.batch_norm(x, torch.zeros(8), torch.ones(8), weight, bias, True))
    z, t = normzoo.BatchNorm2d(8, bias=False), nn.BatchNorm2d(8, bias=False)
    assert z.bias is None and list(z.state_dict()) == list(t.state_dict())


@pytest.mark.parametrize("eps", [1e-5, 0.0, 1.0, -1e-7])
def test_eps_of_either_sign(eps):
    x = torch.randn(4, 8, 6)
    torch.testing.assert_close(NF.group_norm(x, 2, eps=eps, compile=False), nn.functional.group_norm(x, 2, eps=eps),
                               equal_nan=True)
    if eps > 0:
        torch.testing.assert_close(NF.batch_norm(x, None, None, training=True, eps=eps, compile=False),
                                   nn.functional.batch_norm(x, None, None, training=True, eps=eps))
    else:  # torch refuses eps <= 0 in BatchNorm training; so does normzoo, with the same message
        for f in (NF.batch_norm, nn.functional.batch_norm):
            with pytest.raises(ValueError, match="eps must be positive during training"):
                f(x, None, None, training=True, eps=eps)


def test_one_element_groups_are_exact():
    # GroupNorm(C, C) on (N, C): every group holds one value; the output is the bias exactly.
    x = torch.randn(2, 4) * 100
    b = torch.randn(4)
    z = NF.group_norm(x, 4, None, b, compile=False)
    assert torch.equal(z, b.expand(2, 4))
    # torch's kernel leaves a rounding residue of x - mean, amplified by rsqrt(eps) ~ 316: off by ~1e-3 here
    t = nn.functional.group_norm(x, 4, None, b)
    torch.testing.assert_close(z, t, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        NF.group_norm(torch.randn(1, 4), 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.functional.group_norm(torch.randn(1, 4), 4)  # torch refuses it too


def test_nan_and_inf_propagate_as_in_torch():
    x = torch.randn(2, 4, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    x[1, 3, 0, 0] = float("inf")
    for z, t in [(NF.group_norm(x, 2, compile=False), nn.functional.group_norm(x, 2)),
                 (NF.batch_norm(x, None, None, training=True, compile=False),
                  nn.functional.batch_norm(x, None, None, training=True))]:
        assert torch.equal(z.isnan(), t.isnan())
        finite = ~t.isnan()
        torch.testing.assert_close(z[finite], t[finite])


def test_unbatched_instance_norm():
    x = torch.randn(8, 5, 6)
    z, t = normzoo.InstanceNorm2d(8, affine=True, compile=False), nn.InstanceNorm2d(8, affine=True)
    torch.testing.assert_close(z(x), t(x))
    torch.testing.assert_close(normzoo.InstanceNorm1d(8, compile=False)(x[:, :, 0]),
                               nn.InstanceNorm1d(8)(x[:, :, 0]))


def test_layernorm_over_last_dim_is_group_norm_with_one_group_on_rows():
    x = torch.randn(4, 7, 16)
    rows = NF.group_norm(x.reshape(-1, 16), 1, compile=False).reshape(x.shape)
    torch.testing.assert_close(NF.layer_norm(x, 16, compile=False), rows)


def test_group_norm_one_group_differs_from_layer_norm_affine():
    # same statistics; the affine is per channel for GroupNorm(1, C), per element for LayerNorm([C, H, W])
    x = torch.randn(2, 3, 4, 4)
    gn, ln = normzoo.GroupNorm(1, 3, compile=False), normzoo.LayerNorm([3, 4, 4], compile=False)
    torch.testing.assert_close(gn(x), ln(x))
    assert gn.weight.shape == (3,) and ln.weight.shape == (3, 4, 4)


def test_accurate_where_torch_channels_last_is_not():
    x = (torch.randn(4, 64, 8, 8) + 1e3).to(memory_format=torch.channels_last)
    oracle = _oracle_group_norm(x, 32, 1e-5)
    err_zoo = (NF.group_norm(x, 32, compile=False).double() - oracle).abs().max().item()
    err_torch = (nn.functional.group_norm(x, 32).double() - oracle).abs().max().item()
    assert err_zoo < 2e-6, err_zoo  # the float32 floor: a few ulps of O(1) outputs
    assert err_torch > 100 * err_zoo  # torch's CPU channels_last kernel does not shift (DESIGN.md)


# --- bad input -------------------------------------------------------------------------------------------------

def test_channels_not_divisible_by_groups_names_both():
    with pytest.raises(ValueError, match=r"num_channels \(30\) must be divisible by num_groups \(32\)"):
        normzoo.GroupNorm(32, 30)
    with pytest.raises(ValueError, match=r"num_channels \(30\) must be divisible by num_groups \(4\)"):
        NF.group_norm(torch.randn(2, 30, 3), 4)
    with pytest.raises(ValueError, match=r"num_channels \(30\) must be divisible by group_size \(4\)"):
        normzoo.GroupNorm(num_channels=30, group_size=4)


@pytest.mark.parametrize("layer, x, msg", [
    (normzoo.GroupNorm(4, 8), torch.randn(2, 6, 3), r"expects input of shape \(N, 8, \*\), got \(2, 6, 3\)"),
    (normzoo.BatchNorm2d(8), torch.randn(2, 8, 3), r"BatchNorm2d expects a 4D input, got shape \(2, 8, 3\)"),
    (normzoo.BatchNorm2d(8), torch.randn(2, 6, 3, 3), r"expects 8 channels at dim 1, got input of shape"),
    (normzoo.BatchNorm1d(8), torch.randn(2, 8, 3, 3), r"expects a 2D or 3D input"),
    (normzoo.InstanceNorm2d(8), torch.randn(2, 8, 3, 3, 3), r"expects a 3D or 4D input"),
    (normzoo.InstanceNorm2d(8), torch.randn(2, 6, 3, 3), r"expects 8 channels at dim 1"),
    (normzoo.LayerNorm(16), torch.randn(2, 15), r"does not end with normalized_shape \(16,\)"),
])
def test_wrong_shapes_get_clear_errors(layer, x, msg):
    with pytest.raises(ValueError, match=msg):
        layer(x)


def test_batchnorm_training_with_one_value_per_channel():
    with pytest.raises(ValueError, match=r"more than 1 value per channel when training, got input size \[1, 8\]"):
        normzoo.BatchNorm1d(8)(torch.randn(1, 8))
    normzoo.BatchNorm1d(8, compile=False).eval()(torch.randn(1, 8))  # fine in eval, as in torch


@pytest.mark.parametrize("compile", [False, True])
def test_batch_norm_training_with_one_running_buffer_is_refused_as_in_torch(compile):
    """A running mean without a running variance (or the reverse) in training: torch refuses it; before, normzoo
    left the given buffer silently un-updated."""
    x = torch.randn(4, 3, 5, 5)
    for running_mean, running_var in ((torch.zeros(3), None), (None, torch.ones(3))):
        with pytest.raises(ValueError, match="must either both be None or neither be None"):
            torch.nn.functional.batch_norm(x, running_mean, running_var, training=True)
        with pytest.raises(ValueError, match="must either both be None or neither be None"):
            NF.batch_norm(x, running_mean, running_var, training=True, compile=compile)


def test_instance_norm_refuses_running_statistics():
    with pytest.raises(ValueError, match="only BatchNorm keeps them"):
        NF.instance_norm(torch.randn(2, 4, 5), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"use normzoo.BatchNorm2d"):
        normzoo.InstanceNorm2d(4, track_running_stats=True)


def test_integer_input_and_wrong_affine_shape():
    with pytest.raises(TypeError, match="floating-point input, got dtype torch.int64"):
        NF.group_norm(torch.ones(2, 4, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\) \(one per channel\), got \(3,\)"):
        NF.group_norm(torch.randn(2, 4, 3), 2, torch.ones(3))


def test_nan_check_is_math_not_assert():
    # a zero-variance group with eps=0 gives NaN (0/0), as torch does, rather than raising
    x = torch.ones(2, 4, 3)
    assert NF.group_norm(x, 2, eps=0.0, compile=False).isnan().all()
    assert math.isnan(nn.functional.group_norm(x, 2, eps=0.0)[0, 0, 0].item())


def test_checks_are_kept_per_combination_and_errors_repeat():
    """The functional entry points validate a combination of shapes and settings once and keep its spec; a bad
    call is refused every time, and a new weight shape or dtype is checked anew."""
    x = torch.randn(2, 4, 3)
    NF.group_norm(x, 2, torch.ones(4), compile=False)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
            NF.group_norm(x, 2, torch.ones(3), compile=False)
        with pytest.raises(TypeError, match="floating-point"):
            NF.group_norm(x.long(), 2, compile=False)
        with pytest.raises(ValueError, match="unknown activation"):
            NF.layer_norm(x, [3], activation=["silu"], compile=False)  # unhashable: checked without the cache
    torch.testing.assert_close(NF.layer_norm(x, [3], compile=False), nn.functional.layer_norm(x, (3,)))
