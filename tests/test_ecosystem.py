"""norm_factory at the norm_layer= call sites of timm, torchvision and plain code; convert() on Hugging Face-style
norms (recognized by a float64 probe); convert() never skipping a norm silently.

No third-party package here: the stand-ins copy the behaviour of timm's get_norm_layer / get_norm_act_layer
(timm/layers/create_norm.py, create_norm_act.py, 1.0.31) and of transformers' LlamaRMSNorm and GemmaRMSNorm (5.24).
tests/test_integration.py runs the real packages (pytest -m integration)."""

from __future__ import annotations

import copy
import functools
import pickle
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
from normzoo import registry
from normzoo.convert import NormAct, looks_like_norm, recognize_norm
from normzoo.registry import SlotError


# ----------------------------------------------------------------------------------------- stand-ins for timm


def get_norm_layer(norm_layer):
    """timm.layers.get_norm_layer's behaviour: a type, str, function or partial; a partial is unbound to its
    .func and rebound with its keywords only (its positional arguments are lost)."""
    assert isinstance(norm_layer, (type, str, types.FunctionType, functools.partial))
    norm_kwargs = {}
    if isinstance(norm_layer, functools.partial):
        norm_kwargs.update(norm_layer.keywords)
        norm_layer = norm_layer.func
    if norm_kwargs:
        norm_layer = functools.partial(norm_layer, **norm_kwargs)
    return norm_layer


_NORM_TO_NORM_ACT_MAP = {"batchnorm2d": "BatchNormAct2d", "groupnorm": "GroupNormAct"}


def get_norm_act_layer(norm_layer, act_layer=None):
    """timm.layers.get_norm_act_layer's behaviour: a function is used as is (and is not told act_layer); a class
    is mapped by its lower-cased __name__ to timm's norm + activation class."""
    assert isinstance(norm_layer, (type, str, types.FunctionType, functools.partial))
    norm_act_kwargs = {}
    if isinstance(norm_layer, functools.partial):
        norm_act_kwargs.update(norm_layer.keywords)
        norm_layer = norm_layer.func
    if isinstance(norm_layer, types.FunctionType):
        norm_act_layer = norm_layer
    else:
        type_name = norm_layer.__name__.lower()
        norm_act_layer = _NORM_TO_NORM_ACT_MAP.get(type_name, None)
        assert norm_act_layer is not None, f"No equivalent norm_act layer for {type_name}"
    return functools.partial(norm_act_layer, **norm_act_kwargs) if norm_act_kwargs else norm_act_layer


