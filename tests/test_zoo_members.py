"""RMSNorm against torch.nn.RMSNorm, LayerNorm2d against permute + F.layer_norm + permute (timm's LayerNorm2d),
both against the float64 oracle; state_dicts, eps=None, memory formats, gradients and errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
import normzoo.functional as NF
from normzoo.engine import NormSpec
from normzoo.sweeps import equivalence as eq
from normzoo.sweeps import grid
from normzoo.sweeps.oracle import PermuteLayerNorm2d, Reference

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=5e-3)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
            torch.bfloat16: dict(atol=1e-1, rtol=5e-2), torch.float16: dict(atol=1e-2, rtol=1e-2)}


class TimmLayerNorm2d(nn.LayerNorm):
    """A stand-in for timm's LayerNorm2d: a torch.nn.LayerNorm subclass that permutes so C is normalized."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def permute_reference(x, weight, bias, eps):
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)


def randomize(*modules):
    with torch.no_grad():
        for m in modules:
            for name, p in m.named_parameters():
                p.copy_(torch.rand_like(p) + 0.5 if name == "weight" else torch.randn_like(p))


def compare(zoo, ref, x, dtype, params):
    """Forward and backward of zoo and ref on copies of x; params: [(zoo param, ref param)]."""
    xz, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yz, yr = zoo(xz), ref(xr)
    assert yz.dtype == yr.dtype == x.dtype and yz.shape == yr.shape
    torch.testing.assert_close(yz, yr, **TOL[dtype])
    g = torch.randn(yr.shape, dtype=torch.float64).to(dtype)
    yz.backward(g)
    yr.backward(g)
    torch.testing.assert_close(xz.grad, xr.grad, **GRAD_TOL[dtype])
    for pz, pr in params:
        torch.testing.assert_close(pz.grad, pr.grad, **GRAD_TOL[dtype])
    return yz, xz.grad


