"""FrozenBatchNorm2d: BatchNorm with fixed statistics and a fixed affine, as torchvision's and detectron2's."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as NF
from .layers import _Extras, _fast_forward

__all__ = ["FrozenBatchNorm2d"]


class FrozenBatchNorm2d(_Extras, nn.Module):
    r"""BatchNorm2d whose statistics and affine transform are fixed buffers, not parameters.

    .. math::
        y = \frac{x - \text{running\_mean}}{\sqrt{\text{running\_var} + \epsilon}} * \text{weight} + \text{bias}

    The same output in train and eval mode: nothing is learned and the running statistics are never updated.
    Used to fine-tune detection backbones with batches too small for BatchNorm (torchvision.ops.misc and
    detectron2's FrozenBatchNorm2d). Computed by normzoo's engine (the BatchNorm eval path), not by torch's ops.

    Buffers (torchvision's state_dict keys): ``weight`` (ones), ``bias`` (zeros), ``running_mean`` (zeros),
    ``running_var`` (ones). Loading a BatchNorm checkpoint works: its ``num_batches_tracked`` is ignored.

    Args:
        num_features: C, the channels.
        eps: added to running_var. Default: 1e-5 (torchvision's; detectron2 uses 1e-5 too)
        device, dtype: of the buffers.
        compile: run Inductor-compiled kernels. Default: True
        activation: fuse ``"silu"``, ``"relu"``, ``"gelu"`` or ``"gelu_tanh"`` after the affine. Default: None

    Shape:
        - Input: :math:`(N, C, *)` (normally :math:`(N, C, H, W)`)
        - Output: same as the input

    Example::

        >>> m = normzoo.FrozenBatchNorm2d(64)
        >>> m.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
        >>> y = m(torch.randn(2, 64, 32, 32))

    ``FrozenBatchNorm2d.convert_frozen_batchnorm(model)`` (detectron2's name) swaps a model's BatchNorms for frozen
    ones: normzoo.convert (above this module) defines it and attaches it to this class.
    """

    num_features: int
    eps: float

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *, compile: bool = True,
                 activation: str | None = None) -> None:
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        self._init_extras(compile, activation)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("bias", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A BatchNorm checkpoint carries num_batches_tracked; a frozen layer has no use for it (as torchvision).
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _fast_buffers(self) -> tuple:
        buffers = self._buffers  # read, never updated, in train and eval alike
        return buffers.get("running_mean"), buffers.get("running_var")

    @_fast_forward
    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm2d({self.num_features}) expects input of shape "
                             f"(N, {self.num_features}, *), got {tuple(input.shape)}")
        return NF.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                             self.eps, activation=self.activation, compile=self.compile)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + self._extras_repr()
