"""normzoo.convert (every preset over small models) and FrozenBatchNorm2d."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normzoo
from normzoo import registry
from normzoo.convert import NormAct, is_norm_layer

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


# ------------------------------------------------------------------ fidelity: hyperparameters, subclasses, refusals


class BatchNormAct2d(nn.BatchNorm2d):
    """Stand-in for timm's BatchNormAct2d (timm/layers/norm_act.py): a BatchNorm2d subclass whose forward is a copy
    of BatchNorm2d's followed by self.drop and self.act."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, act_layer=nn.ReLU, act_kwargs=None, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(**(act_kwargs or {})) if act_layer is not None else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        x = nn.functional.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, use_batch, factor, self.eps)
        return self.act(self.drop(x))


class GroupNormAct(nn.GroupNorm):
    """Stand-in for timm's GroupNormAct: GroupNorm, then drop, then act."""

    def __init__(self, num_channels, num_groups=4, act_layer=nn.SiLU):
        super().__init__(num_groups, num_channels)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


class FastGroupNorm(nn.GroupNorm):
    """Stand-in for timm's GroupNorm / LayerNorm: its own forward, computing exactly the base class's."""

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ScaledBatchNorm(nn.BatchNorm2d):
    """An unrecognizable forward: the norm times 2."""

    def forward(self, x):
        return super().forward(x) * 2


class BatchNormWithGate(nn.BatchNorm2d):
    """A child convert() does not know (not drop / act)."""

    def __init__(self, c):
        super().__init__(c)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return super().forward(x) * self.gate(x)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """timm's LayerNorm2d forward under a name not in CHANNELS_FIRST_LAYER_NORMS: convert() does not guess what a
    LayerNorm subclass computes from its forward, so it probes it as a LayerNorm over the last dim, which fails."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if is_norm_layer(m):
                for t in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if t is not None:
                        t.uniform_(0.5, 1.5)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return model


def _assert_same_model(converted, original, x, steps=2):
    """Same outputs (train, then eval) and the same running statistics after training steps, in float64."""
    converted.train(), original.train()
    for step in range(steps):
        torch.manual_seed(step)  # the same dropout masks on both sides
        a = converted(x)
        torch.manual_seed(step)
        b = original(x)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    sa, sb = converted.state_dict(), original.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sb:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-12, atol=1e-12, msg=key)
    converted.eval(), original.eval()
    torch.testing.assert_close(converted(x), original(x), rtol=1e-12, atol=1e-12)


ACTS = {  # name -> (activation module factory, the fused activation normzoo should make of it, or None)
    "relu_inplace": (lambda: nn.ReLU(inplace=True), "relu"),
    "relu": (nn.ReLU, "relu"),
    "silu_inplace": (lambda: nn.SiLU(inplace=True), "silu"),
    "gelu": (nn.GELU, "gelu"),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
    "hardswish": (nn.Hardswish, None),
    "prelu": (lambda: nn.PReLU(init=0.3), None),
    "identity": (None, None),
}


@pytest.mark.parametrize("act", list(ACTS))
def test_batchnorm_act_subclass_is_converted_faithfully(act):
    """timm's BatchNormAct2d pattern with MobileNetV3's eps=1e-3, momentum=0.01: the activation is fused where
    normzoo has it, else kept as a module after the norm; outputs, running statistics and state_dict keys are the
    original's (float64, train and eval)."""
    factory, fused = ACTS[act]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8, eps=1e-3, momentum=0.01,
                                                                         act_layer=factory),
                          nn.Conv2d(8, 4, 1)).double()
    _randomize(model)
    original = copy.deepcopy(model)
    normzoo.convert(model, "bn", compile=False)
    new = model[1]
    norm = new.norm if isinstance(new, NormAct) else new
    assert type(norm) is normzoo.BatchNorm2d and (norm.eps, norm.momentum) == (1e-3, 0.01)
    if factory is None or fused is not None:
        assert type(new) is normzoo.BatchNorm2d and new.activation == fused
    else:
        assert isinstance(new, NormAct) and type(new.act) is type(original[1].act)
    _assert_same_model(model, original, torch.randn(4, 3, 6, 6, dtype=torch.float64))
    original.load_state_dict(model.state_dict())  # checkpoints load both ways
    model.load_state_dict(original.state_dict())


