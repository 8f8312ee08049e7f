"""normzoo: GroupNorm, LayerNorm, InstanceNorm, BatchNorm, RMSNorm and LayerNorm2d from one torch.compile'd engine,
picked by name."""

from . import functional
from .layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
)
from .registry import available, build, load_presets, norm_factory
from .frozen import FrozenBatchNorm2d
from .sync import SyncBatchNorm
from .convert import ConversionError, ConversionWarning, convert
from .check import CheckError, check  # the function shadows the module name: import normzoo.check's names from it
from ._version import __version__
from .policy import cache_info
from .precompile import precompile

__all__ = [
    "GroupNorm", "LayerNorm", "RMSNorm", "LayerNorm2d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "FrozenBatchNorm2d", "SyncBatchNorm", "convert", "ConversionError", "ConversionWarning",
    "functional", "build", "norm_factory", "available", "load_presets", "check", "CheckError",
    "precompile", "cache_info",
]
