"""normzoo.convert: swap every normalization layer of a model for a preset, by name, without changing what it computes.

    model = torchvision_like_resnet()
    model = normzoo.convert(model, "bn")              # the same model on normzoo's BatchNorm (eps, momentum kept)
    model = normzoo.convert(model, "gn32")            # every BatchNorm2d -> normzoo.GroupNorm(32, C)
    model = normzoo.convert(model, "frozen_bn")       # BatchNorm -> FrozenBatchNorm2d with its statistics

Slots that are converted: torch.nn's BatchNorm1d/2d/3d (and Lazy*), SyncBatchNorm, InstanceNorm1d/2d/3d, GroupNorm,
LayerNorm and RMSNorm, channels-first LayerNorms (below), normzoo's own layers (FrozenBatchNorm2d, SyncBatchNorm,
RMSNorm and LayerNorm2d included), subclasses of these (see "Subclasses" below), and norms of other libraries that a
probe recognizes (see "Other libraries' norms" below). Other modules are left as they are, and those that look like
norms are reported (see "Never silently" below).

Hyperparameters (the rule):
- Same family (BatchNorm*d / SyncBatchNorm / FrozenBatchNorm2d -> a batch_norm, sync_batch_norm or frozen_batch_norm
  preset; InstanceNorm -> instance_norm; GroupNorm -> group_norm; LayerNorm -> layer_norm; RMSNorm -> rms_norm;
  a channels-first LayerNorm -> layer_norm or layer_norm2d): the old layer's eps, momentum, affine
  (elementwise_affine), bias, track_running_stats (and a SyncBatchNorm's process_group) are kept, as far as the new
  layer takes them; the preset's values for these are not used. Keyword overrides to convert()
  win over both. What the preset is about stays the preset's: num_groups of a group_norm preset, the layer type.
- Cross family (BatchNorm -> gn32, LayerNorm([C, H, W]) -> gn1, ...): the preset's values (and the overrides).
- A class spec (a normzoo or torch.nn norm class, a subclass of one, or a functools.partial of one) is checked as
  the preset of its family (_class_kind): the same rule, and the same refusals (a LayerNorm or RMSNorm class cannot
  fill a channel slot, nor a channels-first LayerNorm slot, where `ln` would become LayerNorm2d but a class stays
  the class it is); a partial's own eps= is a preset's value. Any other class is refused, naming it. A function
  (lambda c: MyNorm(c)) builds what it builds, unchecked.
- Where the new layer cannot keep a value, convert() refuses instead of changing the model: an
  InstanceNorm(track_running_stats=True) to normzoo's InstanceNorm (which keeps none), a BatchNorm without running
  statistics to frozen_bn, a channels-first LayerNorm with a weight but no bias (bias=False) to LayerNorm2d.

Activations and dropout after the norm (never dropped):
- A normzoo layer's fused `activation=` is kept, across families too: it is not a norm hyperparameter.
- A preset or override asking for a different activation than the slot already applies is refused; on a slot
  without one it is added, as asked (bn_relu). `activation=None` asks for nothing: it removes no activation.

Subclasses (timm's BatchNormAct2d, GroupNormAct, ...): a subclass of a torch.nn / normzoo norm whose `forward` is its
own is converted only when convert() recognizes it:
- timm's norm_act pattern: the base class's forward, then the child modules `drop` and `act` (those present, that
  order), and no other children. The activation becomes the fused `activation=` where normzoo has it (exactly
  nn.ReLU, nn.SiLU, nn.GELU with approximate "none" or "tanh"; inplace or not) and no dropout sits between;
  anything else (Hardswish, a timm activation class, Dropout, DropPath) stays a module after the norm: the slot then
  holds a NormAct(norm, drop, act), whose state_dict keys are the replaced layer's (weight, running_mean, act.weight,
  ...), so checkpoints load both ways. A subclass with no children whose forward computes its base's is a plain
  layer of that family.
- The recognition is checked, not assumed: on a float64 probe input (random parameters and statistics, train and
  eval, dropout off), the subclass's forward must give the base forward followed by drop and act, and move its
  running statistics the same. Channels-first LayerNorm subclasses (timm's LayerNorm2d) have their own probe
  (below). Any other forward (a LayerNorm subclass that permutes, scales or activates in a way not listed here) is
  refused with a ConversionError naming the class and why. So are norm layers carrying forward or backward hooks,
  which the replacement would silently lose, and uninitialized lazy layers (run a forward first).

Other libraries' norms (transformers' LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, T5LayerNorm, ...): a module that is
not torch's or normzoo's, has no children, a 1-D `weight` parameter (an optional `bias` of its shape, nothing else)
and a numeric `variance_epsilon` or `eps`, is probed (recognize_norm): on float64 rows of three scales (one near
sqrt(eps), so the eps it computes with must be the attribute's), with a random affine, in train and eval mode, its
forward must equal x / sqrt(mean(x^2) + eps) * weight (an RMSNorm slot) or F.layer_norm over the last dim (a
LayerNorm slot), to 1e-5 (these layers compute in float32 even for float64 input). The slot then follows the rules
of torch.nn.RMSNorm / LayerNorm slots: `rms` keeps eps (variance_epsilon) and the weight, state_dict keys stay
`weight` (and `bias`). A norm the probe identifies but normzoo cannot represent is refused with a ConversionError
naming the class and why: Gemma's RMSNorm, x_hat * (1 + weight). A module whose probe fails is left and reported.

Never silently: after the replacements are planned, every module left as it was that looks like a norm
(looks_like_norm: a leaf module whose class name holds the word Norm, as LocalResponseNorm or OlmoLayerNorm, or with a
1-D weight and a numeric eps / variance_epsilon; normzoo's own modules and torch.nn.utils' parametrizations are not)
is listed, with the reason, in a ConversionWarning; strict=True raises a ConversionError instead, before anything is
swapped.

Other rules:
- num_features comes from the old layer: num_features, num_channels, or normalized_shape for a LayerNorm slot.
- Channel slots (BatchNorm, InstanceNorm, GroupNorm, ...) normalize dim 1 of (N, C, *): a preset of the batch_norm or
  instance_norm family is built with the slot's dimensionality (BatchNorm1d slot -> BatchNorm1d, 3d -> 3d; slots of
  no fixed dimensionality, GroupNorm and SyncBatchNorm, get the 2d layer). A layer_norm or rms_norm preset cannot fill
  a channel slot (it normalizes the last dim): ConversionError, naming the path and suggesting ln2d and gn1. A
  layer_norm2d preset (LayerNorm over C at each position) fills any channel slot.
- LayerNorm / RMSNorm slots over the last dim D normalize features at the end of (*, D): only layer_norm and rms_norm
  presets fill them. An RMSNorm slot filled with an rms_norm preset keeps its eps and elementwise_affine (the same
  family). A LayerNorm([C, H, W]) slot (channels first) can take a channel preset with C channels.
- Channels-first LayerNorm slots (LayerNorm over C at each position of (N, C, *), as in ConvNeXt) are normzoo's
  LayerNorm2d, and torch.nn.LayerNorm subclasses whose class name is in CHANNELS_FIRST_LAYER_NORMS (timm's and
  torchvision's LayerNorm2d, which permute C last for F.layer_norm). Such a subclass must pass a probe: on a float64
  copy with a random affine, its forward on a (2, C, 3, 4) input must equal permute + F.layer_norm + permute, else
  ConversionError naming the class (it computes something else, an activation say, that convert would drop); so
  is one with child modules other than nn.Identity. layer_norm and layer_norm2d presets (`ln`, `ln2d`) give
  normzoo.LayerNorm2d, keeping eps and affine (the same family); channel presets take C channels; rms_norm presets
  are refused (they normalize the last dim).
- Weight and bias are copied where the shapes match; running_mean / running_var / num_batches_tracked where both
  layers have them. Device, dtype and train/eval mode are kept.
- A layer that cannot be built (GroupNorm(32) over 48 channels, say) raises ConversionError naming its path.
The model is changed in place (as torch.nn.SyncBatchNorm.convert_sync_batchnorm does) and returned; if `model` is
itself a norm layer the new layer is returned. Nothing is swapped unless every layer can be.
"""