def test_dropout_between_norm_and_activation_stays():
    """Dropout (or drop-path) between the norm and the activation: nothing can be fused, both stay as modules in
    the replaced layer's order, and dropout still drops (the same masks for the same seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=lambda: nn.Dropout(0.5))).double()
    _randomize(model)
    original = copy.deepcopy(model)
    normzoo.convert(model, "bn", compile=False)
    new = model[1]
    assert isinstance(new, NormAct) and list(dict(new.named_children())) == ["norm", "drop", "act"]
    assert new.norm.activation is None and isinstance(new.drop, nn.Dropout) and isinstance(new.act, nn.SiLU)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    _assert_same_model(model, original, x)
    model.train()
    assert (model(x) == 0).any()  # the dropout is there, and on
    assert list(model.state_dict()) == list(original.state_dict())


def test_norm_act_state_dict_keys_are_the_replaced_layers():
    """NormAct's state_dict reads as the layer it replaced (PReLU's weight under act.), loads strict from the
    original and from its own nested form, and keeps the norm's version metadata."""
    layer = BatchNormAct2d(6, act_layer=nn.PReLU)
    new = normzoo.convert(copy.deepcopy(layer), "bn", compile=False)
    assert isinstance(new, NormAct)
    assert list(new.state_dict()) == list(layer.state_dict()) == \
        ["weight", "bias", "running_mean", "running_var", "num_batches_tracked", "act.weight"]
    assert new.state_dict()._metadata[""]["version"] == 2
    assert [n for n, _ in new.named_parameters()] == ["norm.weight", "norm.bias", "act.weight"]
    with torch.no_grad():
        layer.running_mean.fill_(0.25)
        layer.act.weight.fill_(0.5)
    new.load_state_dict(layer.state_dict())
    assert torch.equal(new.norm.running_mean, layer.running_mean) and new.act.weight.item() == 0.5
    nested = {("norm." + k if not k.startswith("act.") else k): v for k, v in layer.state_dict().items()}
    new.load_state_dict(nested)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        new.load_state_dict({**layer.state_dict(), "extra": torch.zeros(1)})
    again = copy.deepcopy(new)
    assert list(again.state_dict()) == list(layer.state_dict())


def test_group_norm_act_subclass_and_equal_forward_subclass():
    """timm's GroupNormAct (SiLU, fused) and a GroupNorm subclass whose own forward computes GroupNorm's (as
    timm's GroupNorm and LayerNorm do): converted with eps kept and the preset's groups; each slot converted with
    its own group count computes what it did (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), GroupNormAct(8, num_groups=4, act_layer=nn.SiLU), nn.Conv2d(8, 8, 1),
                          FastGroupNorm(2, 8, eps=1e-6)).double()
    _randomize(model)
    original = copy.deepcopy(model)
    normzoo.convert(model, "gn8", compile=False)
    assert type(model[1]) is normzoo.GroupNorm and model[1].activation == "silu" and model[1].num_groups == 8
    assert type(model[3]) is normzoo.GroupNorm and model[3].eps == 1e-6 and model[3].activation is None
    model = copy.deepcopy(original)
    model[1] = normzoo.convert(model[1], {"type": "group_norm", "num_groups": 4}, compile=False)  # a root layer
    model[3] = normzoo.convert(model[3], {"type": "group_norm", "num_groups": 2}, compile=False)
    _assert_same_model(model, original, torch.randn(3, 3, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("subclass, why", [
    (lambda: ScaledBatchNorm(8), r"ScaledBatchNorm overrides BatchNorm2d.forward with a computation convert\(\) "
                                 r"does not recognize .*differs"),
    (lambda: BatchNormWithGate(8), r"BatchNormWithGate overrides BatchNorm2d.forward and has child modules "
                                   r"\['gate'\]"),
    (lambda: ChannelsFirstLayerNorm(8), r"ChannelsFirstLayerNorm overrides LayerNorm.forward .*raised RuntimeError"),
])
def test_unrecognized_subclass_is_refused_naming_it(subclass, why):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(subclass()), nn.BatchNorm2d(8))
    before = [m for _, m in norm_layers(model)]
    presets = ["ln", "gn1"] if isinstance(before[0], nn.LayerNorm) else ["bn", "gn1"]
    for preset in presets:
        with pytest.raises(normzoo.ConversionError, match=r"^1\.0: cannot replace \w+\(8\): " + why):
            normzoo.convert(model, preset, compile=False)
    assert [m for _, m in norm_layers(model)] == before, "a refused convert changed the model"


def test_layer_with_hooks_is_refused():
    bn = nn.BatchNorm2d(4)
    bn.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(normzoo.ConversionError, match="forward hooks, which the new layer would not run"):
        normzoo.convert(nn.Sequential(bn), "bn")


@pytest.mark.parametrize("preset", ["bn", "frozen_bn", "sync_bn"])
def test_same_family_keeps_eps_and_momentum(preset):
    """MobileNetV3's BatchNorm (eps=1e-3, momentum=0.01): outputs and running statistics after training steps are
    the original's (float64); frozen_bn keeps eps and equals the original's eval output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3, momentum=0.01), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8, eps=1e-3, momentum=None, affine=False)).double()
    _randomize(model)
    original = copy.deepcopy(model)
    normzoo.convert(model, preset, compile=False)
    assert model[1].eps == 1e-3 and model[4].eps == 1e-3
    x = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    if preset == "frozen_bn":
        original.eval()
        torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
        return
    assert (model[1].momentum, model[4].momentum, model[4].affine) == (0.01, None, False)
    _assert_same_model(model, original, x, steps=3)


