"""The one engine: a moments routine and a normalize/affine routine. This is the code Inductor compiles.

Every family is a `NormSpec` over the same math. For an input x of shape (N, C, *spatial):

    moments   per (sample, channel) over the spatial dims: shifted single pass, sums in float64 for float32 input
    combine   pool them over the C/G channels of each group (and over the batch for BatchNorm): biased variance
    y         (x - mean) * rsqrt(var + eps) * weight + bias,   then an optional fused activation

GroupNorm pools C/G channels; InstanceNorm is G = C (nothing to pool); BatchNorm is G = C pooled over the batch.
Layer norms take the moments over their `dims` directly, at each position of the other dims: LayerNorm over the
trailing `normalized_shape` dims of each row, LayerNorm2d over the channels (dim 1) at each (sample, position).
A spec with center=False (RMSNorm) takes the mean as 0: the variance becomes the mean square, E[x^2].
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {  # name -> the function fused after the affine
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,  # erf form, as torch.nn.GELU()
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def _gelu_tanh_grad(z: Tensor) -> Tensor:
    k = math.sqrt(2.0 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)


# name -> d act(z) / dz, written out: the backward is traced by dynamo, which does not trace autograd.grad
ACTIVATION_GRADS = {
    "silu": lambda z: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z))),
    "relu": lambda z: (z > 0).to(z.dtype),
    "gelu": lambda z: 0.5 * (1 + torch.erf(z * (0.5**0.5))) + z * torch.exp(-0.5 * z * z) * (0.5 / math.pi) ** 0.5,
    "gelu_tanh": _gelu_tanh_grad,
}


@dataclass(frozen=True)
class NormSpec:
    """What to normalize over; static (hashable), so each spec compiles to its own kernel.

    A family is data: channel norms (`groups` set) reduce each sample's groups of channels over the spatial dims (and
    the batch, for BatchNorm), with the affine per channel; layer norms (`groups` None) reduce `dims` at each position
    of the other dims, with the affine spanning `dims`: LayerNorm over k trailing dims is dims=(-k, ..., -1),
    channels-first LayerNorm2d is dims=(1,). `center` says whether the mean is subtracted (RMSNorm: False).
    """

    groups: int | None  # channel norms: C is split into this many groups; None: layer norm
    eps: float
    dims: tuple[int, ...] = ()  # layer norm: the dims statistics reduce and the affine spans (<0: from the end)
    center: bool = True  # False: no centring (RMSNorm): the mean is taken as 0, so the variance is E[x^2]
    batch: bool = False  # BatchNorm: the batch dim joins the reduced set
    batch_stats: bool = True  # False: normalize with the given running statistics (BatchNorm eval)
    momentum: float | None = None  # BatchNorm training: EMA factor for the running buffers; None: no update
    activation: str | None = None

    def __post_init__(self) -> None:
        if not self.center and self.batch:  # a running mean of 0 would not be what the train statistics were
            raise ValueError("NormSpec: center=False (RMS statistics) is not defined with running statistics")

    def layer_dims(self, ndim: int) -> tuple[int, ...]:
        """A layer norm's `dims` as non-negative dims of an ndim-dim input, in order."""
        return tuple(sorted(d % ndim for d in self.dims))


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


