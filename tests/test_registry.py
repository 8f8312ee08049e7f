"""Presets: every one built and run, dict specs, factories, user preset files, and their errors."""

import textwrap

import pytest
import torch

import normzoo
from normzoo import registry
from normzoo.registry import PresetError, PresetFileError

REQUIRED = ["group_norm", "layer_norm", "instance_norm", "batch_norm", "gn32", "gn16", "gn8", "gn1", "in", "ln",
            "bn", "gn32_silu", "gn32_relu", "gn32_gelu", "rms", "rms_norm", "ln2d", "layer_norm2d"]


def _input_for(layer, c):
    if isinstance(layer, (normzoo.LayerNorm, normzoo.RMSNorm)):
        return torch.randn(2, 5, c)
    if type(layer).__name__.endswith("1d"):
        return torch.randn(4, c, 6)
    if type(layer).__name__.endswith("3d"):
        return torch.randn(2, c, 3, 4, 4)
    return torch.randn(2, c, 6, 6)


def test_required_presets_and_aliases_exist():
    names = normzoo.available()
    for name in REQUIRED:
        assert name in names
    for alias, target in [("GN", "group_norm"), ("LN", "ln"), ("IN", "in"), ("BN", "bn")]:
        assert type(normzoo.build(alias, 64)) is type(normzoo.build(target, 64))


@pytest.mark.parametrize("name", normzoo.available())
def test_every_preset_builds_and_runs(name):
    layer = normzoo.build(name, 64, compile=False)
    x = _input_for(layer, 64).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad is not None


def test_gn1_and_in_are_group_norms_with_per_channel_affine():
    gn1, inst = normzoo.build("gn1", 64), normzoo.build("in", 64)
    assert (gn1.num_groups, inst.num_groups) == (1, 64)
    assert gn1.weight.shape == inst.weight.shape == (64,)
    ln = normzoo.build("ln", 768)
    assert isinstance(ln, normzoo.LayerNorm) and ln.normalized_shape == (768,)
    for name in ("rms", "rms_norm"):
        rms = normzoo.build(name, 4096)
        assert isinstance(rms, normzoo.RMSNorm) and rms.normalized_shape == (4096,) and rms.eps is None
    for name in ("ln2d", "layer_norm2d"):
        ln2d = normzoo.build(name, 96)
        assert isinstance(ln2d, normzoo.LayerNorm2d) and (ln2d.num_channels, ln2d.eps, ln2d.affine) == (96, 1e-6, True)
    assert normzoo.norm_factory("ln2d", eps=1e-5)(64).eps == 1e-5
    assert normzoo.build({"type": "rms_norm", "eps": 1e-6, "elementwise_affine": False}, 8).weight is None
    assert isinstance(normzoo.build("bn", 8), normzoo.BatchNorm2d)


def test_dict_specs_overrides_and_factories():
    m = normzoo.build({"type": "group_norm", "num_groups": 8, "eps": 1e-3}, 64)
    assert (m.num_groups, m.eps) == (8, 1e-3)
    assert normzoo.build("gn32", 64, num_groups=4).num_groups == 4
    assert normzoo.build("in", 64, num_groups=2).num_groups == 2  # num_groups replaces the preset's group_size
    assert normzoo.build("gn32", 64, group_size=16).num_groups == 4
    factory = normzoo.norm_factory("bn", momentum=0.01)
    layers = [factory(c) for c in (16, 32)]
    assert [l.num_features for l in layers] == [16, 32] and layers[0].momentum == 0.01
    assert isinstance(normzoo.norm_factory(normzoo.GroupNorm, num_groups=2)(8), normzoo.GroupNorm)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(PresetError, match=r"unknown norm preset 'gn23'.*did you mean.*'gn32'"):
        normzoo.build("gn23", 64)
    with pytest.raises(ValueError, match="unknown norm preset"):
        normzoo.norm_factory("batchnorm2")  # checked when the factory is made, not at the first layer
    with pytest.raises(PresetError, match=r"unknown layer type 'group_nrom'.*did you mean 'group_norm'"):
        normzoo.build({"type": "group_nrom"}, 64)
    with pytest.raises(PresetError, match=r"group_norm takes no argument 'momentum'"):
        normzoo.build("gn32", 64, momentum=0.1)