class TimmBlock(nn.Module):
    """A timm-style block: get_norm_layer, then norm_layer(C, device=, dtype=)."""

    def __init__(self, c, norm_layer, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer = get_norm_layer(norm_layer)
        self.conv = nn.Conv2d(c, c, 3, padding=1, **dd)
        self.bn = norm_layer(c, **dd)


class TimmNormActBlock(nn.Module):
    """An EfficientNet-style block: get_norm_act_layer(norm_layer, act_layer), then norm_act_layer(C, inplace=True)."""

    def __init__(self, c, norm_layer, act_layer=nn.SiLU):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        self.bn = norm_act_layer(c, inplace=True)


class TorchvisionBlock(nn.Module):
    def __init__(self, c, norm_layer):
        super().__init__()
        self.bn = norm_layer(c)


# ----------------------------------------------------------------------------------------- norm_factory


@pytest.mark.parametrize("spec,cls", [("gn32", normzoo.GroupNorm), ("bn", normzoo.BatchNorm2d),
                                      ("ln2d", normzoo.LayerNorm2d), ("frozen_bn", normzoo.FrozenBatchNorm2d),
                                      (normzoo.GroupNorm, normzoo.GroupNorm), (nn.BatchNorm2d, nn.BatchNorm2d)])
def test_norm_factory_fills_plain_torchvision_and_timm_slots(spec, cls):
    kw = {"num_groups": 8} if spec is normzoo.GroupNorm else {}
    factory = normzoo.norm_factory(spec, **kw)
    assert isinstance(factory(64), cls) and isinstance(TorchvisionBlock(64, factory).bn, cls)
    block = TimmBlock(64, factory)  # the partial survives get_norm_layer's unbinding: the spec is a keyword
    assert isinstance(block.bn, cls)
    block = TimmBlock(64, factory, dtype=torch.float64)  # timm's device= / dtype= reach the layer
    assert {t.dtype for t in list(block.bn.parameters()) + list(block.bn.buffers()) if t.is_floating_point()} \
        == {torch.float64}
    assert isinstance(get_norm_layer(factory), functools.partial)


def test_norm_factory_device_dtype_for_a_function_spec_and_overrides():
    factory = normzoo.norm_factory(lambda c: nn.GroupNorm(2, c))  # a function takes no device=: placed after
    layer = TimmBlock(8, factory, device="cpu", dtype=torch.float64).bn
    assert isinstance(layer, nn.GroupNorm) and layer.weight.dtype == torch.float64
    layer = normzoo.norm_factory("gn32", eps=1e-3)(64, eps=1e-4)  # the call's keywords win, as before
    assert layer.eps == 1e-4 and layer.num_groups == 32
    assert normzoo.norm_factory("bn", compile=False)(16).compile is False
    assert registry.NormLayer.__name__ == "NormLayer"
    again = pickle.loads(pickle.dumps(normzoo.norm_factory("gn32", eps=1e-3)))  # picklable (spawned workers)
    assert again(64).eps == 1e-3


def test_a_spec_that_cannot_fill_a_slot_names_the_slot_and_the_reason():
    with pytest.raises(ValueError, match=r"^normzoo\.norm_factory\('gn32'\) cannot fill the slot in "
                                         r".*TorchvisionBlock\.__init__ \(test_ecosystem\.py:\d+\) \(48 features\): "
                                         r"num_channels \(48\) must be divisible by num_groups \(32\)"):
        TorchvisionBlock(48, normzoo.norm_factory("gn32"))
    with pytest.raises(TypeError, match=r"norm_factory\(.*\) cannot fill the slot .*\(8 features, bogus=1\)"):
        normzoo.norm_factory(lambda c: nn.BatchNorm2d(c))(8, bogus=1)


def test_norm_act_keywords_fuse_or_refuse():
    """timm's BatchNormAct2d keywords: the model's activation is fused, or the call is refused. Never dropped."""
    factory = normzoo.norm_factory("bn")
    assert factory(8, apply_act=False, inplace=True).activation is None  # the norm alone, as asked
    assert factory(8, act_layer=None).activation is None
    assert factory(8, act_layer=nn.SiLU, inplace=True).activation == "silu"
    assert factory(8, act_layer="swish").activation == "silu"
    assert factory(8, act_layer=nn.GELU, act_kwargs={"approximate": "tanh"}).activation == "gelu_tanh"
    assert normzoo.norm_factory("bn_relu")(8, act_layer=nn.ReLU).activation == "relu"
    with pytest.raises(SlotError, match=r"norm_factory\('bn'\) was called as a norm \+ activation layer "
                                        r"\(inplace=True\).*not told which activation.*normzoo\.convert\(model, 'bn'\)"):
        factory(8, inplace=True)
    with pytest.raises(SlotError, match=r"fuses only relu.*Hardswish would be dropped"):
        factory(8, act_layer=nn.Hardswish)
    with pytest.raises(SlotError, match=r"LeakyReLU"):
        factory(8, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2})
    with pytest.raises(SlotError, match=r"no dropout.*drop_layer"):
        factory(8, act_layer=nn.ReLU, drop_layer=nn.Dropout)
    with pytest.raises(SlotError, match=r"applies activation='relu' and the slot asks for 'silu'"):
        normzoo.norm_factory("bn_relu")(8, act_layer=nn.SiLU)
    with pytest.raises(SlotError, match=r"takes no activation="):
        normzoo.norm_factory(lambda c: nn.BatchNorm2d(c))(8, act_layer=nn.ReLU)
    assert issubclass(SlotError, TypeError)


def test_timm_norm_act_slot_is_refused_at_model_construction_naming_it():
    """get_norm_act_layer does not pass act_layer to a non-timm layer, so the factory refuses there."""
    with pytest.raises(SlotError, match=r"cannot fill timm's norm \+ activation slots \(get_norm_act_layer with "
                                        r"act_layer=SiLU in .*TimmNormActBlock\.__init__ \(test_ecosystem\.py:\d+\)\)"
                                        r".*normzoo\.convert\(model, 'gn32'\)"):
        TimmNormActBlock(32, normzoo.norm_factory("gn32"))


def test_convert_takes_a_norm_factory_as_its_spec():
    """convert(model, norm_factory("bn")) is convert(model, "bn"): checked and kept as a preset (eps, momentum)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, eps=1e-3, momentum=0.01))
    normzoo.convert(model, normzoo.norm_factory("bn", compile=False))
    assert type(model[1]) is normzoo.BatchNorm2d and (model[1].eps, model[1].momentum) == (1e-3, 0.01)
    assert model[1].compile is False
    with pytest.raises(normzoo.ConversionError, match=r"'ln2d'"):
        normzoo.convert(nn.Sequential(nn.BatchNorm2d(8)), normzoo.norm_factory("ln"))


# ------------------------------------------------------------------------------- Hugging Face-style norms


class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm (5.24): upcast to float32, normalize, cast back, then the weight multiply."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """transformers' GemmaRMSNorm: x_hat * (1 + weight), weight initialized to zeros."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


