"""The one engine: a moments routine and a normalize/affine routine. This is the code Inductor compiles.

Every family is a `NormSpec` over the same math. For an input x of shape (N, C, *spatial):

    moments   per (sample, channel) over the spatial dims: shifted single pass, sums in float64 for float32 input
    combine   pool them over the C/G channels of each group (and over the batch for BatchNorm): biased variance
    y         (x - mean) * rsqrt(var + eps) * weight + bias,   then an optional fused activation

GroupNorm pools C/G channels; InstanceNorm is G = C (nothing to pool); BatchNorm is G = C pooled over the batch;
LayerNorm takes the moments of the trailing `normalized_shape` dims of each row directly.
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
    """What to normalize over; static (hashable), so each spec compiles to its own kernel."""

    groups: int | None  # channel norms: C is split into this many groups; None: layer norm
    eps: float
    trailing: int = 0  # layer norm: how many trailing dims the statistics are taken over
    batch: bool = False  # BatchNorm: the batch dim joins the reduced set
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
    catastrophically when the mean is large next to the spread (torch's channels_last CPU kernels do not shift).
    The sums run in stats_dtype(x.dtype). The shift is detached: mean and variance do not depend on it.
    Returns the shift in x's dtype, mean - shift and the variance in stats_dtype.
    """
    sd = stats_dtype(x.dtype)
    if not dims:  # sets of one element each: the mean is the element itself (no shift: it carries the gradient)
        return torch.zeros_like(x), x.to(sd), torch.zeros_like(x, dtype=sd)
    if x.numel() == 0:  # an empty batch: no statistics to take, and nothing they would be applied to
        zero = x.detach().sum(dims, keepdim=True).to(sd)
        return zero.to(x.dtype), zero, zero + 1
    shift = x.detach()
    for d in dims:
        shift = shift.narrow(d, 0, 1)
    n = _count(x, dims)
    d = x.to(sd) - shift.to(sd)  # exact: float32 differences are representable in float64
    mean_d = d.sum(dims, keepdim=True) / n
    var = ((d * d).sum(dims, keepdim=True) / n - mean_d * mean_d).clamp_min(0)
    return shift, mean_d, var


def combine(shift: Tensor, mean_d: Tensor, var: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Pool the moments of equal-sized sets over `dims` (keepdim): the parallel-variance formula (Chan et al.),
    var = mean(var_i) + mean((mean_i - mean)^2), so no E[x^2] - E[x]^2 cancellation between the sets either.
    Returns the pooled mean and biased variance, in mean_d's dtype."""
    means = shift.to(mean_d.dtype) + mean_d
    mean = means.mean(dims, keepdim=True)
    return mean, var.mean(dims, keepdim=True) + (means - mean).square().mean(dims, keepdim=True)


def normalize_affine(x: Tensor, shift: Tensor, mean_d: Tensor, var: Tensor, eps: float,
                     weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """((x - shift) - mean_d) * rsqrt(var + eps) * weight + bias, computed in compute_dtype(x.dtype).

    mean = shift + mean_d. Subtracting the shift first keeps inputs with a large mean exact.
    """
    cd = compute_dtype(x.dtype)
    return _apply(x, shift, mean_d.to(cd), _scale(var, eps, weight, cd), bias)


def _scale(var: Tensor, eps: float, weight: Tensor | None, cd: torch.dtype) -> Tensor:
    scale = torch.rsqrt(var + eps).to(cd)
    return scale if weight is None else scale * weight.to(cd)


def _apply(x: Tensor, shift: Tensor, mean_d: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    cd = compute_dtype(x.dtype)
    y = ((x.to(cd) - shift.to(cd)) - mean_d) * scale
    return y if bias is None else y + bias.to(cd)


def forward(
    spec: NormSpec,
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Normalize x as `spec` says; inputs are validated by normzoo.functional before they get here.

    running_mean / running_var: read when spec.batch_stats is False; updated in place (EMA with spec.momentum,
    or with the tensor `momentum` when given, for the cumulative average) when spec.momentum is set.
    Returns (y, params): params are the small per-channel (or per-row) tensors y is computed from. Returning
    them makes Inductor store them once, instead of recomputing the rsqrt and the divisions for every element.
    """
    cd = compute_dtype(x.dtype)
    if spec.groups is None:  # layer norm: statistics per row over the trailing dims, affine per element
        dims = tuple(range(x.dim() - spec.trailing, x.dim()))
        shift, mean_d, var = moments(x, dims)
        mean_d, scale = mean_d.to(cd), _scale(var, spec.eps, None, cd)
        y = _apply(x, shift, mean_d, scale, None)
        if weight is not None:
            y = y * weight.to(cd)
        if bias is not None:
            y = y + bias.to(cd)
        params = (mean_d, scale)
    else:
        # channel norms: moments per (sample, channel) over the spatial dims, pooled over the channels of a group
        # (and the batch, for BatchNorm). Per-channel partial sums keep every loop affine in the channel index, so
        # Inductor vectorizes them in both memory formats.
        N, C, G = x.shape[0], x.shape[1], spec.groups
        per_channel = (N, C) + (1,) * (x.dim() - 2)
        affine = (C,) + (1,) * (x.dim() - 2)
        if spec.batch_stats:
            shift, mean_d, var = moments(x, tuple(range(2, x.dim())))
            members = lambda t: t.reshape(N, G, C // G)  # noqa: E731
            mean, var = combine(members(shift), members(mean_d), members(var), (0, 2) if spec.batch else (2,))
            if spec.momentum is not None and running_mean is not None and running_var is not None:
                _update_running(spec, x.numel() // C, mean, var, running_mean, running_var, momentum)
            mean_d = (mean - members(shift).to(mean.dtype)).reshape(per_channel)
            var = var.expand(N, G, C // G).reshape(per_channel)
        else:
            shift = running_mean.reshape(affine)
            mean_d = torch.zeros_like(shift, dtype=cd)
            var = running_var.reshape(affine)
        mean_d = mean_d.to(cd)
        scale = _scale(var, spec.eps, None if weight is None else weight.reshape(affine), cd)
        y = _apply(x, shift, mean_d, scale, None if bias is None else bias.reshape(affine))
        params = (mean_d, scale)
    if spec.activation is not None:
        y = ACTIVATIONS[spec.activation](y)
    return y.to(x.dtype), tuple(p.detach() for p in params)


def _update_running(spec, n, mean, var, running_mean, running_var, momentum) -> None:
    """BatchNorm's running buffers: EMA of the batch mean and of the *unbiased* batch variance (n values)."""
    factor = spec.momentum if momentum is None else momentum
    with torch.no_grad():
        batch_var = var.reshape(-1) * (n / max(n - 1, 1))
        running_mean.mul_(1 - factor).add_(mean.reshape(-1).to(running_mean.dtype) * factor)
        running_var.mul_(1 - factor).add_(batch_var.to(running_var.dtype) * factor)
