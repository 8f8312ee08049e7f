"""Presets: names -> layer specs, YAML loading, build and norm_factory.

A spec is a preset name (case-insensitive), a dict {"type": <layer type>, **constructor kwargs}, a layer class,
or any callable taking num_features (a partial, say).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from . import layers
from .frozen import FrozenBatchNorm2d
from .sync import SyncBatchNorm

# layer type -> (class, the constructor argument that receives num_features)
LAYER_TYPES: dict[str, tuple[type[nn.Module], str]] = {
    "group_norm": (layers.GroupNorm, "num_channels"),
    "layer_norm": (layers.LayerNorm, "normalized_shape"),
    "rms_norm": (layers.RMSNorm, "normalized_shape"),
    "layer_norm2d": (layers.LayerNorm2d, "num_channels"),
    "instance_norm": (layers.InstanceNorm2d, "num_features"),
    "instance_norm1d": (layers.InstanceNorm1d, "num_features"),
    "instance_norm2d": (layers.InstanceNorm2d, "num_features"),
    "instance_norm3d": (layers.InstanceNorm3d, "num_features"),
    "batch_norm": (layers.BatchNorm2d, "num_features"),
    "batch_norm1d": (layers.BatchNorm1d, "num_features"),
    "batch_norm2d": (layers.BatchNorm2d, "num_features"),
    "batch_norm3d": (layers.BatchNorm3d, "num_features"),
    "frozen_batch_norm": (FrozenBatchNorm2d, "num_features"),
    "sync_batch_norm": (SyncBatchNorm, "num_features"),
}
_META_KEYS = ("type", "description")
_NUMBERS = ("eps", "momentum")  # arguments that must be numbers (None where the layer's default is None; momentum)
FEATURES_LAST = ("layer_norm", "rms_norm")  # layer types normalizing the last dim D of (*, D); the rest: C at dim 1


def features_axis(layer_type: str) -> int:
    """The input dim num_features is read from for a layer type: -1 (features last) or 1 (channels first)."""
    return -1 if layer_type in FEATURES_LAST else 1


class PresetError(ValueError):
    """An unknown preset or layer type, or a spec with arguments its layer does not take."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # the spec key at fault, so a file loader can point at its line


class PresetFileError(PresetError):
    """A malformed presets file; the message names the file and the line."""


class YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads numbers with an exponent and no dot (``1e-5``, ``1E5``, ``-2e-3``) as floats,
    as YAML 1.2 does; PyYAML follows YAML 1.1, where they are strings. normzoo reads every YAML file with it."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def load_yaml(text: str) -> Any:
    """The data of a YAML document, read with YamlLoader (safe; 1e-5 is a float). Raises yaml.YAMLError."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


_PRESETS: dict[str, dict[str, Any]] = {}  # lower-case name -> spec dict (aliases resolved at lookup)
_ALIASES: dict[str, str] = {}


def _close(name: str, choices) -> str:
    near = difflib.get_close_matches(name.lower(), list(choices), n=4, cutoff=0.5)
    return f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""


def _check_spec(spec: Mapping, where: str) -> None:
    """Raise PresetError naming `where` if the spec's type or arguments are not ones its layer takes."""
    if not isinstance(spec, Mapping):
        raise PresetError(f"{where}: a spec must be a mapping with a 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in LAYER_TYPES:
        raise PresetError(f"{where}: unknown layer type {kind!r}{_close(str(kind), LAYER_TYPES)}; "
                          f"types: {', '.join(LAYER_TYPES)}", key="type")
    cls, feature_arg = LAYER_TYPES[kind]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", feature_arg)]
    for key in spec:
        if key not in _META_KEYS and key not in allowed:
            raise PresetError(f"{where}: {kind} takes no argument {key!r}{_close(key, allowed)}; "
                              f"it takes {', '.join(allowed)}", key=key)
    for key in _NUMBERS:
        if key not in spec:
            continue
        value = spec[key]
        if value is None and (key == "momentum" or params[key].default is None):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise PresetError(f"{where}: {kind} takes {key} as a number (e.g. {params[key].default or 1e-5}), "
                              f"got {value!r}", key=key)


def register(name: str, spec: Mapping | str, where: str = "register") -> None:
    """Add a preset (a spec dict) or an alias (the name of another preset) under `name`."""
    key = name.lower()
    if isinstance(spec, str):
        _ALIASES[key] = spec.lower()
        _PRESETS.pop(key, None)
    else:
        _check_spec(spec, where)
        _PRESETS[key] = dict(spec)
        _ALIASES.pop(key, None)


def _resolve(name: str) -> dict[str, Any]:
    key, seen = name.lower(), []
    while key in _ALIASES and key not in seen:
        seen.append(key)
        key = _ALIASES[key]
    if key not in _PRESETS:
        raise PresetError(f"unknown norm preset {name!r}{_close(name, available())} "
                          f"(normzoo.available() lists them all)")
    return _PRESETS[key]


def available() -> list[str]:
    """All preset names and aliases, sorted."""
    return sorted(set(_PRESETS) | set(_ALIASES))


def describe() -> list[dict[str, str]]:
    """One row per preset for `normzoo list`: name, type, arguments, description."""
    rows = []
    for name in available():
        spec = _resolve(name)
        args = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in _META_KEYS)
        desc = f"alias of {_ALIASES[name]}" if name in _ALIASES else spec.get("description", "")
        rows.append({"name": name, "type": spec["type"], "arguments": args, "description": desc})
    return rows


