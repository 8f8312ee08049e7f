"""normzoo.convert (every preset over small models) and FrozenBatchNorm2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normzoo
from normzoo import registry
from normzoo.convert import is_norm_layer

CHANNEL_FAMILIES = {  # preset type -> the class it must become on a 2d channel slot of the CNN below
    "group_norm": normzoo.GroupNorm,
    "batch_norm": normzoo.BatchNorm2d, "batch_norm1d": normzoo.BatchNorm2d, "batch_norm2d": normzoo.BatchNorm2d,
    "batch_norm3d": normzoo.BatchNorm2d,
    "instance_norm": normzoo.InstanceNorm2d, "instance_norm1d": normzoo.InstanceNorm2d,
    "instance_norm2d": normzoo.InstanceNorm2d, "instance_norm3d": normzoo.InstanceNorm2d,
    "frozen_batch_norm": normzoo.FrozenBatchNorm2d,
    "sync_batch_norm": normzoo.SyncBatchNorm,
    "layer_norm2d": normzoo.LayerNorm2d,
}
LAST_DIM_FAMILIES = {"layer_norm": normzoo.LayerNorm, "rms_norm": normzoo.RMSNorm}


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.GroupNorm(4, c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def small_cnn():
    """A torch.nn CNN holding BatchNorm2d, GroupNorm, InstanceNorm2d, SyncBatchNorm and normzoo layers."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Sequential(Block(32), Block(32)),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.InstanceNorm2d(64, affine=True), nn.ReLU(),
        nn.Conv2d(64, 64, 1), nn.SyncBatchNorm(64), normzoo.GroupNorm(8, 64, compile=False),
        normzoo.BatchNorm2d(64, compile=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def norm_layers(model):
    return [(name, m) for name, m in model.named_modules() if is_norm_layer(m)]


@pytest.mark.parametrize("preset", normzoo.available())
def test_every_preset_over_a_cnn(preset):
    """Every preset replaces every norm of the CNN by its own class (its slot's dimensionality), and the model
    runs forward and backward; presets over the last dim refuse channel slots, naming the path."""
    model = small_cnn()
    before = norm_layers(model)
    assert len(before) == 9
    kind = registry.resolve_spec(preset)["type"]
    if kind in LAST_DIM_FAMILIES:
        with pytest.raises(normzoo.ConversionError, match=r"^1: cannot replace BatchNorm2d\(32\) .*'ln2d'.*'gn1'"):
            normzoo.convert(model, preset, compile=False)
        assert [m for _, m in norm_layers(model)] == [m for _, m in before], "a failed convert changed the model"
        return
    out = normzoo.convert(model, preset, compile=False)
    assert out is model
    after = norm_layers(model)
    assert [n for n, _ in after] == [n for n, _ in before]
    for (name, new), (_, old) in zip(after, before):
        assert type(new) is CHANNEL_FAMILIES[kind], f"{name}: {type(new).__name__}"
        assert getattr(new, "num_channels", getattr(new, "num_features", None)) == \
            getattr(old, "num_channels", getattr(old, "num_features", None))
        if kind == "group_norm" and "num_groups" in registry.resolve_spec(preset):
            assert new.num_groups == registry.resolve_spec(preset)["num_groups"]
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_affine_and_running_stats_carried_over_and_mode_kept():
    model = small_cnn()
    with torch.no_grad():
        for _, m in norm_layers(model):
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(5)
    model[3][0].bn1.eval()
    before = {n: copy.deepcopy(m) for n, m in norm_layers(model)}
    normzoo.convert(model, "bn", compile=False)
    for name, new in norm_layers(model):
        old = before[name]
        torch.testing.assert_close(new.weight.detach(), old.weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(new.bias.detach(), old.bias.detach(), rtol=0, atol=0)
        if getattr(old, "running_mean", None) is not None:
            torch.testing.assert_close(new.running_mean, old.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(new.running_var, old.running_var, rtol=0, atol=0)
            assert int(new.num_batches_tracked) == 5
        else:  # GroupNorm / InstanceNorm slots have no statistics: BatchNorm starts fresh
            assert torch.equal(new.running_mean, torch.zeros(new.num_features))
        assert new.training == old.training, name
        assert isinstance(new.weight, nn.Parameter)


def test_frozen_conversion_keeps_the_eval_function():
    """BatchNorm in eval == FrozenBatchNorm2d made from it by convert, in train and in eval."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 9, 9) * 2 + 1)  # give the running statistics something to hold
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    normzoo.convert(model, "frozen_bn", compile=False)
    assert all(isinstance(m, normzoo.FrozenBatchNorm2d) for _, m in norm_layers(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.train()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(p, nn.Parameter) for m in model.modules()
                   if isinstance(m, normzoo.FrozenBatchNorm2d) for p in m.parameters(recurse=False))


def test_group_norm_error_names_the_path_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32),
                          nn.Sequential(nn.Conv2d(32, 48, 1), nn.Sequential(nn.Identity(), nn.BatchNorm2d(48))))
    original = [m for _, m in norm_layers(model)]
    with pytest.raises(normzoo.ConversionError,
                       match=r"^2\.1\.1: cannot replace BatchNorm2d\(48\) with preset 'gn32'.*divisible by num_groups "
                             r"\(32\)") as info:
        normzoo.convert(model, "gn32")
    assert isinstance(info.value, ValueError)
    assert [m for _, m in norm_layers(model)] == original


def test_unknown_preset_is_a_preset_error():
    with pytest.raises(registry.PresetError, match="unknown norm preset 'gn33'"):
        normzoo.convert(small_cnn(), "gn33")


class TinyTransformer(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU())
        self.ln2 = normzoo.LayerNorm(d, compile=False)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.ln1(self.embed(x))
        return self.head(self.ln2(h + self.mlp(h)))


@pytest.mark.parametrize("preset", normzoo.available())
def test_every_preset_over_a_layer_norm_model(preset):
    """LayerNorm slots (features last) take layer_norm and rms_norm presets, with the weight carried over; channel
    presets (ln2d too) raise naming the path instead of normalizing the wrong dim."""
    model = TinyTransformer()
    with torch.no_grad():
        model.ln1.weight.uniform_(0.5, 1.5)
    weight = model.ln1.weight.detach().clone()
    kind = registry.resolve_spec(preset)["type"]
    if kind not in LAST_DIM_FAMILIES:
        with pytest.raises(normzoo.ConversionError, match=r"^ln1: cannot replace LayerNorm\(32\) .*last dim"):
            normzoo.convert(model, preset, compile=False)
        return
    normzoo.convert(model, preset, compile=False)
    assert type(model.ln1) is LAST_DIM_FAMILIES[kind] and model.ln1.normalized_shape == (32,)
    torch.testing.assert_close(model.ln1.weight.detach(), weight, rtol=0, atol=0)
    model(torch.randn(2, 5, 8)).sum().backward()


def test_slot_dimensionality_and_channels_first_layer_norm():
    model = nn.Sequential(nn.BatchNorm1d(6), nn.BatchNorm3d(6), nn.InstanceNorm1d(6), nn.LayerNorm([6, 4, 4]))
    normzoo.convert(model, "bn", compile=False)
    assert [type(m) for m in model] == [normzoo.BatchNorm1d, normzoo.BatchNorm3d, normzoo.BatchNorm1d,
                                        normzoo.BatchNorm2d]
    model = nn.Sequential(nn.BatchNorm1d(6), nn.BatchNorm3d(6), nn.LayerNorm([6, 4, 4]))
    normzoo.convert(model, "instance_norm", compile=False)
    assert [type(m) for m in model] == [normzoo.InstanceNorm1d, normzoo.InstanceNorm3d, normzoo.InstanceNorm2d]
    # LayerNorm([C, H, W]) -> gn1: the same statistics; the (C, H, W) affine does not fit a per-channel one
    ln = nn.LayerNorm([6, 4, 4])
    gn = normzoo.convert(ln, "gn1", compile=False)
    assert isinstance(gn, normzoo.GroupNorm) and gn.num_channels == 6
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(gn(x), ln(x), rtol=1e-5, atol=1e-5)


def test_dtype_device_and_root_layer():
    bn = nn.BatchNorm2d(4, dtype=torch.float64)
    new = normzoo.convert(bn, "gn1", compile=False)
    assert isinstance(new, normzoo.GroupNorm) and new.weight.dtype == torch.float64
    model = nn.Sequential(nn.Conv2d(2, 4, 1).double(), nn.InstanceNorm2d(4))  # no own tensors: follow the model
    normzoo.convert(model, "gn1", compile=False)
    assert model[1].weight.dtype == torch.float64


def test_class_and_dict_specs():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16))
    normzoo.convert(model, normzoo.GroupNorm, num_groups=4, compile=False)
    assert isinstance(model[1], normzoo.GroupNorm) and model[1].num_groups == 4
    normzoo.convert(model, {"type": "group_norm", "group_size": 8}, compile=False)
    assert model[1].num_groups == 2
    normzoo.convert(model, lambda c: nn.GroupNorm(2, c))
    assert type(model[1]) is nn.GroupNorm


# ----------------------------------------------------------------------------------------- FrozenBatchNorm2d


def test_frozen_matches_batchnorm_eval_and_torchvision_formula():
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.1, 3)
    bn.num_batches_tracked.fill_(9)
    frozen = normzoo.FrozenBatchNorm2d(5, compile=False)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked accepted and ignored, as torchvision
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    # torchvision.ops.misc.FrozenBatchNorm2d's formula
    scale = frozen.weight.double() * (frozen.running_var.double() + frozen.eps).rsqrt()
    shift = frozen.bias.double() - frozen.running_mean.double() * scale
    expected = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    xf = x.float()
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(xf).double(), expected, rtol=1e-5, atol=1e-5)
    bn.eval()
    torch.testing.assert_close(frozen(xf), bn(xf), rtol=1e-5, atol=1e-5)
    before = frozen.running_mean.clone()
    frozen.train()
    frozen(xf * 10)
    assert torch.equal(frozen.running_mean, before)  # never updated


def test_frozen_gradient_flows_to_input_only():
    frozen = normzoo.FrozenBatchNorm2d(3, compile=False)
    with torch.no_grad():
        frozen.running_var.fill_(4.0)
        frozen.weight.fill_(2.0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    frozen(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0 / (4.0 + 1e-5) ** 0.5))


def test_frozen_errors_repr_and_engine_path(monkeypatch):
    frozen = normzoo.FrozenBatchNorm2d(4, eps=1e-3, compile=False)
    assert repr(frozen) == "FrozenBatchNorm2d(4, eps=0.001, compile=False)"
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d\(4\) expects input of shape \(N, 4, \*\), got \(2, 3\)"):
        frozen(torch.randn(2, 3))

    def refuse(*args, **kwargs):
        raise AssertionError("torch's batch_norm was called")

    monkeypatch.setattr(torch.nn.functional, "batch_norm", refuse)
    monkeypatch.setattr(torch, "batch_norm", refuse)
    frozen(torch.randn(2, 4, 3, 3))


def test_frozen_preset_and_convert_shortcut():
    layer = normzoo.build("frozen_bn", 7)
    assert isinstance(layer, normzoo.FrozenBatchNorm2d) and layer.num_features == 7
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4))
    out = normzoo.FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    assert isinstance(out[1], normzoo.FrozenBatchNorm2d)


# ------------------------------------------------------------------------------- RMSNorm and LayerNorm2d slots


class LayerNorm2d(nn.LayerNorm):
    """A stand-in for timm's LayerNorm2d (ConvNeXt): a torch.nn.LayerNorm subclass that permutes to normalize C."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8, eps=1e-6):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = LayerNorm2d(c, eps=eps)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pw(self.norm(self.dw(x)))


def _randomize_affine(model):
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "weight", None) is not None and is_norm_layer(m):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-1, 1)


@pytest.mark.parametrize("preset", ["ln", "ln2d", "layer_norm2d"])
def test_channels_first_layer_norm_slot_becomes_layer_norm2d(preset):
    """A LayerNorm2d slot (timm-style subclass) filled with ln or ln2d: normzoo.LayerNorm2d with the slot's eps,
    affine and weights, computing what the model computed (float64 model, eager engine)."""
    model = nn.Sequential(ConvNeXtBlock(8, eps=1e-5), ConvNeXtBlock(8)).double()
    _randomize_affine(model)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    want = model(x)
    normzoo.convert(model, preset, compile=False)
    for block, eps in zip(model, (1e-5, 1e-6)):
        assert type(block.norm) is normzoo.LayerNorm2d and block.norm.eps == eps and block.norm.num_channels == 8
        assert block.norm.weight.dtype == torch.float64
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), want, rtol=1e-12, atol=1e-12)