class Fp32LayerNorm(nn.Module):
    """A LayerNorm of another library: weight, bias, eps, computed in float32."""

    def __init__(self, dim, eps=1e-5, bias=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(),
                            None if self.bias is None else self.bias.float(), self.eps).type_as(x)


class HardcodedEpsRMSNorm(LlamaRMSNorm):
    """Says eps=1e-6 but computes with 1e-2: the probe must see it."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-2) * self.weight


class ScaledNorm(LlamaRMSNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class TinyDecoder(nn.Module):
    def __init__(self, norm=LlamaRMSNorm, d=16):
        super().__init__()
        self.embed = nn.Embedding(32, d)
        self.input_layernorm = norm(d, eps=1e-5)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(0.0)
        self.act = nn.SiLU()
        self.norm = norm(d, eps=1e-5)
        self.head = nn.Linear(d, 32, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.act(self.proj(self.drop(self.input_layernorm(h))))
        return self.head(self.norm(h))


def _random_weights(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


def test_llama_rms_norm_is_recognized_and_converted_keeping_eps_keys_and_outputs():
    model = _random_weights(TinyDecoder())
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recognized: nothing reported
        out = normzoo.convert(model, "rms", compile=False)
    assert out is model
    for name in ("input_layernorm", "norm"):
        layer = getattr(model, name)
        assert type(layer) is normzoo.RMSNorm and layer.eps == 1e-5 and layer.normalized_shape == (16,)
        assert torch.equal(layer.weight, getattr(original, name).weight)
    assert list(model.state_dict()) == keys  # checkpoints load both ways
    original.load_state_dict(model.state_dict())
    model.load_state_dict(original.state_dict())
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), original(ids), rtol=1e-5, atol=1e-5)


def test_converted_rms_norm_dtype_behaviour_float64_and_bfloat16():
    """float64: the converted layer equals the float64 math to ~1e-12 (transformers' own computes in float32
    there); bfloat16: within one bfloat16 rounding of transformers' (which rounds x_hat before the weight)."""
    hf = _random_weights(nn.Sequential(LlamaRMSNorm(64)))[0]
    zoo = normzoo.convert(copy.deepcopy(hf), "rms", compile=False)
    x = torch.randn(8, 5, 64, dtype=torch.float64) * 3 + 0.5
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * hf.weight.double()
    with torch.no_grad():
        assert (copy.deepcopy(zoo).double()(x) - want).abs().max().item() < 1e-12
        assert (copy.deepcopy(hf).double()(x) - want).abs().max().item() > 1e-9  # the original upcasts to float32
        a, b = hf.bfloat16()(x.bfloat16()), zoo.bfloat16()(x.bfloat16())
    assert a.dtype == b.dtype == torch.bfloat16
    v = torch.maximum(a.float().abs(), b.float().abs()).clamp_min(1e-30)
    ulps = (a.float() - b.float()).abs() / torch.exp2(torch.floor(torch.log2(v)) - 7)
    assert ulps.max().item() <= 1.0


