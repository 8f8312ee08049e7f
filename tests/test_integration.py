"""normzoo with the real packages: timm, torchvision, Hugging Face transformers. Models are built from code and
configs (pretrained=False, tiny configs), never downloaded.

Marked `integration`, outside the default suite: `python -m pytest -m integration` in an environment made from
requirements-integration.txt (README, "Norms in real models"); .ci/run does that in a second fresh venv. Each test
skips when its package is not installed."""

from __future__ import annotations

import copy
import importlib
import os
import warnings

import pytest
import torch
from torch import nn

import normzoo
from normzoo.convert import NormAct
from normzoo.registry import SlotError

pytestmark = pytest.mark.integration
# .ci/run sets this: there a missing package is a failure, not a skip
REQUIRED = os.environ.get("NORMZOO_INTEGRATION_REQUIRED") == "1"


def _need(name: str):
    return importlib.import_module(name) if REQUIRED else pytest.importorskip(name)


def _timm():
    _need("torchvision")
    return _need("timm")


def _norms(model):
    return [m for m in model.modules() if type(m).__module__.startswith("normzoo.")
            and type(m).__name__ != "NormAct"]


def _no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", normzoo.ConversionWarning)
    return ctx


# ------------------------------------------------------------------------------------------------------ timm


@pytest.mark.parametrize("name,spec,cls", [("resnet18", "gn32", normzoo.GroupNorm),
                                           ("convnext_atto", "ln2d", normzoo.LayerNorm2d),
                                           ("vit_tiny_patch16_224", "ln", normzoo.LayerNorm)])
def test_timm_norm_layer_takes_norm_factory(name, spec, cls):
    timm = _timm()
    kwargs = {"img_size": 32, "patch_size": 8} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10,
                              norm_layer=normzoo.norm_factory(spec, compile=False), **kwargs)
    norms = _norms(model)
    assert norms and all(type(m) is cls for m in norms)
    leftover = [type(m).__name__ for m in model.modules()
                if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m not in norms]
    assert leftover == [], f"norms the factory did not build: {leftover}"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_device_dtype_keywords_reach_the_factory():
    timm = _timm()
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, dtype=torch.float64,
                              norm_layer=normzoo.norm_factory("gn32", compile=False))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert all(m.weight.dtype == torch.float64 for m in _norms(model))


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetx_002", "resnetv2_50", "densenet121"])
def test_timm_norm_act_slots_refuse_the_factory_naming_convert(name):
    """Models whose norms are timm norm + activation layers: refused at construction, never built without their
    activations."""
    timm = _timm()
    with pytest.raises(SlotError, match=r"cannot fill timm's norm \+ activation slots \(get_norm_act_layer with "
                                        r"act_layer=.* in timm\..*normzoo\.convert\(model, 'bn'\)"):
        timm.create_model(name, pretrained=False, norm_layer=normzoo.norm_factory("bn", compile=False))


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetx_002", "mobilenetv3_small_050"])
def test_timm_norm_act_models_convert_keeping_their_activations(name):
    """The way the refusal points to: create_model, then convert(). float64, eval: the same outputs."""
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).double().eval()
    with torch.no_grad():  # non-trivial statistics, so that eval mode uses them
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    ctx = _no_warnings()
    try:
        normzoo.convert(model, "bn", compile=False)
    finally:
        ctx.__exit__(None, None, None)
    assert not [m for m in model.modules() if type(m).__module__.startswith("timm.layers.norm")]
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-9, atol=1e-9)
    if name == "mobilenetv3_small_050":  # Hardswish is no fused activation: it stays a module after the norm
        assert any(isinstance(m, NormAct) for m in model.modules())
    else:  # SiLU / ReLU: fused
        assert any(getattr(m, "activation", None) in ("silu", "relu") for m in _norms(model))


# ------------------------------------------------------------------------------------------------ torchvision