from __future__ import annotations

import copy
import functools
import inspect
import numbers
import re
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import layers, registry
from .frozen import FrozenBatchNorm2d
from .sync import SyncBatchNorm

__all__ = ["convert", "ConversionError", "ConversionWarning", "is_norm_layer", "NormAct",
           "is_channels_first_layer_norm", "CHANNELS_FIRST_LAYER_NORMS", "recognize_norm", "looks_like_norm"]


class ConversionError(ValueError):
    """A norm layer of the model cannot be replaced by the preset; the message names the layer's path."""


class ConversionWarning(UserWarning):
    """convert() left modules that look like norms as they were (convert(..., strict=True) raises instead)."""


_NN_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, Lazy*, SyncBatchNorm
_NN_IN = nn.modules.instancenorm._InstanceNorm
_RMS = (layers.RMSNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CHANNEL_SLOTS = (_NN_BN, _NN_IN, nn.GroupNorm, layers._ChannelNorm, layers.GroupNorm, FrozenBatchNorm2d,
                  layers.LayerNorm2d)
_LAST_DIM_SLOTS = (nn.LayerNorm, layers.LayerNorm) + _RMS
# torch.nn.LayerNorm subclasses that normalize dim 1 of (N, C, *) (they permute C last for F.layer_norm), by class
# name: timm.layers.LayerNorm2d, torchvision.models.convnext.LayerNorm2d. Add the name of your own such class here.
CHANNELS_FIRST_LAYER_NORMS = {"LayerNorm2d"}
_FAMILIES = {  # family -> the slot classes of that family (channels-first LayerNorms: layer_norm2d, see _slot_family)
    "batch_norm": (_NN_BN, layers._BatchNorm, FrozenBatchNorm2d),
    "instance_norm": (_NN_IN, layers._InstanceNorm),
    "group_norm": (nn.GroupNorm, layers.GroupNorm),
    "layer_norm2d": (layers.LayerNorm2d,),
    "layer_norm": (nn.LayerNorm, layers.LayerNorm),
    "rms_norm": _RMS,
}
# The hyperparameters a same-family conversion keeps (the old layer's attribute = the constructor argument).
_KEPT = ("eps", "momentum", "affine", "elementwise_affine", "bias", "track_running_stats", "process_group")
# timm's norm_act layers apply these children after the norm, in this order.
_TAIL = ("drop", "act")
_ACTIVATION_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU,
                       "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def is_norm_layer(module: nn.Module) -> bool:
    """True for the layers convert() replaces."""
    return isinstance(module, _CHANNEL_SLOTS + _LAST_DIM_SLOTS)


def _known_base(module: nn.Module) -> type:
    """The nearest class of torch.nn's or normzoo's own in the module's MRO: the forward convert() knows."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("torch.nn.modules.", "normzoo.")):
            return cls
    raise AssertionError(f"{type(module).__name__} is no torch.nn module")  # is_norm_layer() guarantees one


def is_channels_first_layer_norm(module: nn.Module) -> bool:
    """True for a LayerNorm over C at each position of (N, C, *): normzoo.LayerNorm2d, or a torch.nn.LayerNorm
    subclass over one dim whose class name is in CHANNELS_FIRST_LAYER_NORMS (convert() also probes those)."""
    return isinstance(module, layers.LayerNorm2d) or (
        isinstance(module, nn.LayerNorm) and type(module).__name__ in CHANNELS_FIRST_LAYER_NORMS
        and len(module.normalized_shape) == 1)


def _probe_channels_first(where: str, module: nn.Module) -> None:
    """Raise ConversionError unless `module` (a torch.nn.LayerNorm subclass named as channels-first) computes
    permute + F.layer_norm over C + permute: on a float64 copy with a random affine, for a (2, C, 3, 4) input of mean
    1 and std 2, to 1e-9. Its forward is called directly (no hooks). A module on the meta device is not probed."""
    if isinstance(module, layers.LayerNorm2d) or any(t.is_meta for t in module.parameters()):
        return
    C = module.normalized_shape[0]
    probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if probe.weight is not None:
            probe.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        if probe.bias is not None:
            probe.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        x = torch.randn(2, C, 3, 4, generator=gen, dtype=torch.float64) * 2 + 1
        want = F.layer_norm(x.permute(0, 2, 3, 1), (C,), probe.weight, probe.bias, probe.eps).permute(0, 3, 1, 2)
        try:
            got = type(module).forward(probe, x)
            same = (isinstance(got, torch.Tensor) and got.shape == want.shape
                    and torch.allclose(got, want, rtol=1e-9, atol=1e-9))
        except Exception:  # noqa: BLE001 - any failure means it is not the channels-first LayerNorm
            same = False
    if not same:
        raise ConversionError(
            f"{where}: {type(module).__name__} is named as a channels-first LayerNorm, but its forward does not "
            f"compute F.layer_norm over the channels (dim 1) of (N, C, H, W); convert() refuses rather than change "
            f"what the model computes")


def _slot_dims(module: nn.Module) -> int | None:
    """Spatial dimensionality a channel slot is made for (1, 2, 3), or None when it takes any (N, C, *)."""
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm, nn.GroupNorm, layers.GroupNorm)):
        return None
    if isinstance(module, FrozenBatchNorm2d):
        return 2
    name = _known_base(module).__name__  # a subclass's own name says nothing (timm's BatchNormAct2d does, MyBN not)
    for d in (1, 2, 3):
        if name.endswith(f"{d}d"):
            return d
    return None


def _describe(module: nn.Module) -> str:
    if isinstance(module, (nn.GroupNorm, layers.GroupNorm)):
        return f"{type(module).__name__}({module.num_groups}, {module.num_channels})"
    if isinstance(module, layers.LayerNorm2d):
        return f"LayerNorm2d({module.num_channels})"
    if isinstance(module, _LAST_DIM_SLOTS):
        shape = tuple(module.normalized_shape)
        return f"{type(module).__name__}({shape[0] if len(shape) == 1 else list(shape)})"
    return f"{type(module).__name__}({module.num_features})"


def _spec_name(spec) -> str:
    return repr(spec) if isinstance(spec, str) else f"spec {dict(spec)!r}"


def _family(kind: str) -> str:
    if kind in ("frozen_batch_norm", "sync_batch_norm"):
        return "batch_norm"
    for family in ("batch_norm", "instance_norm"):
        if kind == family or kind in (f"{family}1d", f"{family}2d", f"{family}3d"):
            return family
    return kind


def _slot_family(module: nn.Module) -> str | None:
    if is_channels_first_layer_norm(module):  # before layer_norm: timm's LayerNorm2d is an nn.LayerNorm
        return "layer_norm2d"
    return next((family for family, classes in _FAMILIES.items() if isinstance(module, classes)), None)


def _class_kind(cls: type) -> str | None:
    """The layer type a class spec is checked as: a zoo class's (or its subclass's) own, frozen_batch_norm and
    sync_batch_norm included; else the family of the torch.nn class it is or derives from (a torch.nn.LayerNorm
    subclass named in CHANNELS_FIRST_LAYER_NORMS: layer_norm2d); None for any other class."""
    zoo = {c: kind for kind, (c, _) in registry.LAYER_TYPES.items()}
    kind = next((zoo[c] for c in cls.__mro__ if c in zoo), None)
    if kind is None and issubclass(cls, nn.LayerNorm) and cls.__name__ in CHANNELS_FIRST_LAYER_NORMS:
        kind = "layer_norm2d"
    return kind or next((family for family, classes in _FAMILIES.items() if issubclass(cls, classes)), None)


def _callable_name(spec) -> str:
    """normzoo.GroupNorm, torch.nn.BatchNorm2d, partial(normzoo.LayerNorm, eps=1e-06), MyNorm, or the repr."""
    if isinstance(spec, functools.partial):
        args = [repr(a) for a in spec.args] + [f"{k}={v!r}" for k, v in spec.keywords.items()]
        return f"partial({', '.join([_callable_name(spec.func)] + args)})"
    if isinstance(spec, type):
        if spec.__module__.startswith("torch.nn.") and getattr(nn, spec.__name__, None) is spec:
            return f"torch.nn.{spec.__name__}"
        if spec.__module__.startswith("normzoo."):
            return f"normzoo.{spec.__name__}"
        return spec.__name__
    return repr(spec)


def _kept(old: nn.Module, cls: type) -> dict:
    """The old layer's hyperparameters that `cls`'s constructor takes (same-family conversion)."""
    values = {}
    affine = getattr(old, "affine", getattr(old, "elementwise_affine", None))  # one flag, two names
    for name in _KEPT:
        if name in ("affine", "elementwise_affine"):  # nn.LayerNorm's elementwise_affine is LayerNorm2d's affine
            if affine is not None:
                values[name] = affine
        elif name == "bias":
            if getattr(old, "affine", getattr(old, "elementwise_affine", True)):
                values["bias"] = getattr(old, "bias", None) is not None
        elif hasattr(old, name):
            values[name] = getattr(old, name)
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in values.items() if k in params}


def _check_keepable(where: str, old: nn.Module, family: str, kind: str) -> None:
    """Refuse what the new layer would silently compute differently for lack of a hyperparameter."""
    if kind == "frozen_batch_norm" and family == "batch_norm" and getattr(old, "running_mean", True) is None:
        raise ConversionError(f"{where}: it keeps no running statistics (track_running_stats=False), so there are "
                              f"none to freeze; FrozenBatchNorm2d would normalize with mean 0 and variance 1")
    if kind == "layer_norm2d" and getattr(old, "elementwise_affine", False) and getattr(old, "bias", 0) is None:
        raise ConversionError(f"{where}: it has a weight but no bias (bias=False), and LayerNorm2d's affine has "
                              f"both; the new layer would learn a bias the model does not have")


def _build_for(path: str, old: nn.Module, spec, overrides: dict) -> nn.Module:
    """The new layer for the slot `old` at `path` (the norm alone: what comes after it is the caller's).

    A preset and a class spec (a class, or a functools.partial of one) go through the same rules: the class is
    checked as the layer type of its family (_class_kind), and stays the class it is where a preset's type would
    follow the slot (BatchNorm dimensionality; `ln` on a channels-first slot becomes LayerNorm2d)."""
    cls = registry.spec_class(spec)
    if isinstance(spec, (str, Mapping)):
        merged = registry.resolve_spec(spec)
        kind = merged["type"]
        where = f"{path}: cannot replace {_describe(old)} with preset {_spec_name(spec)} ({kind})"
    elif cls is None:  # a function: it builds what it builds, given the slot's features
        features = old.normalized_shape[-1] if isinstance(old, _LAST_DIM_SLOTS) else _channels(old)
        try:
            return registry.build(spec, features, **overrides)
        except (ValueError, TypeError) as err:
            raise ConversionError(f"{path}: cannot replace {_describe(old)} with {spec!r}: {err}") from None
    else:
        kind = _class_kind(cls)
        where = f"{path}: cannot replace {_describe(old)} with {_callable_name(spec)}" + (f" ({kind})" if kind else "")
        if kind is None:
            raise ConversionError(
                f"{where}: {cls.__name__} is not a norm layer class convert() knows (normzoo's and torch.nn's norms "
                f"and their subclasses), so it cannot check that it normalizes the dims this slot does; pass a "
                f"function, lambda c: {cls.__name__}(c), to build it unchecked")
        merged = {"type": kind}
    family = _family(kind)
    if is_channels_first_layer_norm(old):  # LayerNorm over C at each position (_tail_of checked its forward)
        features, dims = _channels(old), _slot_dims(old) or 2
        if cls is None and kind in ("layer_norm", "layer_norm2d"):  # ln, ln2d: LayerNorm2d, the same family
            family = kind = "layer_norm2d"
            merged = {k: v for k, v in merged.items() if k != "elementwise_affine"}  # LayerNorm2d calls it affine
            overrides = {("affine" if k == "elementwise_affine" else k): v for k, v in overrides.items()}
        elif kind in registry.FEATURES_LAST:  # a class stays the class: a LayerNorm class is one over the last dim
            raise ConversionError(f"{where}: {kind} normalizes the last dim, but this slot normalizes the channels at "
                                  f"dim 1 of (N, C, *) at each position; use 'ln2d' (normzoo.LayerNorm2d)")
    elif isinstance(old, _LAST_DIM_SLOTS):
        shape = tuple(old.normalized_shape)
        dims = len(shape) - 1 if len(shape) - 1 in (1, 2, 3) else None
        if kind in registry.FEATURES_LAST:  # layer_norm, rms_norm
            features = shape if len(shape) > 1 else shape[0]
        elif len(shape) > 1:  # LayerNorm([C, H, W]) on (N, C, H, W): channels are at dim 1
            features = shape[0]
        else:
            raise ConversionError(
                f"{where}: {type(old).__name__} normalizes the last dim (features last, (*, {shape[0]})), while "
                f"{kind} normalizes channels at dim 1 of (N, C, *); use a preset over the last dim such as "
                f"{'rms' if isinstance(old, _RMS) else 'ln'!r}")
    else:
        features, dims = _channels(old), _slot_dims(old) or 2
        if kind in registry.FEATURES_LAST:
            raise ConversionError(
                f"{where}: {kind} normalizes the last dim, but this slot normalizes channels at dim 1 of (N, C, *); "
                f"use 'ln2d' (normzoo.LayerNorm2d) for a LayerNorm over the channels at each position, or 'gn1' for "
                f"LayerNorm-style statistics over (C, *spatial) with a per-channel affine")
    if (cls is None and family in ("batch_norm", "instance_norm") and dims is not None
            and kind not in ("frozen_batch_norm", "sync_batch_norm")):
        kind = f"{family}{dims}d"  # a preset's BatchNorm / InstanceNorm follows the slot's dimensionality
    merged["type"] = kind
    if family == _slot_family(old):  # same family: the model's hyperparameters, not the preset's (nor a partial's)
        _check_keepable(where, old, family, kind)
        merged.update(_kept(old, cls or registry.LAYER_TYPES[kind][0]))
    try:
        if cls is None:
            return registry.build(merged, features, **overrides)
        kwargs = {k: v for k, v in merged.items() if k != "type"}
        return registry.build(spec, features, **{**kwargs, **overrides})
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{where}: {err}") from None


def _channels(module: nn.Module) -> int:
    if isinstance(module, (nn.GroupNorm, layers.GroupNorm, layers.LayerNorm2d)):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):  # a channels-first LayerNorm subclass: normalized_shape (C,)
        return module.normalized_shape[0]
    return module.num_features


# ------------------------------------------------------------------------------------- subclasses with a forward


def _fusable(act: nn.Module) -> str | None:
    """The name of normzoo's fused activation computing `act`, or None. Exact classes only: a subclass of nn.ReLU
    may compute anything."""
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is nn.SiLU:
        return "silu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return None


def _probe_input(module: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(module, _LAST_DIM_SLOTS):
        shape = (2, 3) + tuple(module.normalized_shape)
    else:
        spatial = {1: (5,), 2: (3, 5), 3: (2, 3, 5)}[_slot_dims(module) or 2]
        shape = (3, _channels(module)) + spatial
    return torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5


def _forward_is(module: nn.Module, base: type, tail: tuple[str, ...]) -> str | None:
    """Run `module` and base.forward + its children `tail` on a float64 probe, in train and eval mode (dropout
    off), with random parameters and statistics; None when outputs and running statistics agree, else why not."""
    generator = torch.Generator().manual_seed(0)
    ref = copy.deepcopy(module).double()
    with torch.no_grad():
        for t in list(ref.parameters(recurse=False)) + list(ref.buffers(recurse=False)):
            if t is not None and t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) + 0.5)
    if isinstance(getattr(ref, "compile", None), bool):
        ref.compile = False  # a normzoo subclass: the probe is no reason to compile a kernel
    device = next((t.device for t in list(ref.parameters()) + list(ref.buffers())), torch.device("cpu"))
    x = _probe_input(ref, generator).to(device)
    for training in (True, False):
        got_m, want_m = copy.deepcopy(ref).train(training), copy.deepcopy(ref).train(training)
        for m in (got_m, want_m):
            for name in tail:
                getattr(m, name).eval()  # dropout off: both sides must agree elementwise
        with torch.no_grad():
            got = got_m(x.clone())
            want = base.forward(want_m, x.clone())
            for name in tail:
                want = getattr(want_m, name)(want)
        mode = "train" if training else "eval"
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return f"in {mode} mode it returns {type(got).__name__} {tuple(getattr(got, 'shape', ()))}, " \
                   f"{base.__name__}.forward{' + ' + ' + '.join(tail) if tail else ''} {tuple(want.shape)}"
        err = (got - want).abs().max().item() if got.numel() else 0.0
        if not err <= 1e-10 * (1 + want.abs().max().item() if want.numel() else 1):
            return f"in {mode} mode its output differs from {base.__name__}.forward" \
                   f"{' followed by ' + ', '.join(tail) if tail else ''} by {err:.3g}"
        for (name, a), (_, b) in zip(got_m.named_buffers(recurse=False), want_m.named_buffers(recurse=False)):
            if a is not None and not torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-12):
                return f"in {mode} mode it updates {name} differently from {base.__name__}.forward"
    return None


def _tail_of(path: str, old: nn.Module) -> list[tuple[str, nn.Module]]:
    """What `old` applies after its norm: [] for a torch.nn / normzoo layer, the (name, module) children of a
    recognized subclass (Identity left out); ConversionError naming the class for anything else."""
    who = f"{path}: cannot replace {_describe(old)}"
    if isinstance(old, nn.modules.lazy.LazyModuleMixin) and old.has_uninitialized_params():
        raise ConversionError(f"{who}: it is an uninitialized lazy module (its num_features is not known yet); "
                              f"run one forward pass before converting")
    hooks = [kind for kind, d in (("forward", old._forward_hooks), ("forward pre", old._forward_pre_hooks),
                                  ("backward", old._backward_hooks),
                                  ("backward pre", getattr(old, "_backward_pre_hooks", {}))) if d]
    if hooks:
        raise ConversionError(f"{who}: it has {' and '.join(hooks)} hooks, which the new layer would not run; "
                              f"convert before registering them")
    cls = type(old).__name__
    if is_channels_first_layer_norm(old) and isinstance(old, nn.LayerNorm):  # timm's / torchvision's LayerNorm2d
        extra = [name for name, m in old.named_children() if type(m) is not nn.Identity]
        if extra:
            raise ConversionError(f"{who}: {cls} is named as a channels-first LayerNorm but has child modules "
                                  f"{extra}; convert() recognizes only the plain permute + F.layer_norm + permute")
        _probe_channels_first(who, old)  # its forward must be that, to 1e-9 in float64
        return []
    base = _known_base(old)
    if type(old).forward is base.forward:
        return []
    children = dict(old.named_children())
    others = [name for name in children if name not in _TAIL]
    if others:
        raise ConversionError(
            f"{who}: {cls} overrides {base.__name__}.forward and has child modules {others}; convert() recognizes "
            f"only the base forward followed by children {list(_TAIL)} (timm's norm + drop + act), so it cannot "
            f"tell what {cls} computes")
    tail = tuple(name for name in _TAIL if name in children)
    try:
        with torch.random.fork_rng(devices=[]):  # converting must not shift the model's (CPU) random stream
            why = _forward_is(old, base, tail)
    except Exception as err:  # noqa: BLE001 - whatever the subclass raises: it is not the pattern we know
        why = f"running it on a probe input raised {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    if why is not None:
        expected = f"{base.__name__}.forward" + (f" followed by {', '.join(tail)}" if tail else "")
        raise ConversionError(f"{who}: {cls} overrides {base.__name__}.forward with a computation convert() does "
                              f"not recognize (expected {expected}): {why}")
    return [(name, children[name]) for name in tail if type(children[name]) is not nn.Identity]


def _after_norm(where: str, old: nn.Module, tail: list[tuple[str, nn.Module]], spec,
                overrides: dict) -> tuple[str | None, list[tuple[str, nn.Module]]]:
    """Split what the slot applies after its norm into the activation the new layer fuses and the modules that
    stay after it. Refuses a requested activation that would replace the slot's own."""
    takes_activation = (isinstance(spec, (str, Mapping))
                        or registry.spec_class(spec) in {c for c, _ in registry.LAYER_TYPES.values()})
    fused = getattr(old, "activation", None) if isinstance(old, (layers._Extras, FrozenBatchNorm2d)) else None
    if fused is None and takes_activation and len(tail) == 1 and tail[0][0] == "act" and _fusable(tail[0][1]):
        fused, tail = _fusable(tail[0][1]), []
    if isinstance(spec, (str, Mapping)):
        requested = registry.resolve_spec(spec).get("activation")
    else:
        requested = None
    requested = overrides.get("activation", requested)
    slot_acts = ([fused] if fused else []) + [type(m).__name__ for name, m in tail if name == "act"]
    if requested is not None and slot_acts and (fused != requested or len(slot_acts) > 1):
        raise ConversionError(f"{where}: the layer already applies {' then '.join(slot_acts)} after the norm, and "
                              f"the preset or overrides ask for activation={requested!r} too; convert() keeps the "
                              f"model's activation (use a preset without one)")
    if fused is not None and not takes_activation:  # a callable that may not fuse: keep it as a module
        if tail:
            raise ConversionError(f"{where}: it fuses activation={fused!r} before its own {[n for n, _ in tail]}, "
                                  f"and {spec!r} takes no activation=; use a normzoo preset or layer class")
        tail, fused = [("act", _ACTIVATION_MODULES[fused]())], None
    return fused, tail


class NormAct(nn.Module):
    """A norm followed by the modules the layer it replaced applied after its norm (dropout, drop-path, an
    activation normzoo does not fuse), made by convert() for subclasses such as timm's BatchNormAct2d.

    ``forward(x) = act(drop(norm(x)))`` (those present). state_dict keys are those of the replaced layer: the
    norm's at the top level (``weight``, ``running_mean``, ...), the others under their names (``act.weight`` for a
    PReLU), so checkpoints of the original model load into the converted one and back. Parameter names
    (named_parameters) keep the ``norm.`` level; state_dicts with ``norm.`` keys load too.
    """

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        if drop is not None:
            self.drop = drop
        if act is not None:
            self.act = act
        self.register_state_dict_post_hook(_flatten_norm_keys)
        self.register_load_state_dict_pre_hook(_nest_norm_keys)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.norm(input)
        for name in _TAIL:
            if name in self._modules:
                x = self._modules[name](x)
        return x


def _flatten_norm_keys(module: NormAct, state_dict, prefix: str, local_metadata) -> None:
    inner = prefix + "norm."
    # this module's entries are the last ones: take them out and put them back renamed, in the same order
    entries = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
    for key, value in entries:
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None and inner[:-1] in metadata:  # the norm's version, where the norm's keys now are
        metadata[prefix[:-1]] = metadata.pop(inner[:-1])


def _nest_norm_keys(module: NormAct, state_dict, prefix: str, local_metadata, strict, missing_keys,
                    unexpected_keys, error_msgs) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        head = key[len(prefix):].split(".", 1)[0]
        if head not in module._modules:
            state_dict[prefix + "norm." + key[len(prefix):]] = state_dict.pop(key)


# ------------------------------------------------- norms of other libraries (Hugging Face transformers), by probe


def _foreign_eps(module: nn.Module) -> float | None:
    """The module's eps: `variance_epsilon` (transformers' RMSNorms) or `eps`, where it is a number."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    return None


def _foreign_shape(module: nn.Module) -> str | None:
    """None when `module` has the shape of a last-dim norm convert() can probe (no children, a 1-D `weight`
    parameter, an optional `bias` of the same shape, no other parameters or buffers, a numeric eps); else why not."""
    if next(module.children(), None) is not None:
        return "it has child modules"
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "it has no 1-D weight parameter"
    if bias is not None and bias.shape != weight.shape:
        return "its bias is not shaped like its weight"
    others = [n for n, p in module._parameters.items() if p is not None and n not in ("weight", "bias")]
    others += [n for n, b in module._buffers.items() if b is not None]
    if others:
        return f"it holds {others} besides weight and bias"
    if _foreign_eps(module) is None:
        return "it has no numeric eps or variance_epsilon attribute"
    return None


def _probe_foreign(module: nn.Module, eps: float) -> tuple[str | None, str]:
    """What a last-dim norm of another library computes, by a float64 probe: ("rms_norm" | "layer_norm", "") when
    its forward equals x / sqrt(mean(x^2) + eps) * weight, or F.layer_norm(x, (D,), weight, bias, eps), in train and
    eval mode, on rows of 3 scales (one near sqrt(eps), so eps must be the attribute's) with a random affine;
    ("offset", why) for x_hat * (1 + weight) (Gemma's RMSNorm); (None, why) otherwise. Tolerance 1e-5: such layers
    compute in float32 even for float64 inputs (transformers' RMSNorms upcast to float32 and cast back)."""
    D = module._parameters["weight"].shape[0]
    has_bias = module._parameters.get("bias") is not None
    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        probe.weight.copy_(torch.rand(D, generator=gen, dtype=torch.float64) + 0.5)
        if has_bias:
            probe.bias.copy_(torch.randn(D, generator=gen, dtype=torch.float64))
        scales = torch.tensor([2.0, 0.5, max(eps, 1e-12) ** 0.5], dtype=torch.float64).view(3, 1, 1)
        x = (torch.randn(3, 4, D, generator=gen, dtype=torch.float64) + 0.5) * scales
        w, b = probe.weight, probe.bias if has_bias else None
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        wants = {"layer_norm": F.layer_norm(x, (D,), w, b, eps)}
        if not has_bias:
            wants.update(rms_norm=x_hat * w, offset=x_hat * (1 + w))
        matched = set(wants)
        for training in (True, False):
            probe.train(training)
            try:
                got = type(module).forward(probe, x.clone())
            except Exception as err:  # noqa: BLE001 - whatever it raises: not a norm convert() knows
                return None, (f"its forward on a (3, 4, {D}) float64 probe raised {type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else ''}")
            ok = isinstance(got, torch.Tensor) and got.shape == x.shape
            matched &= {k for k, want in wants.items()
                        if ok and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)}
    if "rms_norm" in matched or "layer_norm" in matched:
        return ("rms_norm" if "rms_norm" in matched else "layer_norm"), ""
    if "offset" in matched:
        return "offset", ("it computes x / sqrt(mean(x^2) + eps) * (1 + weight), with its weight stored as an offset "
                          "from 1 (Gemma's RMSNorm), while normzoo.RMSNorm multiplies by weight: the layer would "
                          "compute otherwise and checkpoints would not load unchanged")
    return None, (f"its forward is neither RMSNorm's nor LayerNorm's over the last dim (checked on a float64 probe "
                  f"with eps={eps:g})")


@functools.lru_cache(maxsize=None)
def _stand_in_class(name: str, module_name: str, base: type) -> type:
    """A torch.nn base subclass under the foreign class's name, so messages name the model's class."""
    return type(name, (base,), {"__module__": module_name})


def recognize_norm(module: nn.Module) -> tuple[nn.Module | None, str]:
    """For a module of another library (transformers' LlamaRMSNorm, T5LayerNorm, ...): (a torch.nn.RMSNorm or
    LayerNorm stand-in with its eps, weight (and bias), device, dtype and mode, ""), when its structure and a
    float64 probe (_probe_foreign) show it computes that norm over the last dim; (None, why not) otherwise.
    Raises ConversionError (without a path: convert() adds it) for a norm it recognizes but cannot represent."""
    cls = type(module)
    if is_norm_layer(module) or cls.__module__.startswith(("torch.", "normzoo.")):
        return None, "a torch or normzoo module with no normzoo layer to replace it"
    why = _foreign_shape(module)
    if why is not None:
        return None, why
    eps = _foreign_eps(module)
    weight, bias = module._parameters["weight"], module._parameters.get("bias")
    if weight.is_meta:
        return None, "its weight is on the meta device, so it cannot be probed"
    with torch.random.fork_rng(devices=[]):  # converting must not shift the model's (CPU) random stream
        family, why = _probe_foreign(module, eps)
    if family == "offset":
        raise ConversionError(f"cannot replace {cls.__name__}({weight.shape[0]}): {why}; convert() refuses rather "
                              f"than change what the model computes")
    if family is None:
        return None, why
    name = cls.__name__ if cls.__name__ not in CHANNELS_FIRST_LAYER_NORMS else cls.__name__ + "_"
    base = nn.RMSNorm if family == "rms_norm" else nn.LayerNorm
    kwargs = {} if family == "rms_norm" else {"bias": bias is not None}
    stand_in = _stand_in_class(name, cls.__module__, base)(weight.shape[0], eps=eps, elementwise_affine=True,
                                                           device=weight.device, dtype=weight.dtype, **kwargs)
    with torch.no_grad():
        stand_in.weight.copy_(weight)
        if bias is not None:
            stand_in.bias.copy_(bias)
    stand_in.train(module.training)
    return stand_in, ""


def _foreign_hooks(module: nn.Module) -> list[str]:
    return [kind for kind, d in (("forward", module._forward_hooks), ("forward pre", module._forward_pre_hooks),
                                 ("backward", module._backward_hooks),
                                 ("backward pre", getattr(module, "_backward_pre_hooks", {}))) if d]


_NORM_NAME = re.compile(r"Norm(?![a-z])")  # a CamelCase word: LayerNorm, RMSNorm2d, GroupNormAct; not Normalize


def looks_like_norm(module: nn.Module) -> bool:
    """True for a module that looks like a normalization layer: a leaf module (no children) whose class name holds
    the word Norm (LayerNorm, LlamaRMSNorm, LocalResponseNorm; not Normalize), or that has a 1-D weight and a numeric
    eps / variance_epsilon. normzoo's own modules and torch.nn.utils' (weight_norm's and spectral_norm's
    parametrizations) are not. convert() reports such modules when it leaves them as they were."""
    cls = type(module)
    if cls.__module__.startswith(("normzoo.", "torch.nn.utils.")) or next(module.children(), None) is not None:
        return False
    if _NORM_NAME.search(cls.__name__):
        return True
    weight = module._parameters.get("weight")
    return _foreign_eps(module) is not None and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _unwrap_factory(spec, overrides: dict) -> tuple[object, dict]:
    """normzoo.norm_factory(spec, **kw) given to convert() is the spec itself (checked as a preset), kw overrides."""
    if isinstance(spec, functools.partial) and spec.func is registry.NormLayer and not spec.args:
        bound = dict(spec.keywords)
        return bound.pop("spec"), {**bound, **overrides}
    return spec, overrides


# --------------------------------------------------------------------------------------------------- convert


def _reference_tensor(module: nn.Module, fallback: torch.Tensor | None) -> torch.Tensor | None:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t is not None and t.is_floating_point():
            return t
    return fallback


def _carry_state(old: nn.Module, new: nn.Module) -> None:
    """Copy weight/bias where shapes match, and running statistics where both layers keep them."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                if isinstance(src, nn.parameter.UninitializedParameter):
                    continue
                dst.copy_(src)
        src, dst = getattr(old, "num_batches_tracked", None), getattr(new, "num_batches_tracked", None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
            dst.copy_(src)


def _replacement(path: str, old: nn.Module, spec, overrides: dict, fallback: torch.Tensor | None) -> nn.Module:
    tail = _tail_of(path, old)
    where = f"{path}: cannot replace {_describe(old)} with " + (
        f"preset {_spec_name(spec)}" if isinstance(spec, (str, Mapping)) else _callable_name(spec))
    activation, after = _after_norm(where, old, tail, spec, overrides)
    new = _build_for(path, old, spec, overrides if activation is None else {**overrides, "activation": activation})
    ref = _reference_tensor(old, fallback)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    _carry_state(old, new)
    new.train(old.training)
    if not after:
        return new
    out = NormAct(new, **dict(after))
    out.train(old.training)
    return out


def convert(model: nn.Module, spec, *, strict: bool = False, **overrides) -> nn.Module:
    """Replace every normalization layer of `model` by the layer `spec` names, built for that slot.

    Same-family conversion keeps the model's eps, momentum, affine, bias and track_running_stats; cross-family
    conversion takes the preset's. Activations and dropout applied after a norm are kept (fused where normzoo can).
    Subclasses with their own forward are converted only where recognized (see the module docstring).

    Args:
        model: any nn.Module; changed in place.
        spec: a preset name ("gn32", "bn", "frozen_bn", ...), a spec dict {"type": ..., **kwargs}, or a class /
            callable taking num_features.
        strict: raise a ConversionError, instead of a ConversionWarning, when modules that look like norms
            (looks_like_norm) are left as they were.
        overrides: constructor arguments for every new layer, winning over the preset's and the kept values
            (e.g. ``compile=False``, ``eps=1e-3``).

    Returns:
        `model` (or the new layer when `model` itself is a norm layer).

    Raises:
        ConversionError (a ValueError) naming the path of the first layer that cannot be replaced, before any
        layer is swapped; PresetError for an unknown preset.

    Example::

        >>> model = normzoo.convert(model, "gn32", compile=False)
    """
    spec, overrides = _unwrap_factory(spec, overrides)
    if isinstance(spec, (str, Mapping)):
        registry.resolve_spec(spec)  # unknown name: PresetError before anything else
    fallback = next((p for p in model.parameters() if p.is_floating_point()), None)
    # Build every replacement first, so a failing layer leaves the model untouched.
    replacements: dict[int, nn.Module] = {}
    skipped: list[str] = []  # modules that look like norms, left as they are: "path (Class: why)"
    for path, module in model.named_modules(remove_duplicate=True):
        if is_norm_layer(module):
            replacements[id(module)] = _replacement(path or "<root>", module, spec, overrides, fallback)
        else:
            replacements.update(_foreign_replacement(path or "<root>", module, spec, overrides, fallback, skipped))
    _report_skipped(skipped, strict)

    if id(model) in replacements:
        return replacements[id(model)]
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if id(child) in replacements:
                setattr(module, name, replacements[id(child)])
    return model


def _foreign_replacement(path: str, module: nn.Module, spec, overrides: dict, fallback, skipped: list) -> dict:
    """{id(module): its replacement} for a norm of another library that recognize_norm() recognizes; {} else,
    with `path` added to `skipped` where the module looks like a norm."""
    try:
        stand_in, why = recognize_norm(module)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from None
    if stand_in is None:
        if looks_like_norm(module):
            skipped.append(f"{path} ({type(module).__name__}: {why})")
        return {}
    hooks = _foreign_hooks(module)
    if hooks:
        raise ConversionError(f"{path}: cannot replace {_describe(stand_in)}: it has {' and '.join(hooks)} hooks, "
                              f"which the new layer would not run; convert before registering them")
    return {id(module): _replacement(path, stand_in, spec, overrides, fallback)}


def _report_skipped(skipped: list[str], strict: bool) -> None:
    if not skipped:
        return
    listing = "; ".join(skipped[:20]) + (f"; and {len(skipped) - 20} more" if len(skipped) > 20 else "")
    message = (f"convert() left {len(skipped)} module(s) that look like norms as they were, not knowing what they "
               f"compute: {listing}")
    if strict:
        raise ConversionError(message + " (strict=True; nothing was replaced)")
    warnings.warn(message + ". Pass strict=True to make this an error.", ConversionWarning, stacklevel=3)


def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (torch.nn's, normzoo's, SyncBatchNorm) in `module` by a FrozenBatchNorm2d
    holding its affine and running statistics; returns the module (or the new layer if `module` is one).

    A shortcut for ``normzoo.convert(module, "frozen_bn")``.
    """
    return convert(module, "frozen_bn")


# Called as FrozenBatchNorm2d.convert_frozen_batchnorm(module), detectron2's name. It is attached here rather than
# defined in frozen.py because conversion sits above the layers: frozen.py calling up into convert was an import
# circle (frozen -> convert -> registry -> frozen).
FrozenBatchNorm2d.convert_frozen_batchnorm = classmethod(convert_frozen_batchnorm)