def resolve_spec(spec: str | Mapping) -> dict[str, Any]:
    """A spec dict (copied) for a preset name or a dict spec; raises PresetError for bad ones."""
    if isinstance(spec, str):
        return dict(_resolve(spec))
    _check_spec(spec, "spec")
    return dict(spec)


def build(spec, num_features: int, **overrides) -> nn.Module:
    """Build the layer `spec` names for `num_features` channels (the last dim D for layer_norm and rms_norm).

    `overrides` replace the preset's arguments; num_groups and group_size replace each other.
    """
    if not isinstance(spec, (str, Mapping)):
        feature_arg = {cls: arg for cls, arg in LAYER_TYPES.values()}.get(spec_class(spec))
        if feature_arg is not None:  # a zoo class or a partial of one: num_features by name (GroupNorm's first
            # argument is num_groups, which a partial may give by name)
            return spec(**{feature_arg: num_features}, **overrides)
        if callable(spec):
            return spec(num_features, **overrides)
        raise PresetError(f"a norm spec must be a preset name, a dict, a class or a callable; got {spec!r}")
    merged = resolve_spec(spec)
    if "num_groups" in overrides:
        merged.pop("group_size", None)
    if "group_size" in overrides:
        merged.pop("num_groups", None)
    merged.update(overrides)
    _check_spec(merged, f"spec {spec!r}" if isinstance(spec, str) else "spec")
    cls, feature_arg = LAYER_TYPES[merged["type"]]
    kwargs = {k: v for k, v in merged.items() if k not in _META_KEYS}
    return cls(**{feature_arg: num_features}, **kwargs)


def spec_class(spec) -> type | None:
    """The class a class spec or a functools.partial of one builds; None for names, dicts and other callables."""
    while isinstance(spec, functools.partial):
        spec = spec.func
    return spec if isinstance(spec, type) else None


def norm_factory(spec, **overrides) -> Callable[[int], nn.Module]:
    """A callable num_features -> layer, for `norm_layer=` slots in model constructors. Checks the spec now.

    It is ``functools.partial(NormLayer, spec=spec, **overrides)``: the spec travels as a keyword, so timm's
    get_norm_layer (which unbinds a partial and keeps only its keywords) keeps it, and device=/dtype= keywords of
    the call reach the layer. See NormLayer for the norm + activation slots."""
    if isinstance(spec, (str, Mapping)):
        resolve_spec(spec)  # fail at model definition, not at the first layer
    elif not callable(spec):
        raise PresetError(f"a norm spec must be a preset name, a dict, a class or a callable; got {spec!r}")
    factory = functools.partial(NormLayer, spec=spec, **overrides)
    return factory


# ------------------------------------------------------------------------ norm_layer= slots: what norm_factory gives


class SlotError(TypeError):
    """A norm_factory layer was asked to fill a slot it cannot fill as asked: a norm + activation slot whose
    activation it would drop. The message names the slot (the calling module) and what to do instead."""


# Keywords of timm's norm + activation layers (timm/layers/norm_act.py, BatchNormAct2d and kin): a call with any of
# them asks for a norm followed by an activation.
NORM_ACT_KEYWORDS = ("apply_act", "act_layer", "act_kwargs", "inplace", "drop_layer")
_FUSED_BY_NAME = {"relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh"}
_FUSED_BY_CLASS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}


