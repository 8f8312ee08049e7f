"""Each family against torch.nn: forward, backward, running buffers, dtypes, layouts, modes, state_dict."""

import inspect

import pytest
import torch
from torch import nn

import normzoo

# (zoo class, torch class, constructor args, input shape, has channels_last form)
CASES = {
    "gn1d": (normzoo.GroupNorm, nn.GroupNorm, (4, 8), (3, 8, 10)),
    "gn2d": (normzoo.GroupNorm, nn.GroupNorm, (4, 8), (3, 8, 5, 6)),
    "gn3d": (normzoo.GroupNorm, nn.GroupNorm, (2, 8), (2, 8, 3, 4, 5)),
    "gn1": (normzoo.GroupNorm, nn.GroupNorm, (1, 6), (4, 6, 5, 5)),
    "ln": (normzoo.LayerNorm, nn.LayerNorm, (16,), (3, 7, 16)),
    "ln2": (normzoo.LayerNorm, nn.LayerNorm, ((5, 6),), (4, 5, 6)),
    "in1d": (normzoo.InstanceNorm1d, nn.InstanceNorm1d, (8,), (3, 8, 10)),
    "in2d": (normzoo.InstanceNorm2d, nn.InstanceNorm2d, (8,), (3, 8, 5, 6)),
    "in3d": (normzoo.InstanceNorm3d, nn.InstanceNorm3d, (8,), (2, 8, 3, 4, 5)),
    "bn1d": (normzoo.BatchNorm1d, nn.BatchNorm1d, (8,), (6, 8)),
    "bn1dL": (normzoo.BatchNorm1d, nn.BatchNorm1d, (8,), (3, 8, 10)),
    "bn2d": (normzoo.BatchNorm2d, nn.BatchNorm2d, (8,), (3, 8, 5, 6)),
    "bn3d": (normzoo.BatchNorm3d, nn.BatchNorm3d, (8,), (2, 8, 3, 4, 5)),
}
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10),
       torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-9, rtol=1e-9),
            torch.bfloat16: dict(atol=1e-1, rtol=5e-2)}


def make_pair(name, dtype, compile, **kw):
    zoo_cls, torch_cls, args, shape = CASES[name]
    extra = dict(affine=True) if zoo_cls.__name__.startswith("InstanceNorm") else {}
    extra.update(kw)
    z = zoo_cls(*args, **extra, compile=compile).to(dtype)
    t = torch_cls(*args, **extra).to(dtype)
    with torch.no_grad():  # non-trivial affine so parameter grads and broadcasting are exercised
        for p in t.parameters():
            p.uniform_(0.5, 1.5)
    z.load_state_dict(t.state_dict())
    return z, t, shape


def run_steps(z, t, shape, dtype, layout, steps=3, offset=0.0):
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64).mul(2).add(offset).to(dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        xz, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yz, yt = z(xz), t(xt)
        assert yz.dtype == yt.dtype and yz.shape == yt.shape
        torch.testing.assert_close(yz, yt, **TOL[dtype])
        g = torch.randn_like(yt)
        yz.backward(g)
        yt.backward(g)
        torch.testing.assert_close(xz.grad, xt.grad, **GRAD_TOL[dtype])
        for (n, pz), pt in zip(z.named_parameters(), t.parameters()):
            torch.testing.assert_close(pz.grad, pt.grad, **GRAD_TOL[dtype], msg=lambda m: f"{n}.grad: {m}")
        for (n, bz), bt in zip(z.named_buffers(), t.buffers()):
            torch.testing.assert_close(bz, bt, **TOL[dtype], msg=lambda m: f"buffer {n}: {m}")
        if layout == "channels_last" and yt.dim() == 4:
            assert yz.is_contiguous(memory_format=torch.channels_last)
    return yz


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_eager_engine(name, mode, dtype):
    z, t, shape = make_pair(name, dtype, compile=False)
    z.train(mode == "train")
    t.train(mode == "train")
    layouts = ["contiguous"] + (["channels_last"] if len(shape) in (4, 5) else [])
    for layout in layouts:
        run_steps(z, t, shape, dtype, layout)


# The compiled path: one kernel per signature, so a bounded set of cases.
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["gn2d", "in2d", "bn2d"])
def test_matches_torch_compiled(name, mode, layout):
    z, t, shape = make_pair(name, torch.float32, compile=True)
    z.train(mode == "train")
    t.train(mode == "train")
    run_steps(z, t, shape, torch.float32, layout, offset=3.0)


@pytest.mark.parametrize("name", ["ln", "bn1d"])
def test_matches_torch_compiled_2d_inputs(name):
    z, t, shape = make_pair(name, torch.float32, compile=True)
    run_steps(z, t, shape, torch.float32, "contiguous")


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("compile", [False, True])
def test_batchnorm_running_statistics(momentum, compile):
    if compile and momentum in (0.0, 1.0):
        pytest.skip("the EMA factor is the same code path as 0.1")
    z, t, shape = make_pair("bn2d", torch.float32, compile=compile, momentum=momentum)
    run_steps(z, t, shape, torch.float32, "contiguous", steps=4, offset=5.0)
    assert int(z.num_batches_tracked) == int(t.num_batches_tracked) == 4
    # running_var is the *unbiased* variance of the batches
    z.eval()
    t.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(z(x), t(x), **TOL[torch.float32])


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_without_running_stats_uses_batch_stats_in_eval(affine):
    z = normzoo.BatchNorm2d(4, affine=affine, track_running_stats=False, compile=False).eval()
    t = nn.BatchNorm2d(4, affine=affine, track_running_stats=False).eval()
    assert list(z.state_dict()) == list(t.state_dict())
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    torch.testing.assert_close(z(x), t(x))


