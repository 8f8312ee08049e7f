"""normzoo.convert: swap every normalization layer of a model for a preset, by name.

    model = torchvision_like_resnet()
    model = normzoo.convert(model, "gn32")            # every BatchNorm2d -> normzoo.GroupNorm(32, C)
    model = normzoo.convert(model, "frozen_bn")       # BatchNorm -> FrozenBatchNorm2d with its statistics

Slots that are converted: torch.nn's BatchNorm1d/2d/3d (and Lazy*), SyncBatchNorm, InstanceNorm1d/2d/3d, GroupNorm,
LayerNorm and RMSNorm, channels-first LayerNorms (below), and normzoo's own layers (FrozenBatchNorm2d, SyncBatchNorm,
RMSNorm and LayerNorm2d included). Other modules (LocalResponseNorm, user classes) are left as they are.

Rules:
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
  ConversionError naming the class (it computes something else, an activation say, that convert would drop).
  layer_norm and layer_norm2d presets (`ln`, `ln2d`) give normzoo.LayerNorm2d, keeping eps and affine; channel
  presets take C channels; rms_norm presets are refused (they normalize the last dim).
- Weight and bias are copied where the shapes match; running_mean / running_var / num_batches_tracked where both
  layers have them. Device, dtype and train/eval mode are kept.
- A layer that cannot be built (GroupNorm(32) over 48 channels, say) raises ConversionError naming its path.
The model is changed in place (as torch.nn.SyncBatchNorm.convert_sync_batchnorm does) and returned; if `model` is
itself a norm layer the new layer is returned.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import layers, registry
from .frozen import FrozenBatchNorm2d
from .sync import SyncBatchNorm

__all__ = ["convert", "ConversionError", "is_norm_layer", "is_channels_first_layer_norm", "CHANNELS_FIRST_LAYER_NORMS"]


class ConversionError(ValueError):
    """A norm layer of the model cannot be replaced by the preset; the message names the layer's path."""