def test_channels_first_layer_norm_slot_other_presets():
    """Channel presets take C channels; rms (last dim) is refused, naming the path; affine=False is kept."""
    model = ConvNeXtBlock(8)
    normzoo.convert(model, "gn1", compile=False)
    assert type(model.norm) is normzoo.GroupNorm and model.norm.num_channels == 8
    model = ConvNeXtBlock(8)
    normzoo.convert(model, "bn", compile=False)
    assert type(model.norm) is normzoo.BatchNorm2d
    model = ConvNeXtBlock(8)
    with pytest.raises(normzoo.ConversionError, match=r"^norm: cannot replace LayerNorm2d\(8\) with preset 'rms'.*"
                                                      r"normalizes the last dim.*'ln2d'"):
        normzoo.convert(model, "rms", compile=False)
    assert type(model.norm) is LayerNorm2d
    bare = normzoo.convert(LayerNorm2d(8, affine=False), "ln", compile=False)
    assert type(bare) is normzoo.LayerNorm2d and not bare.affine and bare.weight is None
    assert normzoo.convert(LayerNorm2d(8), "ln", eps=1e-3, compile=False).eps == 1e-3  # the call overrides
    # normzoo's own LayerNorm2d is a channels-first slot too; ln2d fills channel slots
    assert type(normzoo.convert(normzoo.LayerNorm2d(8), "ln", compile=False)) is normzoo.LayerNorm2d
    new = normzoo.convert(nn.BatchNorm2d(8), "ln2d", compile=False)
    assert type(new) is normzoo.LayerNorm2d and new.eps == 1e-6  # another family: the preset's eps


