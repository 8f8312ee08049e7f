"""torch.nn.functional-compatible entry points, all computed by normzoo's own engine.

Same positional order and defaults as torch.nn.functional, plus keyword-only `activation` (fused after the
affine) and `compile` (False: run the engine eagerly). Errors name the offending shape or value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import policy
from .engine import ACTIVATIONS, NormSpec, compute_dtype

__all__ = ["group_norm", "layer_norm", "instance_norm", "batch_norm", "rms_norm", "layer_norm2d"]


def _check_activation(activation: str | None) -> None:
    if activation is not None and not (isinstance(activation, str) and activation in ACTIVATIONS):
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)} or None")


def _check_affine(name: str, t_shape: torch.Size | None, shape: tuple[int, ...], what: str) -> None:
    if t_shape is not None and tuple(t_shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(t_shape)}")


def _check_floating(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"normzoo norms need a floating-point input, got dtype {dtype}")


def _check_more_than_one_value(size: list[int]) -> None:
    # torch.nn.functional raises the same ValueError when each statistic would see a single value.
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _shape(t: Tensor | None) -> torch.Size | None:
    return None if t is None else t.shape


def _specs(make):
    """The checks of a call depend on its shapes, dtype and settings only, so each entry point validates a
    combination once and keeps the spec it made (None: an empty input): a layer's later calls skip both (about
    10 us of a small input's call). Errors are not kept; arguments that cannot be hashed are checked every time."""
    cached = functools.lru_cache(maxsize=1024)(make)

    @functools.wraps(make)
    def spec(*args):
        if torch.compiler.is_compiling():  # dynamo traces the checks themselves (and warns on a cache wrapper)
            return make(*args)
        try:  # hashed once, by the cache
            return cached(*args)
        except TypeError:
            if _can_hash(args):  # the checks' own TypeError (a dtype that is not floating): as it was raised
                raise
        return make(*args)  # an argument that cannot be hashed: checked every time, uncached

    return spec


def _can_hash(args: tuple) -> bool:
    try:
        hash(args)
    except TypeError:
        return False
    return True


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
    spec = _group_norm_spec(input.shape, input.dtype, _shape(weight), _shape(bias), num_groups, eps, activation)
    if spec is None:
        return _empty_output(input, weight, bias)
    return policy.run(spec, input, weight, bias, compile=compile)


