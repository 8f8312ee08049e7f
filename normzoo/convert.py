"""normzoo.convert: swap every normalization layer of a model for a preset, by name.

    model = torchvision_like_resnet()
    model = normzoo.convert(model, "gn32")            # every BatchNorm2d -> normzoo.GroupNorm(32, C)
    model = normzoo.convert(model, "frozen_bn")       # BatchNorm -> FrozenBatchNorm2d with its statistics

Slots that are converted: torch.nn's BatchNorm1d/2d/3d (and Lazy*), SyncBatchNorm, InstanceNorm1d/2d/3d, GroupNorm,
LayerNorm and RMSNorm, and normzoo's own layers (FrozenBatchNorm2d and SyncBatchNorm included). Other modules
(LocalResponseNorm, user classes) are left as they are.

Rules:
- num_features comes from the old layer: num_features, num_channels, or normalized_shape for a LayerNorm slot.
- Channel slots (BatchNorm, InstanceNorm, GroupNorm, ...) normalize dim 1 of (N, C, *): a preset of the batch_norm or
  instance_norm family is built with the slot's dimensionality (BatchNorm1d slot -> BatchNorm1d, 3d -> 3d; slots of
  no fixed dimensionality, GroupNorm and SyncBatchNorm, get the 2d layer). A layer_norm preset cannot fill a channel
  slot (it normalizes the last dim): ConversionError, naming the path and suggesting gn1.
- LayerNorm / RMSNorm slots over the last dim D normalize features at the end of (*, D): only layer_norm presets fill
  them. A LayerNorm([C, H, W]) slot (channels first) can take a channel preset with C channels.
- Weight and bias are copied where the shapes match; running_mean / running_var / num_batches_tracked where both
  layers have them. Device, dtype and train/eval mode are kept.
- A layer that cannot be built (GroupNorm(32) over 48 channels, say) raises ConversionError naming its path.
The model is changed in place (as torch.nn.SyncBatchNorm.convert_sync_batchnorm does) and returned; if `model` is
itself a norm layer the new layer is returned.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import layers, registry
from .frozen import FrozenBatchNorm2d
from .sync import SyncBatchNorm

__all__ = ["convert", "ConversionError", "is_norm_layer"]


class ConversionError(ValueError):
    """A norm layer of the model cannot be replaced by the preset; the message names the layer's path."""


_NN_BN = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, Lazy*, SyncBatchNorm
_NN_IN = nn.modules.instancenorm._InstanceNorm
_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_CHANNEL_SLOTS = (_NN_BN, _NN_IN, nn.GroupNorm, layers._ChannelNorm, layers.GroupNorm, FrozenBatchNorm2d)
_LAST_DIM_SLOTS = (nn.LayerNorm, layers.LayerNorm) + _RMS


def is_norm_layer(module: nn.Module) -> bool:
    """True for the layers convert() replaces."""
    return isinstance(module, _CHANNEL_SLOTS + _LAST_DIM_SLOTS)


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
        try:
            return registry.build(spec, features, **overrides)
        except (ValueError, TypeError) as err:
            raise ConversionError(f"{path}: cannot replace {_describe(old)} with {spec!r}: {err}") from None

    merged = registry.resolve_spec(spec)
    kind = merged["type"]
    family = _family(kind)
    where = f"{path}: cannot replace {_describe(old)} with preset {_spec_name(spec)} ({kind})"
    if isinstance(old, _LAST_DIM_SLOTS):
        shape = tuple(old.normalized_shape)
        if kind == "layer_norm":
            features = shape if len(shape) > 1 else shape[0]
        elif len(shape) > 1:  # LayerNorm([C, H, W]) on (N, C, H, W): channels are at dim 1
            features = shape[0]
            if family in ("batch_norm", "instance_norm"):
                kind = f"{family}{len(shape) - 1}d" if len(shape) - 1 in (1, 2, 3) else kind
        else:
            raise ConversionError(
                f"{where}: {type(old).__name__} normalizes the last dim (features last, (*, {shape[0]})), while "
                f"{kind} normalizes channels at dim 1 of (N, C, *); use a layer_norm preset such as 'ln'")
    else:
        features = _channels(old)
        if kind == "layer_norm":
            raise ConversionError(
                f"{where}: layer_norm normalizes the last dim, but this slot normalizes channels at dim 1 of "
                f"(N, C, *); use 'gn1' for LayerNorm-style statistics over (C, *spatial) with a per-channel affine")
        if family in ("batch_norm", "instance_norm"):
            dims = _slot_dims(old)
            kind = f"{family}{dims or 2}d"
    merged["type"] = kind
    try:
        return registry.build(merged, features, **overrides)
    except (ValueError, TypeError) as err:
        raise ConversionError(f"{where}: {err}") from None


def _channels(module: nn.Module) -> int:
    if isinstance(module, (nn.GroupNorm, layers.GroupNorm)):
        return module.num_channels
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