def test_torchvision_norm_layer_takes_norm_factory():
    torchvision = _need("torchvision")
    model = torchvision.models.resnet18(num_classes=10, norm_layer=normzoo.norm_factory("gn32", compile=False))
    assert _norms(model) and all(type(m) is normzoo.GroupNorm for m in _norms(model))
    assert not [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ transformers


def _llama(dtype=torch.float32):
    transformers = _need("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


@pytest.mark.parametrize("compile", [False, True])
def test_llama_rms_norms_are_converted(compile):
    model = _llama()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    hf = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(hf) == 5
    ctx = _no_warnings()
    try:
        normzoo.convert(model, "rms", compile=compile, strict=True)
    finally:
        ctx.__exit__(None, None, None)
    modules = dict(model.named_modules())
    assert all(type(modules[n]) is normzoo.RMSNorm and modules[n].eps == 1e-6 for n in hf)
    assert not [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert list(model.state_dict()) == keys  # checkpoints load both ways
    original.load_state_dict(model.state_dict())
    model.load_state_dict(original.state_dict())
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)


def test_llama_dtype_behaviour_per_layer():
    """float64: the converted norm equals the float64 math to 1e-12 (LlamaRMSNorm computes in float32 even there);
    bfloat16: within one bfloat16 rounding of LlamaRMSNorm's output."""
    hf = _llama().model.norm
    zoo = normzoo.convert(copy.deepcopy(hf), "rms", compile=False)
    x = torch.randn(4, 9, 64, dtype=torch.float64) * 3 + 0.5
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * hf.weight.double()
    with torch.no_grad():
        assert (copy.deepcopy(zoo).double()(x) - want).abs().max().item() < 1e-12
        a, b = copy.deepcopy(hf).bfloat16()(x.bfloat16()), copy.deepcopy(zoo).bfloat16()(x.bfloat16())
    assert a.dtype == b.dtype == torch.bfloat16
    v = torch.maximum(a.float().abs(), b.float().abs()).clamp_min(1e-30)
    assert ((a.float() - b.float()).abs() / torch.exp2(torch.floor(torch.log2(v)) - 7)).max().item() <= 1.0


def test_llama_bfloat16_model_converts_and_stays_close():
    model = _llama(torch.bfloat16)
    original = copy.deepcopy(model)
    normzoo.convert(model, "rms", compile=False)
    assert all(m.weight.dtype == torch.bfloat16 for m in _norms(model))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = model(ids).logits.float(), original(ids).logits.float()
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "t5"])
def test_other_transformers_rms_norms_are_converted(family):
    transformers = _need("transformers")
    if family == "t5":
        config = transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=64)
        model = transformers.T5EncoderModel(config).eval()
        ids = torch.randint(0, 64, (2, 8))
        run = lambda m: m(input_ids=ids).last_hidden_state  # noqa: E731
    else:
        cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
        config = cls[0](hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=128)
        model = cls[1](config).eval()
        ids = torch.randint(0, 128, (2, 8))
        run = lambda m: m(ids).logits  # noqa: E731
    original = copy.deepcopy(model)
    names = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}
    normzoo.convert(model, "rms", compile=False, strict=True)
    assert not [m for m in model.modules() if type(m).__name__ in names], names
    with torch.no_grad():
        torch.testing.assert_close(run(model), run(original), rtol=1e-4, atol=1e-4)


def test_gemma_rms_norm_is_refused():
    transformers = _need("transformers")
    config = transformers.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
    model = transformers.GemmaForCausalLM(config)
    with pytest.raises(normzoo.ConversionError, match=r"cannot replace GemmaRMSNorm\(64\): it computes .*"
                                                      r"\(1 \+ weight\)"):
        normzoo.convert(model, "rms")
    assert any(type(m).__name__ == "GemmaRMSNorm" for m in model.modules())


def test_bert_layer_norms_convert_without_reports():
    transformers = _need("transformers")
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, vocab_size=64)
    model = transformers.BertModel(config).eval()
    original = copy.deepcopy(model)
    normzoo.convert(model, "ln", compile=False, strict=True)
    assert _norms(model) and all(type(m) is normzoo.LayerNorm and m.eps == 1e-12 for m in _norms(model))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, original(ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