def test_only_batchnorm_has_buffers_and_others_agree_in_train_and_eval():
    for name in ["gn2d", "ln", "in2d"]:
        z, _, shape = make_pair(name, torch.float32, compile=False)
        assert list(z.buffers()) == []
        x = torch.randn(shape)
        y_train = z.train()(x)
        torch.testing.assert_close(z.eval()(x), y_train, rtol=0, atol=0)
    assert {n for n, _ in normzoo.BatchNorm2d(4).named_buffers()} == {
        "running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_both_ways(name):
    zoo_cls, torch_cls, args, _ = CASES[name]
    for kw in ({}, {"affine": False} if "affine" in zoo_cls.__init__.__code__.co_varnames else {}):
        if zoo_cls is normzoo.LayerNorm and kw:
            kw = {"elementwise_affine": False}
        t, z = torch_cls(*args, **kw), zoo_cls(*args, **kw)
        with torch.no_grad():
            for p in t.parameters():
                p.normal_()
        assert list(z.state_dict()) == list(t.state_dict())
        z.load_state_dict(t.state_dict(), strict=True)
        t2 = torch_cls(*args, **kw)
        t2.load_state_dict(z.state_dict(), strict=True)
        for (k, a), b in zip(t.state_dict().items(), t2.state_dict().values()):
            assert torch.equal(a, b), k


def test_old_batchnorm_checkpoint_without_num_batches_tracked_loads():
    sd = nn.BatchNorm2d(4).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    z = normzoo.BatchNorm2d(4)
    z.load_state_dict(sd, strict=True)
    assert int(z.num_batches_tracked) == 0


def test_layernorm_without_bias_and_attributes_match_torch():
    z, t = normzoo.LayerNorm((5, 6), bias=False), nn.LayerNorm((5, 6), bias=False)
    assert z.bias is None and list(z.state_dict()) == list(t.state_dict()) == ["weight"]
    assert z.normalized_shape == t.normalized_shape and z.eps == t.eps
    g = normzoo.GroupNorm(4, 8)
    assert (g.num_groups, g.num_channels, g.eps, g.affine) == (4, 8, 1e-5, True)
    b = normzoo.BatchNorm2d(8)
    assert (b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats) == (8, 1e-5, 0.1, True, True)
    i = normzoo.InstanceNorm2d(8)
    assert (i.affine, i.track_running_stats, i.weight) == (False, False, None)
    assert "4, 8, eps=1e-05, affine=True" in repr(g)


# normzoo class name -> its torch.nn counterpart (names normzoo does not have yet are skipped, so a new family
# is checked as soon as it exists)
TORCH_COUNTERPARTS = {name: name for name in (
    "GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d", "BatchNorm2d",
    "BatchNorm3d", "SyncBatchNorm", "RMSNorm")}
EXTRA_KEYWORDS = {"compile", "activation", "group_size"}  # normzoo's own, keyword-only


def _check_signature_extends(zoo_cls, reference: list[inspect.Parameter], relaxed_defaults=()):
    """zoo_cls's constructor takes `reference`'s parameters: the positional ones in the same order, with the same
    names, kinds and defaults, then only keyword-only extras from EXTRA_KEYWORDS."""
    params = [p for p in inspect.signature(zoo_cls.__init__).parameters.values() if p.name != "self"]
    want = [p for p in reference if p.name != "self"]
    ours = {p.name: p for p in params}
    for p in want:
        assert p.name in ours, f"{zoo_cls.__name__} lacks {p.name!r}"
        q = ours[p.name]
        assert q.kind == p.kind, f"{zoo_cls.__name__}.{p.name}: {q.kind} vs torch's {p.kind}"
        if p.name in relaxed_defaults:
            continue
        assert q.default == p.default, f"{zoo_cls.__name__}.{p.name}: default {q.default!r} vs {p.default!r}"
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional == [p.name for p in want if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    extras = {p.name for p in params} - {p.name for p in want}
    assert extras <= EXTRA_KEYWORDS, f"{zoo_cls.__name__} has arguments torch's lacks: {extras - EXTRA_KEYWORDS}"
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in extras)


@pytest.mark.parametrize("name", [n for n in TORCH_COUNTERPARTS if hasattr(normzoo, n)])
def test_constructor_signature_matches_torch(name):
    """Every layer takes the installed torch's constructor arguments (names, kinds, defaults, positional order),
    e.g. the keyword-only bias= of torch 2.x's GroupNorm, BatchNorm and SyncBatchNorm. GroupNorm's num_groups and
    num_channels default to None so that group_size= can stand in for num_groups (leaving both out is a TypeError,
    as in torch)."""
    torch_cls = getattr(nn, TORCH_COUNTERPARTS[name])
    relaxed = ("num_groups", "num_channels") if name == "GroupNorm" else ()
    _check_signature_extends(getattr(normzoo, name), list(inspect.signature(torch_cls.__init__).parameters.values()),
                             relaxed)
    if name == "GroupNorm":
        with pytest.raises(TypeError):
            nn.GroupNorm()
        with pytest.raises(TypeError, match="needs num_groups"):
            normzoo.GroupNorm(num_channels=8)


def test_frozen_batchnorm_signature_extends_torchvisions():
    # torchvision.ops.misc.FrozenBatchNorm2d.__init__(self, num_features: int, eps: float = 1e-5) (not installed
    # here; detectron2's is the same); normzoo's adds device and dtype after them, as torch.nn's layers have.
    P = inspect.Parameter
    torchvision_params = [P("num_features", P.POSITIONAL_OR_KEYWORD),
                          P("eps", P.POSITIONAL_OR_KEYWORD, default=1e-5)]
    params = [p for p in inspect.signature(normzoo.FrozenBatchNorm2d.__init__).parameters.values()
              if p.name != "self"]
    assert [(p.name, p.kind, p.default) for p in params[:2]] == \
        [(p.name, p.kind, p.default) for p in torchvision_params]
    assert [p.name for p in params[2:4]] == ["device", "dtype"]
    assert {p.name for p in params[4:]} <= EXTRA_KEYWORDS


@pytest.mark.parametrize("name, args", [("GroupNorm", (2, 6)), ("BatchNorm1d", (6,)), ("BatchNorm2d", (6,)),
                                        ("BatchNorm3d", (6,)), ("InstanceNorm2d", (6,)), ("SyncBatchNorm", (6,)),
                                        ("LayerNorm", (6,))])
@pytest.mark.parametrize("bias", [True, False])
def test_bias_keyword_as_torch(name, args, bias):
    """bias=False: no bias parameter, the same state_dict keys and repr as torch's, and the same output."""
    affine = {"LayerNorm": {}, "InstanceNorm2d": {"affine": True}}.get(name, {})
    t = getattr(nn, name)(*args, **affine, bias=bias)
    z = getattr(normzoo, name)(*args, **affine, bias=bias, compile=False)
    assert (z.bias is None) == (not bias) == (t.bias is None)
    assert [n for n, _ in z.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert list(z.state_dict()) == list(t.state_dict())
    assert repr(z) == repr(t)[:-1] + ", compile=False)"
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
    z.load_state_dict(t.state_dict())
    shape = {"BatchNorm1d": (4, 6, 3), "BatchNorm3d": (2, 6, 2, 3, 2), "LayerNorm": (4, 3, 6)}.get(name, (3, 6, 4, 5))
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(z.double()(x), t.double()(x), rtol=1e-12, atol=1e-12)


def test_group_size_in_place_of_num_groups():
    assert normzoo.GroupNorm(num_channels=64, group_size=16).num_groups == 4
    with pytest.raises(ValueError, match="exactly one of num_groups and group_size"):
        normzoo.GroupNorm(4, 64, group_size=16)


def test_fused_activation_matches_norm_then_activation():
    x = torch.randn(2, 8, 4, 4)
    for act, f in [("silu", nn.functional.silu), ("relu", nn.functional.relu), ("gelu", nn.functional.gelu)]:
        z = normzoo.GroupNorm(4, 8, activation=act, compile=False)
        torch.testing.assert_close(z(x), f(nn.functional.group_norm(x, 4)))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        normzoo.GroupNorm(4, 8, activation="swish")


def test_seed_case_groupnorm_one_group_no_affine():
    """The question normzoo grew from: GroupNorm(1, 3) has no running average and uses the biased variance."""
    x = torch.randn(32, 3, 28, 28)
    z = normzoo.GroupNorm(1, 3, affine=False)
    t = nn.GroupNorm(1, 3, affine=False)
    assert list(z.buffers()) == [] and list(z.state_dict()) == []
    diff = (z(x) - t(x)).abs().max().item()
    assert diff < 1e-6, diff
    # the unbiased variance (the seed's first attempt) would be off by far more
    m, v = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), keepdim=True, unbiased=True)
    assert ((x - m) / (v + 1e-5).sqrt() - t(x)).abs().max().item() > 1e-4


@pytest.mark.parametrize("compile", [False, True])
def test_fused_activation_backward_matches_norm_then_activation(compile):
    x = (torch.randn(2, 8, 4, 4) * 3 + 2).to(memory_format=torch.channels_last).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    z = normzoo.GroupNorm(4, 8, activation="silu", compile=compile)
    t = nn.GroupNorm(4, 8)
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.normal_()
    z.load_state_dict(t.state_dict())
    g = torch.randn(2, 8, 4, 4)
    z(x).backward(g)
    nn.functional.silu(t(xt)).backward(g)
    torch.testing.assert_close(x.grad, xt.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z.weight.grad, t.weight.grad, atol=1e-4, rtol=1e-4)
