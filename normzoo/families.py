"""The family of a layer: of a layer type (a spec's "type"), of a built normzoo layer, and the geometry of what it
computes (which elements its statistics take, the shape of its affine). The sweeps and `normzoo check` share these.

Families: group_norm, layer_norm2d, layer_norm, rms_norm, instance_norm, batch_norm (sync_batch_norm and
frozen_batch_norm are batch_norm). Generic instance_norm / batch_norm types take their dimensionality from the input.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .frozen import FrozenBatchNorm2d
from .layers import GroupNorm, LayerNorm, _BatchNorm, _InstanceNorm
from .sync import SyncBatchNorm

FAMILIES = ("group_norm", "layer_norm2d", "layer_norm", "rms_norm", "instance_norm", "batch_norm")


def family_of(layer_type: str) -> str:
    """group_norm, layer_norm2d, layer_norm, rms_norm, instance_norm or batch_norm (sync_batch_norm,
    frozen_batch_norm: batch_norm)."""
    return next((f for f in FAMILIES if f in layer_type), layer_type)


def fix_type(spec: dict, ndim: int) -> dict:
    """Generic instance_norm / batch_norm take their dimensionality from the shape (bn on 4-D and 5-D)."""
    kind = spec["type"]
    if kind in ("instance_norm", "batch_norm") and 2 <= ndim <= 5:
        spec = dict(spec, type=f"{kind}{max(ndim - 2, 1)}d")
    return spec


def family_of_layer(zoo: nn.Module) -> str | None:
    """The family of a built normzoo layer that has an oracle geometry (Geometry); None for any other layer."""
    for cls, fam in ((GroupNorm, "group_norm"), (LayerNorm, "layer_norm"), (_InstanceNorm, "instance_norm"),
                     (_BatchNorm, "batch_norm"), (FrozenBatchNorm2d, "batch_norm"), (SyncBatchNorm, "batch_norm")):
        if isinstance(zoo, cls):
            return fam
    return None


@dataclass(frozen=True)
class Geometry:
    """What the `like` layer computes: statistics per `groups` of channels (over the batch for BatchNorm), or over
    the last `k` dims for LayerNorm; eps; the activation after the affine."""

    family: str
    shape: tuple[int, ...]
    eps: float
    groups: int = 1
    over_batch: bool = False
    k: int = 1
    activation: str | None = None
    title: str = ""

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def affine_shape(self) -> tuple[int, ...]:
        return self.shape[-self.k:] if self.family == "layer_norm" else (self.channels,)


def geometry(zoo: nn.Module, shape: tuple[int, ...], family: str) -> Geometry:
    """The Geometry of `zoo` (the layer a user's is meant to be, or a sweep's) on inputs of `shape`."""
    kind = type(zoo).__name__
    act = getattr(zoo, "activation", None)
    if family == "group_norm":
        g = zoo.num_groups
        return Geometry(family, shape, zoo.eps, g, False, activation=act, title=f"GroupNorm({g}, {shape[1]})")
    if family == "layer_norm":
        ns = tuple(zoo.normalized_shape)
        return Geometry(family, shape, zoo.eps, k=len(ns), activation=act, title=f"LayerNorm({list(ns)})")
    if family == "instance_norm":
        return Geometry(family, shape, zoo.eps, shape[1], False, activation=act, title=f"{kind}({shape[1]})")
    return Geometry(family, shape, zoo.eps, shape[1], True, activation=act, title=f"{kind}({shape[1]})")