def mean_square(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of a norm that does not centre (RMSNorm), as the triple moments() returns: a shift of 0, a mean of
    0 and, in the variance's place, the mean square E[x^2] over dims (keepdim), summed in stats_dtype(x.dtype).

    A sum of squares has no cancellation to shift away: its relative error is that of the sum alone.
    """
    sq = x.to(stats_dtype(x.dtype)).square()
    ms = sq.sum(dims, keepdim=True) / _count(x, dims) if dims else sq  # sum(()) would reduce everything
    zero = torch.zeros_like(ms)
    return zero.to(x.dtype), zero, ms


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
) -> Tensor:
    """Normalize x as `spec` says; inputs are validated by normzoo.functional before they get here.

    running_mean / running_var: read when spec.batch_stats is False; updated in place (EMA with spec.momentum,
    or with the tensor `momentum` when given, for the cumulative average) when spec.momentum is set.
    """
    with torch.no_grad():  # the statistics' share of the gradient is in _Normalize.backward's formula
        shift, mean_d, rstd = statistics(spec, x, running_mean, running_var, momentum)
    return _Normalize.apply(spec, x, weight, bias, shift, mean_d, rstd)


def statistics(spec: NormSpec, x: Tensor, running_mean=None, running_var=None, momentum=None):
    """(shift, mean - shift, rstd) broadcastable to x (per row, or per sample and channel), in compute_dtype.

    Channel norms take moments per (sample, channel) over the spatial dims and pool them over the channels of a
    group (and the batch, for BatchNorm): per-channel partial sums keep every loop affine in the channel index, so
    Inductor vectorizes them in both memory formats. BatchNorm training also updates the running buffers here.
    """
    cd = compute_dtype(x.dtype)
    take = moments if spec.center else mean_square  # (shift, mean - shift, variance) of each reduced set
    if spec.groups is None:  # layer norm: moments over spec.dims at each position of the other dims
        shift, mean_d, var = take(x, spec.layer_dims(x.dim()))
    elif not spec.batch_stats:  # BatchNorm eval: the running statistics
        affine = (x.shape[1],) + (1,) * (x.dim() - 2)
        shift, var = running_mean.reshape(affine), running_var.reshape(affine)
        mean_d = torch.zeros_like(shift, dtype=cd)
    else:
        N, C, G = x.shape[0], x.shape[1], spec.groups
        per_channel = (N, C) + (1,) * (x.dim() - 2)
        shift, mean_d, var = take(x, tuple(range(2, x.dim())))
        members = lambda t: t.reshape(N, G, C // G)  # noqa: E731
        mean, var = combine(members(shift), members(mean_d), members(var), (0, 2) if spec.batch else (2,))
        if spec.momentum is not None and running_mean is not None and running_var is not None:
            _update_running(spec, x.numel() // C, mean, var, running_mean, running_var, momentum)
        mean_d = (mean - members(shift).to(mean.dtype)).reshape(per_channel)
        var = var.expand(N, G, C // G).reshape(per_channel)
    return shift, stored(mean_d.to(cd)), stored(torch.rsqrt(var + spec.eps).to(cd))


# Set by normzoo.compiling once Inductor is loaded: torch.ops.prims.inductor_force_stride_order.
STORE_OP = None


def stored(t: Tensor, like: Tensor | None = None) -> Tensor:
    """Have Inductor compute a small per-channel tensor once into a buffer.

    Left to itself, Inductor inlines such pointwise results into the elementwise loop that reads them, and with
    libm's errno semantics the compiler cannot hoist the rsqrt and divisions out of it: they would run once per
    element vector. Forcing a layout realizes the buffer (with the strides of `like`, when given). Eagerly this
    is the identity.
    """
    if STORE_OP is not None and torch.compiler.is_compiling():
        return STORE_OP(t, (t if like is None else like).stride())
    return t


def _affine_view(spec: NormSpec, x: Tensor, t: Tensor | None, cd: torch.dtype) -> Tensor | None:
    """weight/bias shaped to broadcast against x: over the dims the affine spans (a layer norm's dims; dim 1, the
    channels, for channel norms)."""
    if t is None:
        return None
    dims = (1,) if spec.groups is not None else spec.layer_dims(x.dim())
    return t.to(cd).reshape([x.shape[d] if d in dims else 1 for d in range(dims[0], x.dim())])


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.sum(dims, keepdim=True) if dims else t  # sum(()) would reduce everything


class _Normalize(torch.autograd.Function):
    """y = act(((x - shift) - mean_d) * rstd * weight + bias), with the full norm's gradient written out.

    The derived backward of the shifted, pooled statistics costs extra passes; this one takes one pass over
    (x, dy) for the per-(sample, channel) sums of dy and dy * (x - shift) (in stats_dtype), then one
    elementwise pass: dx = rstd * (dy' - mean(dy') - xhat * mean(dy' * xhat)), means over each normalized set,
    dy' = dy * weight (and the activation's derivative).
    """

    @staticmethod
    def forward(ctx, spec, x, weight, bias, shift, mean_d, rstd):
        cd = compute_dtype(x.dtype)
        w, b = _affine_view(spec, x, weight, cd), _affine_view(spec, x, bias, cd)
        if spec.groups is None:  # per-row rstd, per-element weight
            y = ((x.to(cd) - shift.to(cd)) - mean_d) * rstd
            y = y if w is None else y * w
        else:
            y = ((x.to(cd) - shift.to(cd)) - mean_d) * (rstd if w is None else stored(rstd * w))
        y = y if b is None else y + b
        if spec.activation is not None:
            y = ACTIVATIONS[spec.activation](y)
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, shift, mean_d, rstd)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        spec = ctx.spec
        x, weight, bias, shift, mean_d, rstd = ctx.saved_tensors
        cd, sd = compute_dtype(x.dtype), stats_dtype(x.dtype)
        w, b = _affine_view(spec, x, weight, cd), _affine_view(spec, x, bias, cd)
        # x - shift, spelled differently from the forward's: if AOTAutograd's CSE merged the two, its partitioner
        # would save this full-size difference for the backward (an extra write in the forward) instead of x
        xc = x.to(cd) + (-shift.to(cd))
        xhat = (xc - mean_d) * rstd
        g = dy.to(cd)
        if spec.activation is not None:  # through the activation, recomputing its input
            pre = xhat if w is None else xhat * w
            g = g * ACTIVATION_GRADS[spec.activation](pre if b is None else pre + b)
        r, m = rstd.to(sd), mean_d.to(sd)
        dx = dweight = dbias = None
        if spec.groups is None:  # layer norm: sums of dy' = dy * weight over each set; parameter grads over the rest
            stat_dims = spec.layer_dims(x.dim())
            gw = g if w is None else g * w
            a = _sum(gw.to(sd), stat_dims)
            c = _sum(gw.to(sd) * xc.to(sd), stat_dims) - m * a  # sum of dy' * (x - mean)
            k1, k0 = _dx_coefficients(r, m, a, c, _count(x, stat_dims), cd, spec.center)
            if ctx.needs_input_grad[1]:
                dx = gw * rstd + (xc * k1 + k0)
            rows = tuple(d for d in range(x.dim()) if d not in stat_dims)
            if weight is not None and ctx.needs_input_grad[2]:
                dweight = _sum(g * ((xc - mean_d) * rstd), rows).reshape(weight.shape)
            if bias is not None and ctx.needs_input_grad[3]:
                dbias = _sum(g, rows).reshape(bias.shape)
        else:
            # one pass over (x, dy): per-(sample, channel) sums of dy and dy * (x - mean); the parameter grads and
            # the pooled means of dx's formula all come from them
            a = _sum(g.to(sd), tuple(range(2, x.dim())))
            c = _sum(g.to(sd) * xc.to(sd), tuple(range(2, x.dim()))) - m * a
            if weight is not None and ctx.needs_input_grad[2]:
                dweight = (r * c).sum(0).reshape(weight.shape)
            if bias is not None and ctx.needs_input_grad[3]:
                dbias = a.sum(0).reshape(bias.shape)
            if ctx.needs_input_grad[1]:
                scale = rstd if w is None else stored(rstd * w)
                if x.numel() == 0 or not spec.batch_stats:  # BatchNorm eval: an affine map of x
                    dx = g * scale
                else:
                    N, C, G = x.shape[0], x.shape[1], spec.groups
                    if w is not None:  # sums of dy' = dy * weight
                        a, c = a * w.to(sd), c * w.to(sd)
                    members = lambda t: t.reshape(N, G, C // G)  # noqa: E731
                    pool = (0, 2) if spec.batch else (2,)
                    a = members(a).sum(pool, keepdim=True).expand(N, G, C // G).reshape(rstd.shape)
                    c = members(c).sum(pool, keepdim=True).expand(N, G, C // G).reshape(rstd.shape)
                    n = x.numel() // C * (C // G) // (1 if spec.batch else N)
                    k1, k0 = _dx_coefficients(r, m, a, c, n, cd, spec.center)
                    dx = g * scale + (xc * k1 + k0)
        if dx is not None:
            # in x's memory format: dynamo traces this backward with a contiguous dy, and Inductor would otherwise
            # write a channels_last dx transposed, for autograd to copy back into x's layout
            dx = stored(dx.to(x.dtype), like=x)
        dweight = None if dweight is None else dweight.to(weight.dtype)
        dbias = None if dbias is None else dbias.to(bias.dtype)
        return None, dx, dweight, dbias, None, None, None


def _dx_coefficients(r, m, a, c, n, cd, center=True):
    """dx = r * (dy' - mean(dy') - xhat * mean(dy' * xhat)) = r * dy' + k1 * (x - shift) + k0, per set.

    r: rstd, m: mean - shift, a: sum of dy', c: sum of dy' * (x - mean) over each normalized set of n elements.
    Without centring (RMSNorm: xhat = x * r, r = rsqrt(E[x^2] + eps)) the mean has no share in the gradient:
    dx = r * (dy' - xhat * mean(dy' * xhat)), the same formula without the mean(dy') term (and m = 0).
    """
    mean_g = a * (1.0 / n) if center else 0.0
    mean_gx = r * c * (1.0 / n)
    k1 = stored((-r * r * mean_gx).to(cd))
    k0 = stored((r * (r * mean_gx * m - mean_g)).to(cd))
    return k1, k0


def _update_running(spec, n, mean, var, running_mean, running_var, momentum) -> None:
    """BatchNorm's running buffers: EMA of the batch mean and of the *unbiased* batch variance (n values)."""
    factor = spec.momentum if momentum is None else momentum
    with torch.no_grad():
        batch_var = var.reshape(-1) * (n / max(n - 1, 1))
        running_mean.mul_(1 - factor).add_(mean.reshape(-1).to(running_mean.dtype) * factor)
        running_var.mul_(1 - factor).add_(batch_var.to(running_var.dtype) * factor)
