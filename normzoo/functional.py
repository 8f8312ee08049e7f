"""torch.nn.functional-compatible entry points, all computed by normzoo's own engine.

Same positional order and defaults as torch.nn.functional, plus keyword-only `activation` (fused after the
affine) and `compile` (False: run the engine eagerly). Errors name the offending shape or value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import policy
from .engine import ACTIVATIONS, NormSpec, compute_dtype

__all__ = ["group_norm", "layer_norm", "instance_norm", "batch_norm", "rms_norm", "layer_norm2d"]


def _check_activation(activation: str | None) -> None:
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)} or None")


def _check_affine(name: str, t: Tensor | None, shape: tuple[int, ...], what: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(t.shape)}")


def _check_floating(input: Tensor) -> None:
    if not input.is_floating_point():
        raise TypeError(f"normzoo norms need a floating-point input, got dtype {input.dtype}")


def _check_more_than_one_value(size: list[int]) -> None:
    # torch.nn.functional raises the same ValueError when each statistic would see a single value.
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _empty_output(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The answer for an input with no elements, as torch's: an empty copy of the input, tied to weight and bias
    so that backward gives them zero gradients, not None (ATen's batch_norm does the same with weight[0] and
    bias[0], which raises an IndexError when they are empty; this does not). No statistics, nothing updated."""
    out = input.clone()
    for p in (weight, bias):
        if p is not None:
            out = out + p.sum() * 0  # a 0-dim term on an empty output: adds nothing, keeps the dtype
    return out


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *, activation: str | None = None, compile: bool = True) -> Tensor:
    """Group Normalization over (C/G channels, *spatial) of each sample and group; see normzoo.GroupNorm."""
    _check_floating(input)
    _check_activation(activation)
    if input.dim() < 2:
        raise ValueError(f"group_norm expects an input of shape (N, C, *), got {tuple(input.shape)}")
    C = input.shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_channels ({C}) must be divisible by num_groups ({num_groups})")
    _check_more_than_one_value([input.shape[0] * C // num_groups, num_groups] + list(input.shape[2:]))
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    spec = NormSpec(groups=num_groups, eps=float(eps), activation=activation)
    return policy.run(spec, input, weight, bias, compile=compile)


def layer_norm(input: Tensor, normalized_shape: Sequence[int] | int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, *, activation: str | None = None,
               compile: bool = True) -> Tensor:
    """Layer Normalization over the trailing dims `normalized_shape`; see normzoo.LayerNorm."""
    _check_floating(input)
    _check_activation(activation)
    shape = _trailing_shape("layer_norm", input, normalized_shape)
    _check_affine("weight", weight, shape, "normalized_shape")
    _check_affine("bias", bias, shape, "normalized_shape")
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    spec = NormSpec(groups=None, eps=float(eps), dims=tuple(range(-len(shape), 0)), activation=activation)
    return policy.run(spec, input, weight, bias, compile=compile)


def _trailing_shape(name: str, input: Tensor, normalized_shape: Sequence[int] | int) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or tuple(input.shape[input.dim() - k:]) != shape or input.dim() < k:
        raise ValueError(f"{name}: input of shape {tuple(input.shape)} does not end with normalized_shape {shape}")
    return shape


def rms_norm(input: Tensor, normalized_shape: Sequence[int] | int, weight: Tensor | None = None,
             eps: float | None = None, *, activation: str | None = None, compile: bool = True) -> Tensor:
    """Root Mean Square Layer Normalization over the trailing dims `normalized_shape`; see normzoo.RMSNorm.

    y = x / sqrt(mean(x^2) + eps) * weight: no mean is subtracted and there is no bias. eps=None means
    torch.finfo(t).eps of the dtype t the arithmetic runs in: the input's for float32/float64, float32's for
    float16/bfloat16 (what torch.nn.functional.rms_norm does).
    """
    _check_floating(input)
    _check_activation(activation)
    shape = _trailing_shape("rms_norm", input, normalized_shape)
    _check_affine("weight", weight, shape, "normalized_shape")
    if input.numel() == 0:
        return _empty_output(input, weight, None)
    eps = torch.finfo(compute_dtype(input.dtype)).eps if eps is None else eps
    spec = NormSpec(groups=None, eps=float(eps), dims=tuple(range(-len(shape), 0)), center=False,
                    activation=activation)
    return policy.run(spec, input, weight, None, compile=compile)


def layer_norm2d(input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6, *,
                 activation: str | None = None, compile: bool = True) -> Tensor:
    """Channels-first Layer Normalization: over the C channels (dim 1) at each position of (N, C, *).

    Computes what ``F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias, eps).permute(0, 3, 1, 2)`` computes,
    without the permutes' copies, in either memory format; see normzoo.LayerNorm2d.
    """
    _check_floating(input)
    _check_activation(activation)
    if input.dim() < 2:
        raise ValueError(f"layer_norm2d expects an input of shape (N, C, *), got {tuple(input.shape)}")
    C = input.shape[1]
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    spec = NormSpec(groups=None, eps=float(eps), dims=(1,), activation=activation)
    return policy.run(spec, input, weight, bias, compile=compile)


def instance_norm(input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                  weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, activation: str | None = None,
                  compile: bool = True) -> Tensor:
    """Instance Normalization: statistics per sample and channel over the spatial dims (GroupNorm with G = C).

    Unlike torch.nn.functional.instance_norm this refuses running statistics: only BatchNorm keeps them.
    """
    if running_mean is not None or running_var is not None or not use_input_stats:
        raise ValueError(
            "instance_norm does not use running statistics (running_mean/running_var/use_input_stats=False): "
            "only BatchNorm keeps them in normzoo; use normzoo.functional.batch_norm or normzoo.BatchNorm*d")
    _check_floating(input)
    _check_activation(activation)
    if input.dim() < 3:
        raise ValueError(f"instance_norm expects an input of shape (N, C, *spatial), got {tuple(input.shape)}")
    C = input.shape[1]
    if math.prod(input.shape[2:]) == 1:  # torch.nn.functional.instance_norm refuses this too
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {list(input.shape)}")
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if input.numel() == 0:  # (torch raises an IndexError on a (0, C, *) batch)
        return _empty_output(input, weight, bias)
    spec = NormSpec(groups=C, eps=float(eps), activation=activation)
    return policy.run(spec, input, weight, bias, compile=compile)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float | Tensor = 0.1, eps: float = 1e-5, *, activation: str | None = None,
               compile: bool = True) -> Tensor:
    """Batch Normalization: statistics per channel over (N, *spatial); see normzoo.BatchNorm2d.

    training=True normalizes with the batch statistics and, when running buffers are given, updates them in
    place: running = (1 - momentum) * running + momentum * batch, with the *unbiased* batch variance. `momentum`
    may be a 0-dim tensor (the layers pass 1 / num_batches_tracked for the cumulative average).
    training=False normalizes with the running buffers.
    """
    _check_floating(input)
    _check_activation(activation)
    if input.numel() == 0 and (input.dim() < 2 or input.shape[1] == 0):
        # no channel dim, or no channels: torch returns an empty tensor whatever the buffers' sizes
        if training:
            _check_more_than_one_value(list(input.shape))
        return _empty_output(input, weight, bias)
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got {tuple(input.shape)}")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_affine(name, t, (C,), "one per channel")
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if training:
        _check_more_than_one_value(list(input.shape))
        if eps <= 0.0:  # as torch.nn.functional.batch_norm: zero-variance channels would give inf/NaN
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm with training=False needs running_mean and running_var")
    if input.numel() == 0:  # torch leaves the running statistics alone on an empty batch
        return _empty_output(input, weight, bias)
    m_tensor = momentum if isinstance(momentum, Tensor) else None
    # torch leaves the running statistics alone on an empty batch
    update = training and running_mean is not None and running_var is not None and input.numel() > 0
    spec = NormSpec(groups=C, eps=float(eps), batch=True, batch_stats=training,
                    momentum=(0.0 if m_tensor is not None else float(momentum)) if update else None,
                    activation=activation)
    return policy.run(spec, input, weight, bias, running_mean, running_var, m_tensor if update else None,
                         compile=compile)