# ------------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, normalized, kw", [
    ((3, 7, 16), 16, {}),
    ((4, 5, 6), (5, 6), {"eps": 1e-5}),
    ((3, 16), [16], {"elementwise_affine": False}),
])
def test_rms_norm_matches_torch_eager_engine(shape, normalized, kw, dtype):
    t = nn.RMSNorm(normalized, **kw).to(dtype)
    z = normzoo.RMSNorm(normalized, **kw, compile=False).to(dtype)
    randomize(t)
    z.load_state_dict(t.state_dict())
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).to(dtype)
    params = [(z.weight, t.weight)] if t.weight is not None else []
    compare(z, t, x, dtype, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_compiled_matches_torch(dtype):
    t, z = nn.RMSNorm(32).to(dtype), normzoo.RMSNorm(32).to(dtype)
    randomize(t)
    z.load_state_dict(t.state_dict())
    x = (torch.randn(2, 5, 32, dtype=torch.float64) + 4).to(dtype)
    compare(z, t, x, dtype, [(z.weight, t.weight)])
    with torch.no_grad():  # the no-grad signature too
        torch.testing.assert_close(z(x), t(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_rms_norm_eps_none_is_torchs(dtype):
    """eps=None: torch uses finfo(float32).eps for float16/bfloat16 inputs (its arithmetic dtype), not the input's.
    A tiny input makes eps visible: with finfo(bfloat16).eps = 7.8e-3 the output would be off by ~2."""
    x = (torch.randn(4, 64, dtype=torch.float64) * 1e-3).to(dtype)
    z, t = normzoo.RMSNorm(64, compile=False).to(dtype), nn.RMSNorm(64).to(dtype)
    assert z.eps is None and "eps=None" in repr(z)
    torch.testing.assert_close(z(x), t(x), **TOL[dtype])
    torch.testing.assert_close(NF.rms_norm(x, (64,), compile=False), F.rms_norm(x, (64,)), **TOL[dtype])
    eps32 = torch.finfo(torch.float32).eps
    torch.testing.assert_close(z(x), NF.rms_norm(x, (64,), eps=eps32, compile=False), rtol=0, atol=0)


def test_rms_norm_state_dict_attributes_and_repr_match_torch():
    for kw in ({}, {"elementwise_affine": False}, {"eps": 1e-6}):
        t, z = nn.RMSNorm((5, 6), **kw), normzoo.RMSNorm((5, 6), **kw)
        randomize(t)
        assert list(z.state_dict()) == list(t.state_dict())
        z.load_state_dict(t.state_dict(), strict=True)
        t2 = nn.RMSNorm((5, 6), **kw)
        t2.load_state_dict(z.state_dict(), strict=True)
        for (k, a), b in zip(t.state_dict().items(), t2.state_dict().values()):
            assert torch.equal(a, b), k
        assert (z.normalized_shape, z.eps, z.elementwise_affine) == (t.normalized_shape, t.eps, t.elementwise_affine)
        assert repr(z).startswith(repr(t))
    assert list(normzoo.RMSNorm(8).buffers()) == []
    z = normzoo.RMSNorm(8, dtype=torch.float64)
    assert z.weight.dtype == torch.float64 and torch.equal(z.weight, torch.ones(8, dtype=torch.float64))


def test_rms_norm_does_not_centre_and_is_exact_at_large_means():
    """RMSNorm is x / rms(x): a large mean is kept (not subtracted), and the statistics lose nothing to it."""
    x = torch.randn(4, 256, dtype=torch.float64) + 1e3
    z = normzoo.RMSNorm(256, compile=False)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    err = ((z(x.float()).double() - want).abs().max() / want.abs().max()).item()
    assert err < 2 * torch.finfo(torch.float32).eps, err
    assert z(x.float()).mean().item() == pytest.approx(1.0, abs=1e-3)


# -------------------------------------------------------------------------------------------------- LayerNorm2d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_norm2d_matches_permute_reference_eager_engine(layout, dtype):
    t = TimmLayerNorm2d(8).to(dtype)
    z = normzoo.LayerNorm2d(8, compile=False).to(dtype)
    randomize(t)
    z.load_state_dict(t.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(3, 8, 5, 6, dtype=torch.float64) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    y, dx = compare(z, t, x, dtype, [(z.weight, t.weight), (z.bias, t.bias)])
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_layer_norm2d_compiled_keeps_memory_format(layout):
    t, z = TimmLayerNorm2d(16), normzoo.LayerNorm2d(16)
    randomize(t)
    z.load_state_dict(t.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(2, 16, 5, 6) * 2 + 100).contiguous(memory_format=fmt)
    y, dx = compare(z, t, x, torch.float32, [(z.weight, t.weight), (z.bias, t.bias)])
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape", [(3, 8), (3, 8, 7), (2, 8, 3, 4, 5)])
def test_layer_norm2d_any_number_of_spatial_dims(shape):
    z = normzoo.LayerNorm2d(8, eps=1e-5, compile=False).double()
    randomize(z)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    torch.testing.assert_close(z(x), permute_reference(x, z.weight, z.bias, 1e-5), rtol=1e-12, atol=1e-12)


def test_layer_norm2d_fused_activation_and_no_affine():
    x = torch.randn(2, 8, 4, 4) * 2 + 1
    z = normzoo.LayerNorm2d(8, activation="gelu", compile=False)
    randomize(z)
    torch.testing.assert_close(z(x), F.gelu(permute_reference(x, z.weight, z.bias, 1e-6)))
    plain = normzoo.LayerNorm2d(8, affine=False, compile=False)
    assert plain.weight is None and plain.bias is None and list(plain.state_dict()) == []
    torch.testing.assert_close(plain(x), permute_reference(x, None, None, 1e-6))


def test_layer_norm2d_state_dict_round_trip_with_timm_style_layer():
    t, z = TimmLayerNorm2d(8), normzoo.LayerNorm2d(8)
    randomize(t)
    assert list(z.state_dict()) == list(t.state_dict()) == ["weight", "bias"]
    z.load_state_dict(t.state_dict(), strict=True)
    t2 = TimmLayerNorm2d(8)
    t2.load_state_dict(z.state_dict(), strict=True)
    assert torch.equal(t2.weight, t.weight) and torch.equal(t2.bias, t.bias)
    assert (z.num_channels, z.eps, z.affine) == (8, 1e-6, True)
    assert repr(z) == "LayerNorm2d(8, eps=1e-06, affine=True)"
    assert list(z.buffers()) == []


def test_layer_norm2d_is_not_group_norm_one_group():
    """Statistics per (sample, position) over C; GroupNorm(1, C) pools (C, H, W)."""
    x = torch.randn(2, 8, 4, 4) * torch.arange(1, 17.0).reshape(1, 1, 4, 4)
    ln2d, gn1 = normzoo.LayerNorm2d(8, eps=1e-5, compile=False), normzoo.GroupNorm(1, 8, compile=False)
    assert (ln2d(x) - gn1(x)).abs().max() > 0.1
    torch.testing.assert_close(ln2d(x).mean(1), torch.zeros(2, 4, 4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("call, msg", [
    (lambda: normzoo.LayerNorm2d(8)(torch.randn(2, 6, 4, 4)), r"LayerNorm2d\(8\) expects input of shape \(N, 8, \*\), "
                                                               r"got \(2, 6, 4, 4\)"),
    (lambda: normzoo.LayerNorm2d(8)(torch.randn(8)), r"got \(8,\)"),
    (lambda: NF.layer_norm2d(torch.randn(2, 8, 3), torch.ones(6)), r"weight must have shape \(8,\)"),
    (lambda: NF.rms_norm(torch.randn(2, 8), (6,)), r"rms_norm: input of shape \(2, 8\) does not end with "
                                                   r"normalized_shape \(6,\)"),
    (lambda: NF.rms_norm(torch.randn(2, 8), 8, torch.ones(4)), r"weight must have shape \(8,\)"),
    (lambda: normzoo.RMSNorm(8, activation="swish"), "unknown activation 'swish'"),
])
def test_errors_name_the_problem(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_empty_batches():
    for compile in (False, True):
        assert normzoo.RMSNorm(4, compile=compile)(torch.randn(0, 4)).shape == (0, 4)
        assert normzoo.LayerNorm2d(4, compile=compile)(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)


# ------------------------------------------------------------------------------------ gradients and the oracle


def _gradcheck(f, x, *params):
    assert torch.autograd.gradcheck(f, (x, *params), atol=1e-6, rtol=1e-5)


def test_gradcheck_rms_norm_and_layer_norm2d():
    D = torch.float64
    x = (torch.randn(3, 4, 6, dtype=D) * 2 + 3).requires_grad_()
    w = (torch.rand(6, dtype=D) + 0.5).requires_grad_()
    _gradcheck(lambda x, w: NF.rms_norm(x, (6,), w, compile=False), x, w)
    _gradcheck(lambda x: NF.rms_norm(x, (4, 6), eps=1e-3, activation="silu", compile=False), x)
    x4 = (torch.randn(2, 6, 3, 4, dtype=D) * 2 + 3).requires_grad_()
    b = torch.randn(6, dtype=D).requires_grad_()
    _gradcheck(lambda x, w, b: NF.layer_norm2d(x, w, b, compile=False), x4, w, b)
    _gradcheck(lambda x, w, b: NF.layer_norm2d(x, w, b, activation="gelu_tanh", compile=False),
               x4.detach().to(memory_format=torch.channels_last).requires_grad_(), w, b)


def test_center_is_data_for_channel_norms_too():
    """center=False is a spec field, not a layer: on a GroupNorm spec it gives RMS statistics per group, with the
    matching gradient, through the same engine (no public layer uses it; this keeps the engine honest)."""
    from normzoo import compiling

    D = torch.float64
    spec = NormSpec(groups=2, eps=1e-5, center=False)
    x = (torch.randn(2, 6, 3, 4, dtype=D) + 2).requires_grad_()
    w, b = (torch.rand(6, dtype=D) + 0.5).requires_grad_(), torch.randn(6, dtype=D).requires_grad_()
    f = lambda x, w, b: compiling.run(spec, x, w, b, compile=False)  # noqa: E731
    xg = x.detach().reshape(2, 2, -1)
    want = (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + 1e-5)).reshape(x.shape)
    want = want * w.detach().reshape(1, 6, 1, 1) + b.detach().reshape(1, 6, 1, 1)
    torch.testing.assert_close(f(x, w, b), want, rtol=1e-12, atol=1e-12)
    _gradcheck(f, x, w, b)
    with pytest.raises(ValueError, match="center=False"):
        NormSpec(groups=6, eps=1e-5, batch=True, center=False)


@pytest.mark.parametrize("layer, shape", [("rms", (2, 3, 6)), ("ln2d", (2, 4, 3, 5)),
                                          ({"type": "rms_norm", "elementwise_affine": False, "eps": 1e-4}, (3, 8))])
def test_oracle_matches_torch_float64(layer, shape):
    """The oracle's own float64 math agrees with torch's float64 (nn.RMSNorm, the permute reference)."""
    spec = normzoo.registry.resolve_spec(layer)
    nf = shape[normzoo.registry.features_axis(spec["type"])]
    zoo = normzoo.build(spec, nf, compile=False).double()
    randomize(zoo)
    ref = Reference(zoo, torch.float64)
    theirs = eq.torch_counterpart(zoo)
    assert isinstance(theirs, nn.RMSNorm if spec["type"] == "rms_norm" else PermuteLayerNorm2d)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    torch.testing.assert_close(ref.forward(x, True), theirs(x), rtol=1e-12, atol=1e-12)


def _cases(**g):
    return grid.parse({"grids": [dict({"compiled": [False]}, **g)]}, "equivalence", "t.yaml").cases


def test_float32_against_the_float64_oracle():
    """float32 (eager engine, and one compiled signature each) within the sweep's tolerance of the float64 oracle,
    forward and gradients, at means 0 and 1e3, both layouts for LayerNorm2d."""
    cases = (_cases(layers=["rms"], shapes=[[2, 6, 64]], offsets=[0, 1000])
             + _cases(layers=["ln2d"], shapes=[[2, 16, 4, 4]], layouts=["contiguous", "channels_last"],
                      offsets=[0, 1000])
             + _cases(layers=["rms"], shapes=[[2, 5, 32]], offsets=[1000], compiled=[True])
             + _cases(layers=["ln2d"], shapes=[[2, 16, 5, 6]], layouts=["channels_last"], offsets=[100],
                      compiled=[True]))
    for case in cases:
        r = eq.run_case(case)
        assert r["verdict"] in ("PASS", "TORCH-OFF"), str({k: v for k, v in r.items() if k != "layer"})
        assert r["err_zoo"] < 1e-6 and r["grad_err_zoo"] < 1e-6, r  # float32 rounding, mean or not
        assert set(r["errors"]["zoo"]) == {"y", "dx", "dweight"} | ({"dbias"} if case.family == "layer_norm2d"
                                                                    else set())


def test_low_precision_against_the_float64_oracle():
    for case in _cases(layers=["rms", "ln2d"], shapes=[[2, 16, 4, 8]], dtypes=["float16", "bfloat16"],
                       offsets=[0, 1000]):
        r = eq.run_case(case)
        assert r["verdict"] in ("PASS", "TORCH-OFF"), r