_NN_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, Lazy*, SyncBatchNorm
_NN_IN = nn.modules.instancenorm._InstanceNorm
_RMS = (layers.RMSNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CHANNEL_SLOTS = (_NN_BN, _NN_IN, nn.GroupNorm, layers._ChannelNorm, layers.GroupNorm, FrozenBatchNorm2d,
                  layers.LayerNorm2d)
_LAST_DIM_SLOTS = (nn.LayerNorm, layers.LayerNorm) + _RMS
# torch.nn.LayerNorm subclasses that normalize dim 1 of (N, C, *) (they permute C last for F.layer_norm), by class
# name: timm.layers.LayerNorm2d, torchvision.models.convnext.LayerNorm2d. Add the name of your own such class here.
CHANNELS_FIRST_LAYER_NORMS = {"LayerNorm2d"}


def is_norm_layer(module: nn.Module) -> bool:
    """True for the layers convert() replaces."""
    return isinstance(module, _CHANNEL_SLOTS + _LAST_DIM_SLOTS)


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
    for d in (1, 2, 3):
        if type(module).__name__.endswith(f"{d}d"):
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
    for family in ("batch_norm", "instance_norm"):
        if kind == family or kind in (f"{family}1d", f"{family}2d", f"{family}3d"):
            return family
    return kind


def _build_for(path: str, old: nn.Module, spec, overrides: dict) -> nn.Module:
    """The new layer for the slot `old` at `path`."""
    if not isinstance(spec, (str, Mapping)):  # a class or callable: trust it with num_features
        features = old.normalized_shape[-1] if isinstance(old, _LAST_DIM_SLOTS) else _channels(old)
        if is_channels_first_layer_norm(old):
            _probe_channels_first(f"{path}: cannot replace {_describe(old)} with {spec!r}", old)
        try:
            return registry.build(spec, features, **overrides)
        except (ValueError, TypeError) as err:
            raise ConversionError(f"{path}: cannot replace {_describe(old)} with {spec!r}: {err}") from None

    merged = registry.resolve_spec(spec)
    kind = merged["type"]
    family = _family(kind)
    where = f"{path}: cannot replace {_describe(old)} with preset {_spec_name(spec)} ({kind})"
    if is_channels_first_layer_norm(old):  # LayerNorm over C at each position: the zoo's LayerNorm2d
        _probe_channels_first(where, old)
        features = _channels(old)
        if kind in ("layer_norm", "layer_norm2d"):  # the same family: keep eps and affine
            kind = "layer_norm2d"
            merged = {k: v for k, v in merged.items() if k not in ("eps", "elementwise_affine", "affine")}
            merged.update(eps=old.eps, affine=old.affine if isinstance(old, layers.LayerNorm2d)
                          else old.elementwise_affine)
            overrides = {("affine" if k == "elementwise_affine" else k): v for k, v in overrides.items()}
        elif kind in registry.FEATURES_LAST:
            raise ConversionError(f"{where}: {kind} normalizes the last dim, but this slot normalizes the channels at "
                                  f"dim 1 of (N, C, *) at each position; use 'ln2d'")
        elif family in ("batch_norm", "instance_norm"):
            kind = f"{family}{_slot_dims(old) or 2}d"
    elif isinstance(old, _LAST_DIM_SLOTS):
        shape = tuple(old.normalized_shape)
        if kind in registry.FEATURES_LAST:  # layer_norm, rms_norm
            features = shape if len(shape) > 1 else shape[0]
            if kind == "rms_norm" and isinstance(old, _RMS):  # the same family: keep eps and elementwise_affine
                merged.update(eps=old.eps, elementwise_affine=old.elementwise_affine)
        elif len(shape) > 1:  # LayerNorm([C, H, W]) on (N, C, H, W): channels are at dim 1
            features = shape[0]
            if family in ("batch_norm", "instance_norm"):
                kind = f"{family}{len(shape) - 1}d" if len(shape) - 1 in (1, 2, 3) else kind
        else:
            raise ConversionError(
                f"{where}: {type(old).__name__} normalizes the last dim (features last, (*, {shape[0]})), while "
                f"{kind} normalizes channels at dim 1 of (N, C, *); use a preset over the last dim such as "
                f"{'rms' if isinstance(old, _RMS) else 'ln'!r}")
    else:
        features = _channels(old)
        if kind in registry.FEATURES_LAST:
            raise ConversionError(
                f"{where}: {kind} normalizes the last dim, but this slot normalizes channels at dim 1 of (N, C, *); "
                f"use 'ln2d' for a LayerNorm over the channels at each position, or 'gn1' for LayerNorm-style "
                f"statistics over (C, *spatial) with a per-channel affine")
        if family in ("batch_norm", "instance_norm"):
            dims = _slot_dims(old)
            kind = f"{family}{dims or 2}d"
    merged["type"] = kind
    try:
        return registry.build(merged, features, **overrides)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{where}: {err}") from None


def _channels(module: nn.Module) -> int:
    if isinstance(module, (nn.GroupNorm, layers.GroupNorm, layers.LayerNorm2d)):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):  # a channels-first LayerNorm subclass: normalized_shape (C,)
        return module.normalized_shape[0]
    return module.num_features


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


def convert(model: nn.Module, spec, **overrides) -> nn.Module:
    """Replace every normalization layer of `model` by the layer `spec` names, built for that slot.

    Args:
        model: any nn.Module; changed in place.
        spec: a preset name ("gn32", "bn", "frozen_bn", ...), a spec dict {"type": ..., **kwargs}, or a class /
            callable taking num_features.
        overrides: constructor arguments replacing the preset's (e.g. ``compile=False``, ``eps=1e-3``).

    Returns:
        `model` (or the new layer when `model` itself is a norm layer).

    Raises:
        ConversionError (a ValueError) naming the path of the first layer that cannot be replaced, before any
        layer is swapped; PresetError for an unknown preset.

    Example::

        >>> model = normzoo.convert(model, "gn32", compile=False)
    """
    if isinstance(spec, (str, Mapping)):
        registry.resolve_spec(spec)  # unknown name: PresetError before anything else
    fallback = next((p for p in model.parameters() if p.is_floating_point()), None)
    # Build every replacement first, so a failing layer leaves the model untouched.
    replacements: dict[int, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=True):
        if not is_norm_layer(module):
            continue
        new = _build_for(path or "<root>", module, spec, overrides)
        ref = _reference_tensor(module, fallback)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        _carry_state(module, new)
        new.train(module.training)
        replacements[id(module)] = new

    if id(model) in replacements:
        return replacements[id(model)]
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if id(child) in replacements:
                setattr(module, name, replacements[id(child)])
    return model