def test_vit_layer_norm_eps_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16, eps=1e-6), nn.Linear(16, 16),
                          nn.LayerNorm(16, eps=1e-6, bias=False)).double()
    _randomize(model)
    original = copy.deepcopy(model)
    normzoo.convert(model, "ln", compile=False)
    assert [(m.eps, m.bias is None) for m in (model[1], model[3])] == [(1e-6, False), (1e-6, True)]
    x = torch.randn(2, 7, 5, dtype=torch.float64) * 0.01  # small activations: eps matters
    _assert_same_model(model, original, x)


def test_overrides_win_and_cross_family_takes_the_preset():
    def mobilenet_bn():
        return nn.Sequential(nn.BatchNorm2d(32, eps=1e-3, momentum=0.01, affine=False))

    model = normzoo.convert(mobilenet_bn(), "bn", eps=1e-5, compile=False)
    assert (model[0].eps, model[0].momentum, model[0].affine) == (1e-5, 0.01, False)
    model = normzoo.convert(mobilenet_bn(), "gn32", compile=False)  # cross family: the preset's values
    assert (model[0].eps, model[0].affine) == (1e-5, True)
    model = normzoo.convert(mobilenet_bn(), normzoo.BatchNorm2d, compile=False)  # a zoo class: same family rule
    assert (model[0].eps, model[0].momentum, model[0].affine) == (1e-3, 0.01, False)
    model = normzoo.convert(nn.Sequential(nn.GroupNorm(4, 8, bias=False)), "in", compile=False)
    assert model[0].bias is None and list(model[0].state_dict()) == ["weight"] and model[0].num_groups == 8


def test_what_a_new_layer_cannot_keep_is_refused():
    with pytest.raises(normzoo.ConversionError, match=r"^0: .*InstanceNorm2d\(track_running_stats=True\) is not "
                                                      r"supported"):
        normzoo.convert(nn.Sequential(nn.InstanceNorm2d(4, track_running_stats=True)), "instance_norm")
    with pytest.raises(normzoo.ConversionError, match=r"^0: .*no running statistics .*none to freeze"):
        normzoo.convert(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)), "frozen_bn")


def test_activations_are_kept_across_families_and_conflicts_refused():
    zoo = nn.Sequential(normzoo.BatchNorm2d(8, activation="silu", compile=False))
    normzoo.convert(zoo, "gn1", compile=False)
    assert type(zoo[0]) is normzoo.GroupNorm and zoo[0].activation == "silu"
    normzoo.convert(zoo, lambda c: nn.GroupNorm(2, c))  # a callable cannot fuse: the activation follows it
    assert isinstance(zoo[0], NormAct) and type(zoo[0].norm) is nn.GroupNorm and isinstance(zoo[0].act, nn.SiLU)
    timm_like = nn.Sequential(BatchNormAct2d(8, act_layer=nn.ReLU))
    normzoo.convert(timm_like, "bn_relu", compile=False)  # the same activation: once
    assert timm_like[0].activation == "relu"
    with pytest.raises(normzoo.ConversionError, match=r"already applies silu after the norm.*activation='relu'"):
        normzoo.convert(nn.Sequential(BatchNormAct2d(8, act_layer=nn.SiLU)), "bn_relu")
    with pytest.raises(normzoo.ConversionError, match=r"already applies silu after the norm.*activation='gelu'"):
        normzoo.convert(nn.Sequential(normzoo.BatchNorm2d(8, activation="silu")), "bn", activation="gelu")