def test_misnamed_channels_first_layer_norm_is_refused():
    """The name alone does not decide: a 'LayerNorm2d' whose forward also applies an activation fails the probe and
    is refused (convert would drop the activation); the model is left as it was."""

    class LayerNorm2d(nn.LayerNorm):  # same name, different function
        def forward(self, x):
            y = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                               self.eps)
            return torch.relu(y.permute(0, 3, 1, 2))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), LayerNorm2d(8))
    with pytest.raises(normzoo.ConversionError, match=r"^1: cannot replace LayerNorm2d\(8\) with preset 'ln'.*"
                                                      r"named as a channels-first LayerNorm.*does not compute"):
        normzoo.convert(model, "ln", compile=False)
    assert type(model[1]) is LayerNorm2d
    with pytest.raises(normzoo.ConversionError, match="named as a channels-first LayerNorm"):
        normzoo.convert(model, normzoo.GroupNorm, num_groups=1)


def test_rms_norm_slots_keep_eps_affine_and_weight():
    """torch.nn.RMSNorm (and normzoo.RMSNorm) slots take rms, keeping eps (None too), elementwise_affine and the
    weight: the converted model computes the same."""
    model = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16, eps=1e-4), nn.Linear(16, 16), nn.RMSNorm(16),
                          nn.Linear(16, 16), nn.RMSNorm(16, elementwise_affine=False),
                          normzoo.RMSNorm(16, eps=1e-6, compile=False)).double()
    _randomize_affine(model)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    want = model(x)
    normzoo.convert(model, "rms", compile=False)
    norms = [model[i] for i in (1, 3, 5, 6)]
    assert all(type(m) is normzoo.RMSNorm for m in norms)
    assert [m.eps for m in norms] == [1e-4, None, None, 1e-6]
    assert [m.elementwise_affine for m in norms] == [True, True, False, True]
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    # ln on an RMSNorm slot is the user's change of family; a channel preset is refused, suggesting rms
    assert type(normzoo.convert(nn.RMSNorm(16), "ln", compile=False)) is normzoo.LayerNorm
    with pytest.raises(normzoo.ConversionError, match=r"cannot replace RMSNorm\(16\).*last dim.*'rms'"):
        normzoo.convert(nn.RMSNorm(16), "ln2d", compile=False)