def test_load_user_presets(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(textwrap.dedent("""\
        gn4_relu:
          type: group_norm
          num_groups: 4
          activation: relu
        my_alias: gn4_relu
    """))
    assert normzoo.load_presets(f) == ["gn4_relu", "my_alias"]
    m = normzoo.build("MY_ALIAS", 8)
    assert (m.num_groups, m.activation) == (4, "relu")


@pytest.mark.parametrize("text, msg", [
    ("a:\n  type: group_norm\n  num_groups: [4\n", r"bad\.yaml: line \d+: not valid YAML"),
    ("- 1\n- 2\n", r"bad\.yaml: line 1: a presets file is a mapping"),
    ("ok:\n  type: layer_norm\nbad:\n  type: group_nrom\n", r"bad\.yaml: line 4: preset 'bad'.*unknown layer type"),
    ("bad:\n  type: group_norm\n  num_groups: 4\n  momentm: 0.1\n",
     r"bad\.yaml: line 4: preset 'bad'.*no argument 'momentm'"),
    ("bad: 3\n", r"bad\.yaml: line 1: preset 'bad'.*a spec is a mapping"),
    ("bad: nowhere\n", r"bad\.yaml: line 1: alias 'bad' names unknown preset 'nowhere'"),
    ("bad:\n  type: layer_norm\n  eps: abc\n", r"bad\.yaml: line 3: preset 'bad'.*eps.*a number.*'abc'"),
    ("bad:\n  type: batch_norm\n  eps: 1e-5\n  momentum: [0.1]\n",
     r"bad\.yaml: line 4: preset 'bad'.*momentum.*a number.*\[0\.1\]"),
])
def test_malformed_preset_file_names_file_and_line(tmp_path, text, msg):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    before = normzoo.available()
    with pytest.raises(PresetFileError, match=msg):
        normzoo.load_presets(f)
    assert normzoo.available() == before  # nothing half-registered


def test_missing_preset_file(tmp_path):
    with pytest.raises(PresetFileError, match="nope.yaml: cannot read presets file"):
        normzoo.load_presets(tmp_path / "nope.yaml")


def test_describe_rows_for_normzoo_list():
    rows = {r["name"]: r for r in registry.describe()}
    assert rows["gn1"]["type"] == "group_norm" and "num_groups=1" in rows["gn1"]["arguments"]
    assert rows["gn"]["description"] == "alias of group_norm"
    assert rows["rms"]["type"] == "rms_norm" and rows["ln2d"]["type"] == "layer_norm2d"


def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-5` as the string "1e-5"; normzoo's loader reads it as YAML 1.2 does."""
    data = registry.load_yaml("a: 1e-5\nb: 1E5\nc: -2e-3\nd: +3e+2\ne: 1.0e-5\nf: 7\ng: 1e\nh: e5\ni: .5e-3\n")
    assert data == {"a": 1e-5, "b": 1e5, "c": -2e-3, "d": 300.0, "e": 1e-5, "f": 7, "g": "1e", "h": "e5", "i": 5e-4}
    assert [type(data[k]) for k in "abcdefgh"] == [float] * 5 + [int, str, str]
    f = tmp_path / "exp.yaml"
    f.write_text("ln_e5:\n  type: layer_norm\n  eps: 1e-5\nbn_e3:\n  type: batch_norm\n  eps: 1E-3\n")
    assert normzoo.load_presets(f) == ["ln_e5", "bn_e3"]
    ln, bn = normzoo.build("ln_e5", 8, compile=False), normzoo.build("bn_e3", 8, compile=False)
    assert type(ln.eps) is float and ln.eps == 1e-5 and type(bn.eps) is float and bn.eps == 1e-3


def test_spec_values_that_are_no_numbers_are_refused():
    with pytest.raises(PresetError, match=r"layer_norm takes eps as a number.*got '1e-5'"):
        normzoo.build({"type": "layer_norm", "eps": "1e-5"}, 8)
    with pytest.raises(PresetError, match=r"spec 'bn': batch_norm takes momentum as a number.*got True"):
        normzoo.build("bn", 8, momentum=True)
    assert normzoo.build("bn", 8, momentum=None, compile=False).momentum is None  # cumulative average
    assert normzoo.build("rms", 8, eps=None, compile=False).eps is None  # the dtype's eps
    with pytest.raises(PresetError, match=r"layer_norm takes eps as a number.*got None"):
        normzoo.build("ln", 8, eps=None)