def _slot_caller(depth: int) -> str:
    """' in Class.method (file:line)' for the nearest frame (from `depth` up) that runs inside an nn.Module's
    method (the module whose slot is being filled), else ''."""
    frame = sys._getframe(depth)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and frame.f_code.co_filename != __file__:
            return (f" in {type(owner).__module__}.{type(owner).__qualname__}.{frame.f_code.co_name} "
                    f"({Path(frame.f_code.co_filename).name}:{frame.f_lineno})")
        frame = frame.f_back
    return ""


def _convert_hint(spec) -> str:
    return (f"build the model with its own norm layers, then swap them: model = normzoo.convert(model, {spec!r}) "
            f"(after timm.create_model(...)); convert() keeps each slot's activation, fused where normzoo can")


def _spec_label(spec) -> str:
    return f"normzoo.norm_factory({spec!r})"


def _slot_activation(spec, norm_act: dict, overrides: dict, where: str) -> str | None:
    """The fused activation= a norm + activation call asks for (None: none), or SlotError where normzoo's layer
    would not compute what the slot asks (an activation it cannot fuse, or one it is not told)."""
    asked = ", ".join(f"{k}={v!r}" for k, v in norm_act.items())
    who = f"{_spec_label(spec)} was called as a norm + activation layer ({asked}){where}"
    if norm_act.get("drop_layer") is not None:
        raise SlotError(f"{who}: normzoo's layers apply no dropout after the norm, so the slot would lose its "
                        f"drop_layer; {_convert_hint(spec)}")
    if not norm_act.get("apply_act", True):
        return None
    if "act_layer" not in norm_act:
        raise SlotError(f"{who}, but it is not told which activation: timm's get_norm_act_layer passes act_layer "
                        f"only to its own norm-act classes, so a norm alone would build the model without its "
                        f"activation; {_convert_hint(spec)}")
    act, act_kwargs = norm_act["act_layer"], dict(norm_act.get("act_kwargs") or {})
    if act is None:
        return None
    unknown = [k for k in act_kwargs if k not in ("inplace", "approximate")]
    if isinstance(act, str):
        name = _FUSED_BY_NAME.get(act.lower())
    else:
        name = _FUSED_BY_CLASS.get(act) if isinstance(act, type) else None
    if name == "gelu" and act_kwargs.get("approximate", "none") == "tanh":
        name = "gelu_tanh"
    if name is None or unknown:
        raise SlotError(f"{who}: normzoo fuses only relu, silu (swish), gelu and gelu_tanh, given as a name or as "
                        f"exactly nn.ReLU, nn.SiLU, nn.GELU without other act_kwargs; the slot's "
                        f"{getattr(act, '__name__', act)!s}{f' with {act_kwargs}' if act_kwargs else ''} would be "
                        f"dropped; {_convert_hint(spec)}")
    if not (isinstance(spec, (str, Mapping)) or spec_class(spec) in {c for c, _ in LAYER_TYPES.values()}):
        raise SlotError(f"{who}: {spec!r} is not a normzoo preset or layer class, so it takes no activation= and the "
                        f"slot's {name} would be dropped; {_convert_hint(spec)}")
    own = overrides.get("activation", resolve_spec(spec).get("activation") if isinstance(spec, (str, Mapping))
                        else None)
    if own is not None and own != name:
        raise SlotError(f"{who}: the spec applies activation={own!r} and the slot asks for {name!r}; use a spec "
                        f"without an activation")
    return name


def _build_for_slot(spec, num_features: int, kwargs: dict) -> nn.Module:
    norm_act = {k: kwargs.pop(k) for k in NORM_ACT_KEYWORDS if k in kwargs}
    placement = {k: v for k, v in ((k, kwargs.pop(k, None)) for k in ("device", "dtype")) if v is not None}
    if norm_act:
        activation = _slot_activation(spec, norm_act, kwargs, _slot_caller(3))
        if activation is not None:
            kwargs["activation"] = activation
    try:
        if isinstance(spec, (str, Mapping)) or spec_class(spec) is not None:  # normzoo's / torch.nn's classes: placed
            return build(spec, num_features, **placement, **kwargs)
        layer = build(spec, num_features, **kwargs)  # a function: built, then placed
        return layer.to(**placement) if placement else layer
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError, PresetError):
            raise
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        raise type(err)(f"{_spec_label(spec)} cannot fill the slot{_slot_caller(2)} ({num_features} features"
                        f"{args}): {err}") from err