def test_callable_spec_keeps_the_activation_module():
    """A spec that cannot fuse (any callable): the subclass's own activation module stays after the new norm."""
    layer = BatchNormAct2d(8, act_layer=nn.ReLU, act_kwargs={"inplace": True})
    new = normzoo.convert(nn.Sequential(layer), lambda c: nn.BatchNorm2d(c))[0]
    assert isinstance(new, NormAct) and new.act is layer.act and type(new.norm) is nn.BatchNorm2d


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
    assert type(normzoo.convert(LayerNorm2d(8), "frozen_bn", compile=False)) is normzoo.FrozenBatchNorm2d
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
    with pytest.raises(normzoo.ConversionError, match=r"^1: cannot replace LayerNorm2d\(8\): LayerNorm2d is "
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


def test_channels_first_layer_norm_with_children_hooks_or_no_bias_is_refused():
    """A 'LayerNorm2d' with a child module (even one its forward ignores in eval mode), with hooks, or with a weight
    but no bias (LayerNorm2d would add one) is refused naming the problem; the model is left as it was."""
    with_drop = LayerNorm2d(8)
    with_drop.drop = nn.Dropout(0.5)
    model = nn.Sequential(with_drop.eval())
    with pytest.raises(normzoo.ConversionError, match=r"^0: cannot replace LayerNorm2d\(8\): LayerNorm2d is named as "
                                                      r"a channels-first LayerNorm but has child modules \['drop'\]"):
        normzoo.convert(model, "ln2d", compile=False)
    assert model[0] is with_drop
    hooked = LayerNorm2d(8)
    hooked.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(normzoo.ConversionError, match="forward pre hooks"):
        normzoo.convert(nn.Sequential(hooked), "ln2d", compile=False)
    no_bias = LayerNorm2d(8)
    no_bias.register_parameter("bias", None)  # nn.LayerNorm(bias=False)
    for spec in ("ln", "ln2d", normzoo.LayerNorm2d):
        with pytest.raises(normzoo.ConversionError, match=r"no bias \(bias=False\)"):
            normzoo.convert(nn.Sequential(no_bias), spec, compile=False)
    assert type(normzoo.convert(no_bias, "gn1", compile=False)) is normzoo.GroupNorm  # another family: its affine


def test_channels_first_layer_norm_class_spec_keeps_eps_and_affine():
    """normzoo.LayerNorm2d given as a class: the same-family rule, like the ln2d preset."""
    new = normzoo.convert(LayerNorm2d(8, eps=1e-5, affine=False), normzoo.LayerNorm2d, compile=False)
    assert type(new) is normzoo.LayerNorm2d and (new.eps, new.affine) == (1e-5, False)


# ---------------------------------------------------------------------------------------- class specs: families


def test_class_specs_on_channel_slots_are_checked_like_their_family():
    """A class, a partial of one, or a torch.nn class goes through the family rules of its presets: a LayerNorm or
    RMSNorm class (over the last dim) is refused on a channel slot and on a channels-first LayerNorm slot, where it
    would normalize W instead of C."""
    import functools

    last_dim = [normzoo.LayerNorm, functools.partial(normzoo.LayerNorm, eps=1e-6), nn.LayerNorm,
                functools.partial(nn.LayerNorm, elementwise_affine=False), normzoo.RMSNorm, nn.RMSNorm]
    slots = [nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.InstanceNorm2d(8), nn.SyncBatchNorm(8),
             normzoo.BatchNorm2d(8, compile=False), normzoo.FrozenBatchNorm2d(8, compile=False),
             normzoo.LayerNorm2d(8, compile=False), LayerNorm2d(8)]
    for slot in slots:
        model = nn.Sequential(slot)
        for spec in last_dim:
            with pytest.raises(normzoo.ConversionError, match=r"^0: cannot replace \w+\((\d+, )?8\) with "
                                                              r"(partial\()?(normzoo|torch\.nn)\.(Layer|RMS)Norm.*"
                                                              r"normalizes the last dim"):
                normzoo.convert(model, spec)
            assert model[0] is slot
    # a channel class on a last-dim slot: refused as the channel presets are
    with pytest.raises(normzoo.ConversionError, match=r"^0: cannot replace LayerNorm\(8\) with normzoo\.LayerNorm2d"
                                                      r".*normalizes the last dim"):
        normzoo.convert(nn.Sequential(nn.LayerNorm(8)), normzoo.LayerNorm2d)
    with pytest.raises(normzoo.ConversionError, match=r"^0: cannot replace RMSNorm\(8\) with partial\(torch\.nn\."
                                                      r"GroupNorm, 1\).*normalizes the last dim"):
        normzoo.convert(nn.Sequential(nn.RMSNorm(8)), functools.partial(nn.GroupNorm, 1))


def test_class_specs_keep_hyperparameters_within_their_family():
    """Same family: the slot's eps, momentum, affine are kept, for a torch.nn class, a zoo class or a partial (whose
    own values are a preset's: not used); cross family: the class's. A LayerNorm([C, H, W]) slot gives a LayerNorm
    class its whole normalized_shape, and a channel class its C."""
    import functools

    def mobilenet_bn():
        return nn.Sequential(nn.BatchNorm2d(8, eps=1e-3, momentum=0.01, affine=False))

    new = normzoo.convert(mobilenet_bn(), functools.partial(normzoo.BatchNorm2d, eps=0.5, compile=False))[0]
    assert (type(new), new.eps, new.momentum, new.affine) == (normzoo.BatchNorm2d, 1e-3, 0.01, False)
    new = normzoo.convert(nn.Sequential(normzoo.BatchNorm2d(8, eps=1e-3, momentum=None, compile=False)),
                          nn.BatchNorm2d)[0]
    assert (type(new), new.eps, new.momentum) == (nn.BatchNorm2d, 1e-3, None)
    new = normzoo.convert(mobilenet_bn(), functools.partial(normzoo.GroupNorm, num_groups=2, compile=False))[0]
    assert (type(new), new.num_groups, new.num_channels, new.eps, new.affine) == (normzoo.GroupNorm, 2, 8, 1e-5,
                                                                                  True)
    new = normzoo.convert(nn.Sequential(nn.RMSNorm(8, eps=1e-4)), functools.partial(normzoo.RMSNorm, eps=0.5,
                                                                                    compile=False))[0]
    assert (type(new), new.eps) == (normzoo.RMSNorm, 1e-4)
    with pytest.raises(normzoo.ConversionError, match=r"^0: .*no running statistics .*none to freeze"):
        normzoo.convert(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)), normzoo.FrozenBatchNorm2d)

    chw = nn.LayerNorm([8, 4, 4], eps=1e-3).double()
    _randomize_affine(nn.Sequential(chw))
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    want = chw(x)
    new = normzoo.convert(copy.deepcopy(chw), functools.partial(normzoo.LayerNorm, compile=False))
    assert (new.normalized_shape, new.eps) == ((8, 4, 4), 1e-3)
    torch.testing.assert_close(new(x), want, rtol=1e-12, atol=1e-12)
    new = normzoo.convert(copy.deepcopy(chw), functools.partial(normzoo.GroupNorm, num_groups=1, compile=False))
    assert (new.num_groups, new.num_channels) == (1, 8)


def test_unknown_class_spec_is_refused_by_name_a_function_builds_what_it_builds():
    import functools

    class MyNorm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return x

    for spec, name in ((MyNorm, "MyNorm"), (functools.partial(MyNorm), r"partial\(.*MyNorm\)"),
                       (nn.LocalResponseNorm, r"torch\.nn\.LocalResponseNorm")):
        model = nn.Sequential(nn.BatchNorm2d(8))
        with pytest.raises(normzoo.ConversionError, match=rf"^0: cannot replace BatchNorm2d\(8\) with {name}: .*"
                                                          r"not a norm layer class convert\(\) knows"):
            normzoo.convert(model, spec)
        assert type(model[0]) is nn.BatchNorm2d
    assert type(normzoo.convert(nn.BatchNorm2d(8), lambda c: MyNorm(c))) is MyNorm
