"""The one engine: a moments routine and a normalize/affine routine. This is the code Inductor compiles.

Every family is a `NormSpec` over the same math. For an input x of shape (N, C, *spatial):

    view      x.unflatten(1, (G, C // G))   (channel families; a view for any strides, so channels_last stays free)
    mean, var over `spec.dims` of that view (var biased: divide by n), sums in float64 for float32 input
    y         (x - mean) * rsqrt(var + eps) * weight + bias,   then an optional fused activation

GroupNorm reduces (C/G channels, spatial); InstanceNorm is G = C; BatchNorm is G = C with the batch dim added to
the reduced set; LayerNorm reduces the trailing `normalized_shape` dims with no channel split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,  # erf form, as torch.nn.GELU()
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


@dataclass(frozen=True)
class NormSpec:
    """What to normalize over; static (hashable) so each spec compiles to its own kernel."""

    groups: int | None  # split dim 1 into (groups, C // groups); None: no split (layer_norm)
    dims: tuple[int, ...]  # dims of that view the statistics are taken over
    eps: float
    batch_stats: bool = True  # False: normalize with the given running statistics (BatchNorm eval)
    momentum: float | None = None  # BatchNorm training: EMA factor for the running buffers; None: no update
    activation: str | None = None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the elementwise math: float16 and bfloat16 compute in float32, the rest in their own."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sums accumulate in: float64 for float32/float64 inputs (sums of thousands of float32 terms
    lose up to 50x the float32 floor otherwise), float32 for float16/bfloat16."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _count(x: Tensor, dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:  # a plain loop: dynamo does not trace math.prod over a generator
        n *= x.shape[d]
    return n


def moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of x over dims (keepdim), in a single pass: (shift, mean - shift, biased variance).

    Each reduced set is shifted by one of its own elements before the sums, so E[d^2] - E[d]^2 does not cancel
    catastrophically when the mean is large next to the spread (torch's channels_last CPU kernels do not shift),
    and x - shift is exact in float32 when x and the shift are close. The sums run in stats_dtype(x.dtype).
    The shift is detached: mean and variance do not depend on it, so its gradient is exactly zero.
    Returns shift and mean - shift in x's dtype, variance in stats_dtype.
    """
    if x.numel() == 0:  # an empty batch: no statistics to take, and nothing they would be applied to
        zero = x.sum(dims, keepdim=True)
        return zero, zero, zero + 1
    shift = x.detach()
    for d in dims:
        shift = shift.narrow(d, 0, 1)
    n = _count(x, dims)
    d = (x - shift).to(stats_dtype(x.dtype))
    mean_d = d.sum(dims, keepdim=True) / n
    var = ((d * d).sum(dims, keepdim=True) / n - mean_d * mean_d).clamp_min(0)
    return shift, mean_d.to(x.dtype), var


def normalize_affine(x: Tensor, shift: Tensor, mean_d: Tensor, var: Tensor, eps: float,
                     weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """((x - shift) - mean_d) * rsqrt(var + eps) * weight + bias, with mean = shift + mean_d.

    Subtracting the shift first keeps inputs with a large mean exact; weight and bias are folded into one
    per-channel scale and offset.
    """
    scale = torch.rsqrt(var + eps).to(x.dtype)
    if weight is not None:
        scale = scale * weight
    y = ((x - shift) - mean_d) * scale
    return y if bias is None else y + bias


def forward(
    spec: NormSpec,
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: Tensor | None = None,
) -> Tensor:
    """Normalize x as `spec` says. Inputs are validated by normzoo.functional before they get here.

    running_mean / running_var: read when spec.batch_stats is False; updated in place (EMA with spec.momentum,
    or with the tensor `momentum` when given, for the cumulative average) when spec.momentum is set.
    """
    acc = compute_dtype(x.dtype)
    xa = x.to(acc)
    if spec.groups is None:  # layer_norm: affine broadcasts over the trailing dims as it is
        xv, affine_shape = xa, None
    else:
        xv = xa.unflatten(1, (spec.groups, x.shape[1] // spec.groups))
        affine_shape = (spec.groups, -1) + (1,) * (x.dim() - 2)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    if affine_shape is not None:
        w = None if w is None else w.reshape(affine_shape)
        b = None if b is None else b.reshape(affine_shape)

    if spec.batch_stats:
        shift, mean_d, var = moments(xv, spec.dims)
        if spec.momentum is not None and running_mean is not None and running_var is not None:
            _update_running(spec, xv, shift, mean_d, var, running_mean, running_var, momentum)
    else:
        stat_shape = (1, -1, 1) + (1,) * (x.dim() - 2)
        shift = running_mean.to(acc).reshape(stat_shape)
        mean_d = torch.zeros_like(shift)
        var = running_var.to(acc).reshape(stat_shape)

    y = normalize_affine(xv, shift, mean_d, var, spec.eps, w, b)
    if spec.activation is not None:
        y = ACTIVATIONS[spec.activation](y)
    return y.reshape(x.shape).to(x.dtype)


def _update_running(spec, xv, shift, mean_d, var, running_mean, running_var, momentum) -> None:
    """BatchNorm's running buffers: EMA of the batch mean and of the *unbiased* batch variance."""
    n = _count(xv, spec.dims)
    factor = spec.momentum if momentum is None else momentum
    with torch.no_grad():
        batch_mean = (shift.to(var.dtype) + mean_d.to(var.dtype)).reshape(-1)
        batch_var = var.reshape(-1) * (n / max(n - 1, 1))
        running_mean.mul_(1 - factor).add_(batch_mean.to(running_mean.dtype) * factor)
        running_var.mul_(1 - factor).add_(batch_var.to(running_var.dtype) * factor)