class _NormLayerType(type):
    """NormLayer's metaclass. Calling the class builds the spec's layer (a normzoo layer, not a NormLayer). timm's
    get_norm_act_layer reads the class name of a norm layer to pick a norm + activation class; there the name is
    refused with SlotError, since timm would then call the layer without telling it the activation."""

    def __call__(cls, num_features, /, *, spec, **kwargs):
        return _build_for_slot(spec, num_features, kwargs)

    @property
    def __name__(cls) -> str:  # noqa: PLW3201 - read by timm's get_norm_act_layer (type_name = norm_layer.__name__)
        frame = sys._getframe(1)
        if frame.f_code.co_name == "get_norm_act_layer":
            bound = frame.f_locals.get("norm_act_kwargs") or {}
            act = frame.f_locals.get("act_layer")
            spec = bound.get("spec", "...")
            raise SlotError(
                f"{_spec_label(spec)} cannot fill timm's norm + activation slots (get_norm_act_layer with "
                f"act_layer={getattr(act, '__name__', act)!s}{_slot_caller(2)}): timm passes the activation only to "
                f"its own norm-act classes, so the norm would be built without it; {_convert_hint(spec)}")
        return "NormLayer"


class NormLayer(metaclass=_NormLayerType):
    """What norm_factory binds: ``NormLayer(num_features, spec=..., **kwargs)`` returns ``build(spec, num_features,
    **kwargs)``, a normzoo (or the spec's) layer. A class, so that timm's get_norm_layer takes it (it asserts a type,
    a str, a function or a partial, and keeps a partial's keywords only).

    At every norm_layer= call site:
    - plain ``norm_layer(C)`` and torchvision's: the layer for C features;
    - timm's ``norm_layer(C, device=..., dtype=...)``: placed there (None: the default);
    - norm + activation calls (``apply_act=``, ``act_layer=``, ``act_kwargs=``, ``inplace=``, ``drop_layer=``,
      timm's BatchNormAct2d keywords): ``apply_act=False`` is the norm alone; an ``act_layer`` normzoo fuses
      (relu, silu/swish, gelu, gelu_tanh; exactly nn.ReLU, nn.SiLU, nn.GELU) becomes ``activation=``; anything else,
      an activation it is not told (``inplace=True`` alone) or a ``drop_layer`` raises SlotError, so a model is
      never built without its activation. timm's get_norm_act_layer (EfficientNet, RegNet, MobileNetV3, ...) calls
      the layer without its activation, so it is refused there, at model construction: build the model with its
      own norms and normzoo.convert() it.
    """


def load_presets(path: str | Path) -> list[str]:
    """Add the presets of a YAML file (name -> spec dict, or name -> other name for an alias); return the names.

    Errors name the file and the line. Nothing is registered unless the whole file is valid.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise PresetFileError(f"{path}: cannot read presets file ({err.strerror})") from None
    return _load_text(text, str(path))


def _load_text(text: str, where: str) -> list[str]:
    try:
        root = yaml.compose(text, Loader=YamlLoader)
        data = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise PresetFileError(f"{where}:{line}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise PresetFileError(f"{where}: line 1: a presets file is a mapping of name -> spec, got "
                              f"{type(data).__name__}")
    lines = {k.value: (k.start_mark.line + 1, v) for k, v in root.value}
    staged = []
    for name, spec in data.items():
        line, node = lines.get(name, (1, None))
        here = f"{where}: line {line}: preset {name!r}"
        if not isinstance(name, str):
            raise PresetFileError(f"{here}: preset names are strings")
        if not isinstance(spec, (str, Mapping)):
            raise PresetFileError(f"{here}: a spec is a mapping with a 'type' or the name of another preset, "
                                  f"got {spec!r}")
        if isinstance(spec, Mapping):
            try:
                _check_spec(spec, here)
            except PresetError as err:
                key_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
                if err.key in key_lines:  # point at the offending key's own line
                    here = f"{where}: line {key_lines[err.key]}: preset {name!r}"
                raise PresetFileError(str(err).replace(f"{where}: line {line}: preset {name!r}", here)) from None
        staged.append((name, spec))
    for name, spec in staged:
        register(name, spec)
    for name, spec in staged:
        if isinstance(spec, str):
            try:
                _resolve(name)
            except PresetError:
                _ALIASES.pop(name.lower(), None)
                line = lines.get(name, (1, None))[0]
                raise PresetFileError(f"{where}: line {line}: alias {name!r} names unknown preset {spec!r}"
                                      f"{_close(spec, available())}") from None
    return [name for name, _ in staged]


def _load_shipped() -> None:
    text = resources.files("normzoo.configs").joinpath("layers.yaml").read_text()
    _load_text(text, "normzoo/configs/layers.yaml")


_load_shipped()