def test_foreign_layer_norm_is_recognized_with_and_without_bias():
    for bias in (True, False):
        model = _random_weights(TinyDecoder(functools.partial(Fp32LayerNorm, bias=bias)))
        if bias:
            with torch.no_grad():
                model.norm.bias.normal_()
        original = copy.deepcopy(model)
        normzoo.convert(model, "ln", compile=False)
        assert type(model.norm) is normzoo.LayerNorm and model.norm.eps == 1e-5
        assert (model.norm.bias is not None) == bias
        assert list(model.state_dict()) == list(original.state_dict())
        ids = torch.randint(0, 32, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(model(ids), original(ids), rtol=1e-5, atol=1e-5)


def test_gemma_rms_norm_is_refused_naming_the_class_and_the_reason():
    model = TinyDecoder(GemmaRMSNorm)
    with pytest.raises(normzoo.ConversionError, match=r"^input_layernorm: cannot replace GemmaRMSNorm\(16\): it "
                                                      r"computes .*\(1 \+ weight\).*Gemma"):
        normzoo.convert(model, "rms")
    assert type(model.norm) is GemmaRMSNorm  # untouched


def test_foreign_norms_fill_slots_like_their_family():
    with pytest.raises(normzoo.ConversionError, match=r"^input_layernorm: cannot replace LlamaRMSNorm\(16\) with "
                                                      r"preset 'gn32'.*normalizes the last dim"):
        normzoo.convert(TinyDecoder(), "gn32")
    model = normzoo.convert(TinyDecoder(), "ln", compile=False)  # cross family: the preset's eps
    assert type(model.norm) is normzoo.LayerNorm and model.norm.eps == 1e-5
    layer = normzoo.convert(LlamaRMSNorm(8, eps=1e-4), "rms", compile=False)  # the model itself
    assert type(layer) is normzoo.RMSNorm and layer.eps == 1e-4
    hooked = TinyDecoder()
    hooked.norm.register_forward_hook(lambda *a: None)
    with pytest.raises(normzoo.ConversionError, match=r"^norm: cannot replace LlamaRMSNorm\(16\): it has forward hooks"):
        normzoo.convert(hooked, "rms")


def test_recognize_norm_probes_rather_than_trusts_names():
    assert recognize_norm(LlamaRMSNorm(8))[0] is not None
    stand_in, why = recognize_norm(HardcodedEpsRMSNorm(8))
    assert stand_in is None and "neither RMSNorm's nor LayerNorm's" in why
    assert recognize_norm(ScaledNorm(8))[0] is None
    assert recognize_norm(nn.Linear(4, 4))[1].startswith("a torch or normzoo module")
    assert "no 1-D weight" in recognize_norm(OlmoLayerNorm(8))[1]


# ------------------------------------------------------------------------------- never skip a norm silently


class OlmoLayerNorm(nn.Module):
    """A parameter-free LayerNorm with a hard-coded eps (as transformers' OlmoLayerNorm): no weight to probe."""

    def __init__(self, d):
        super().__init__()
        self.normalized_shape = (d,)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, None, None, eps=1e-5).type_as(x)


def test_unreplaced_norms_are_reported_and_strict_makes_it_an_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.LocalResponseNorm(2),
                          nn.Sequential(ScaledNorm(8)), OlmoLayerNorm(8))
    before = [type(m) for m in model.modules()]
    with pytest.raises(normzoo.ConversionError, match=r"left 3 module\(s\) that look like norms.*2 \(LocalResponseNorm"
                                                      r".*3\.0 \(ScaledNorm: its forward is neither.*4 \(OlmoLayerNorm"
                                                      r".*strict=True; nothing was replaced"):
        normzoo.convert(model, "bn", strict=True)
    assert [type(m) for m in model.modules()] == before
    with pytest.warns(normzoo.ConversionWarning, match=r"left 3 module\(s\).*Pass strict=True"):
        normzoo.convert(model, "bn", compile=False)
    assert type(model[1]) is normzoo.BatchNorm2d and type(model[2]) is nn.LocalResponseNorm


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern (see tests/test_convert.py)."""

    def __init__(self, c, act_layer=nn.Hardswish):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def test_no_report_on_replaced_norms_normzoo_layers_or_unrelated_modules():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), BatchNormAct2d(8), BatchNormAct2d(8, nn.SiLU), nn.ReLU(), nn.Dropout(0.1),
        nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 1)),
        nn.utils.parametrizations.spectral_norm(nn.Conv2d(8, 8, 1)), nn.GELU(), nn.PReLU(8),
        nn.Flatten(), nn.LazyLinear(4), nn.Embedding(4, 4), nn.PairwiseDistance(), nn.Identity())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normzoo.convert(model, "bn", compile=False)
        assert isinstance(model[1], NormAct) and model[2].activation == "silu"
        normzoo.convert(model, "bn", compile=False, strict=True)  # again: normzoo's layers and NormAct
        normzoo.convert(TinyDecoder(), "rms", compile=False, strict=True)
    assert not any(looks_like_norm(m) for m in (nn.Linear(2, 2), nn.Embedding(2, 2), nn.SiLU(), nn.Dropout(),
                                                 NormAct(nn.BatchNorm2d(2)), normzoo.RMSNorm(4, compile=False)))
    assert all(looks_like_norm(m) for m in (nn.LocalResponseNorm(2), GemmaRMSNorm(4), OlmoLayerNorm(4)))


def test_probing_leaves_the_random_stream_alone():
    model = nn.Sequential(TinyDecoder(), ScaledNorm(8))
    torch.manual_seed(3)
    with pytest.warns(normzoo.ConversionWarning):
        normzoo.convert(model, "rms", compile=False)
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))