@_specs
def _group_norm_spec(shape, dtype, weight, bias, num_groups, eps, activation) -> NormSpec | None:
    _check_floating(dtype)
    _check_activation(activation)
    if len(shape) < 2:
        raise ValueError(f"group_norm expects an input of shape (N, C, *), got {tuple(shape)}")
    C = shape[1]
    if num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"num_channels ({C}) must be divisible by num_groups ({num_groups})")
    _check_more_than_one_value([shape[0] * C // num_groups, num_groups] + list(shape[2:]))
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if math.prod(shape) == 0:
        return None
    return NormSpec(groups=num_groups, eps=float(eps), activation=activation)


def layer_norm(input: Tensor, normalized_shape: Sequence[int] | int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, *, activation: str | None = None,
               compile: bool = True) -> Tensor:
    """Layer Normalization over the trailing dims `normalized_shape`; see normzoo.LayerNorm."""
    spec = _layer_norm_spec("layer_norm", input.shape, input.dtype, _hashable(normalized_shape), _shape(weight),
                            _shape(bias), eps, activation, True)
    if spec is None:
        return _empty_output(input, weight, bias)
    return policy.run(spec, input, weight, bias, compile=compile)


def _hashable(normalized_shape):
    return normalized_shape if isinstance(normalized_shape, int) else tuple(normalized_shape)


@_specs
def _layer_norm_spec(name, shape, dtype, normalized_shape, weight, bias, eps, activation, center) -> NormSpec | None:
    """layer_norm's and rms_norm's checks and spec (rms_norm: center=False, eps already resolved, no bias)."""
    _check_floating(dtype)
    _check_activation(activation)
    trailing = _trailing_shape(name, shape, normalized_shape)
    _check_affine("weight", weight, trailing, "normalized_shape")
    _check_affine("bias", bias, trailing, "normalized_shape")
    if math.prod(shape) == 0:
        return None
    return NormSpec(groups=None, eps=float(eps), dims=tuple(range(-len(trailing), 0)), center=center,
                    activation=activation)


def _trailing_shape(name: str, input_shape, normalized_shape: Sequence[int] | int) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or tuple(input_shape[len(input_shape) - k:]) != shape or len(input_shape) < k:
        raise ValueError(f"{name}: input of shape {tuple(input_shape)} does not end with normalized_shape {shape}")
    return shape


def rms_norm(input: Tensor, normalized_shape: Sequence[int] | int, weight: Tensor | None = None,
             eps: float | None = None, *, activation: str | None = None, compile: bool = True) -> Tensor:
    """Root Mean Square Layer Normalization over the trailing dims `normalized_shape`; see normzoo.RMSNorm.

    y = x / sqrt(mean(x^2) + eps) * weight: no mean is subtracted and there is no bias. eps=None means
    torch.finfo(t).eps of the dtype t the arithmetic runs in: the input's for float32/float64, float32's for
    float16/bfloat16 (what torch.nn.functional.rms_norm does).
    """
    if eps is None:
        _check_floating(input.dtype)
        eps = torch.finfo(compute_dtype(input.dtype)).eps
    spec = _layer_norm_spec("rms_norm", input.shape, input.dtype, _hashable(normalized_shape), _shape(weight), None,
                            eps, activation, False)
    if spec is None:
        return _empty_output(input, weight, None)
    return policy.run(spec, input, weight, None, compile=compile)


def layer_norm2d(input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-6, *,
                 activation: str | None = None, compile: bool = True) -> Tensor:
    """Channels-first Layer Normalization: over the C channels (dim 1) at each position of (N, C, *).

    Computes what ``F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias, eps).permute(0, 3, 1, 2)`` computes,
    without the permutes' copies, in either memory format; see normzoo.LayerNorm2d.
    """
    spec = _layer_norm2d_spec(input.shape, input.dtype, _shape(weight), _shape(bias), eps, activation)
    if spec is None:
        return _empty_output(input, weight, bias)
    return policy.run(spec, input, weight, bias, compile=compile)


@_specs
def _layer_norm2d_spec(shape, dtype, weight, bias, eps, activation) -> NormSpec | None:
    _check_floating(dtype)
    _check_activation(activation)
    if len(shape) < 2:
        raise ValueError(f"layer_norm2d expects an input of shape (N, C, *), got {tuple(shape)}")
    C = shape[1]
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if math.prod(shape) == 0:
        return None
    return NormSpec(groups=None, eps=float(eps), dims=(1,), activation=activation)


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
    spec = _instance_norm_spec(input.shape, input.dtype, _shape(weight), _shape(bias), eps, activation)
    if spec is None:  # (torch raises an IndexError on a (0, C, *) batch)
        return _empty_output(input, weight, bias)
    return policy.run(spec, input, weight, bias, compile=compile)


@_specs
def _instance_norm_spec(shape, dtype, weight, bias, eps, activation) -> NormSpec | None:
    _check_floating(dtype)
    _check_activation(activation)
    if len(shape) < 3:
        raise ValueError(f"instance_norm expects an input of shape (N, C, *spatial), got {tuple(shape)}")
    C = shape[1]
    if math.prod(shape[2:]) == 1:  # torch.nn.functional.instance_norm refuses this too
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {list(shape)}")
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if math.prod(shape) == 0:
        return None
    return NormSpec(groups=C, eps=float(eps), activation=activation)


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
    m_tensor = momentum if isinstance(momentum, Tensor) else None
    spec = _batch_norm_spec(input.shape, input.dtype, _shape(running_mean), _shape(running_var), _shape(weight),
                            _shape(bias), bool(training), "tensor" if m_tensor is not None else momentum, eps,
                            activation)
    if spec is None:
        return _empty_output(input, weight, bias)
    return policy.run(spec, input, weight, bias, running_mean, running_var,
                      m_tensor if spec.momentum is not None else None, compile=compile)


@_specs
def _batch_norm_spec(shape, dtype, running_mean, running_var, weight, bias, training, momentum, eps,
                     activation) -> NormSpec | None:
    """batch_norm's checks and spec; momentum "tensor": a tensor momentum (the spec then holds 0.0, and the tensor
    is passed to the engine)."""
    _check_floating(dtype)
    _check_activation(activation)
    empty = math.prod(shape) == 0
    if empty and (len(shape) < 2 or shape[1] == 0):
        # no channel dim, or no channels: torch returns an empty tensor whatever the buffers' sizes
        if training:
            _check_more_than_one_value(list(shape))
        return None
    if len(shape) < 2:
        raise ValueError(f"batch_norm expects an input of shape (N, C, *), got {tuple(shape)}")
    C = shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_affine(name, t, (C,), "one per channel")
    _check_affine("weight", weight, (C,), "one per channel")
    _check_affine("bias", bias, (C,), "one per channel")
    if training:
        if (running_mean is None) != (running_var is None):  # one buffer updated and not the other: refused, as torch
            raise ValueError("batch_norm: running_mean and running_var must either both be None or neither be None, "
                             f"got running_mean={'None' if running_mean is None else 'a tensor'} and "
                             f"running_var={'None' if running_var is None else 'a tensor'}")
        _check_more_than_one_value(list(shape))
        if eps <= 0.0:  # as torch.nn.functional.batch_norm: zero-variance channels would give inf/NaN
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm with training=False needs running_mean and running_var")
    if empty:  # torch leaves the running statistics alone on an empty batch
        return None
    update = training and running_mean is not None
    return NormSpec(groups=C, eps=float(eps), batch=True, batch_stats=training,
                    momentum=(0.0 if isinstance(momentum, str) and momentum == "tensor" else float(momentum))
                    if update else None,
                    activation=activation)
