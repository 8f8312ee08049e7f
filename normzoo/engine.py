"""The one engine: a moments routine and a normalize/affine routine. This is the code Inductor compiles.

Every family is a `NormSpec` over the same math. For an input x of shape (N, C, *spatial):

    shift     one per set: the mean of the set's first 16 elements
    sums      of d = x - shift and d^2, per row (layer norm, contiguous groups) or per (sample, channel), in
              float32 for float32 input, cascaded over chunks of at most 256 elements
    pool      the sums over the C/G channels of each group (and the batch for BatchNorm): plain sums, one shift
    y         ((x - shift) - mean_d) * rsqrt(var + eps) * weight + bias,   then an optional fused activation

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
    """The dtype of the arithmetic, sums included: float16 and bfloat16 compute in float32, the rest in their own."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# Sums run in compute_dtype: float32 for float32 input. What keeps them accurate is how they are taken, not a
# wider type: every set is shifted by the mean of a few of its own elements (so E[d^2] - E[d]^2 loses almost
# nothing: the shift is within a fraction of a standard deviation of the mean), and each sum is cascaded over
# chunks of at most CHUNK elements (rounding grows with the chunk and chunk-count lengths, not with n). On an
# AVX-512 Xeon the float64 sums this replaces cost 3-6x torch's forward time.
CHUNK = 256
# Inductor's settings for every normzoo kernel: the kernel store's packages (builder), the in-memory compiles
# (compiling) and scripts/bench_passes.py.
# - cpp.dynamic_threads: the thread count read at run time, not baked into the kernel, so that a process with another
#   thread count finds the same kernels.
# - ffp-contract=fast (Inductor's default is off): gcc fuses a multiply and the add of its product into one FMA, one
#   rounding where there were two.
#   Measured on an AVX-512 Xeon (lscpu model 167), the layer-norm backward's package against ATen's kernel,
#   interleaved, 1 / 2 threads: LayerNorm(768) on 8x197x768 1.32 -> 1.18 / 1.13 -> 1.05x, LayerNorm(384) 1.41 ->
#   1.28 / 1.05 -> 0.99x, with the same errors against the float64 oracle at a mean of 1e3 (1.0-1.2e-7).
INDUCTOR_CONFIGS = {"cpp.dynamic_threads": True, "cpp.enable_floating_point_contract_flag": "fast"}
STATS_DTYPE = torch.float64  # of the per-set sums and moments: a handful of values per set
SHIFT_ELEMENTS = 16  # one vector: the shift is the mean of each set's first elements


def _chunk(n: int) -> int:
    """The first-level length of a two-level sum over n elements: a divisor of n of at most CHUNK (a multiple of
    16 where one exists, so the inner loop vectorizes without a tail); n itself when n is small or has none."""
    if n <= 2 * CHUNK:
        return n
    divisors = [d for d in range(CHUNK, 15, -1) if n % d == 0]
    aligned = [d for d in divisors if d % 16 == 0]
    return (aligned or divisors or [n])[0]


def sum_dim(t: Tensor, dim: int) -> Tensor:
    """t.sum(dim, keepdim=True) as a two-level cascade, in float64: chunks of _chunk(n) elements summed in t's
    dtype (the vectorized pass over the data), then the few chunk sums in float64. Pooling such sums over channels
    or the batch also runs in float64: that costs nothing next to the pass over the data."""
    dim = dim % t.dim()
    n = t.shape[dim]  # never a batch dim: those are symbolic in compiled kernels, and chunking would branch on them
    L = _chunk(n)
    if L == n:
        return t.sum(dim, keepdim=True).to(STATS_DTYPE)
    return t.unflatten(dim, (n // L, L)).sum(dim + 1).to(STATS_DTYPE).sum(dim, keepdim=True)


BLOCK = 16  # rows (or positions) per first-level block of a blocked sum where Inductor compiles


def _block_sums(t: Tensor, dim: int, blocks: int) -> Tensor:
    """t summed over `dim` (dropped), in float64: padded with zeros to `blocks` blocks of BLOCK along dim (the
    padding adds nothing), each block summed in t's dtype, then the blocks in float64. The dims after `dim` are
    innermost in memory: Inductor loops a reduction innermost, so the walk down `dim` stays within a block.
    For a symbolic size along `dim`; a static one takes `_static_block_sums`, without the padding's masks."""
    n = t.shape[dim]
    t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, blocks * BLOCK - n])
    t = t.reshape(tuple(t.shape[:dim]) + (blocks, BLOCK) + tuple(t.shape[dim + 1:])).sum(dim + 1)
    return t.to(STATS_DTYPE).sum(dim)


def _static_block_sums(t: Tensor, block: int = BLOCK) -> Tensor:
    """t (N, S, n), S static and n innermost in memory, summed over S (dropped), in float64: the S // block whole
    blocks summed in t's dtype, then in float64, plus the last S % block positions. Slices of static sizes, where
    padding would make Inductor mask every load of the block loop (a scalar test and a masked load per vector).
    Measured on an AMD EPYC Zen 5, 1 thread, the two column sums of a 96-wide LayerNorm backward on 25088 rows
    compiled alone: 0.555 ms padded to 1570 blocks, 0.266 ms in the 1568 whole blocks (reading x + dy: 0.38 ms). On
    an AVX-512 Xeon (1 thread, scripts/bench_passes.py, alternated processes) that whole backward went from 2.47-2.62
    to 2.29-2.30 ms (ATen's 1.18-1.44 ms)."""
    S = t.shape[1]
    whole = S - S % block
    sums = t.narrow(1, 0, whole).unflatten(1, (whole // block, block)).sum(2).to(STATS_DTYPE).sum(1)
    if whole < S:
        sums = sums + t.narrow(1, whole, S - whole).sum(1).to(STATS_DTYPE)
    return sums


def _column_sums(t: Tensor, innermost: bool, per_sample: int | None = None) -> Tensor:
    """t (rows, n) summed over its rows, in float64. The row count is a batch size (symbolic in compiled kernels),
    so no chunking may depend on it. Where Inductor compiles and the columns are innermost in memory, the rows are
    summed in blocks: within each sample's `per_sample` rows where that count is static (`_static_block_sums`: a
    LayerNorm2d's positions), else over all rows padded (`_block_sums`).
    Why: Inductor loops a column sum column-first, each vector of columns down every row (a 3 KB stride on a
    768-wide LayerNorm); blocks keep that walk within 16 rows. Measured on an AVX-512 Xeon, 2 threads, the
    backward of LayerNorm(768) on 8x197x768: its column pass 0.49 ms plain, 0.27 ms blocked, the whole backward 0.93
    to 0.72 ms (ATen's 0.67 ms); float64 inside the blocks was no faster than plain. Error of dweight against the
    float64 oracle (relative to its largest value): 7.9e-8 plain, 1.1e-7 blocked, 9.1e-7 for torch.nn's."""
    if torch.compiler.is_compiling() and innermost:
        if per_sample is not None and per_sample >= BLOCK:
            return _static_block_sums(t.reshape(t.shape[0] // per_sample, per_sample, t.shape[-1])).sum(0)
        # one block more than needed: at least 2 for any row count, so no guard tells 1 block apart
        return _block_sums(t, 0, t.shape[0] // BLOCK + 2)
    return t.to(STATS_DTYPE).sum(0)


def _channel_sums(t: Tensor, block: int = BLOCK) -> Tensor:
    """t (N, C, S) summed over S (keepdim), in float64, as sum_dim does. Where Inductor compiles and the channels are
    innermost in memory (channels_last), the positions are summed in blocks of `block` (`_static_block_sums`). Why: a
    chunk of 256 positions walked each 16-channel vector down 256 rows C floats apart (1 KB for C = 256). Measured on
    an AVX-512 Xeon, 2 threads, channels_last forwards: GroupNorm(32) on 8x256x32x32 0.90 to 0.71 ms (contiguous: 0.67
    ms), on 8x512x16x16 0.49 to 0.40 ms; BatchNorm2d on 8x1024x14x14 0.72 to 0.60 ms. Error against the float64
    oracle at a mean of 1e3: 1.0-1.2e-7, from 1.2-2.0e-7."""
    N, C, S = t.shape
    # where the walk's stride is short (C < 128: under 512 bytes), or the map is small (7x7: 49 positions) or not
    # nearly whole blocks, the plain chunks measured as fast or faster (GroupNorm(32) on 32x512x7x7 channels_last,
    # backward, AVX-512 Xeon, 1 thread: 1.29-1.33 ms as one chunk, 1.37-1.40 ms in 3 blocks of 16 and a remainder)
    if (torch.compiler.is_compiling() and t.stride(1) == 1 and C >= 128 and S >= 64 and S // block >= 2
            and S % block <= S // 8):
        return _static_block_sums(t.transpose(1, 2), block).unsqueeze(-1)
    return sum_dim(t, -1)


# Positions per block of the forward's channels_last statistics (the backward's sums keep BLOCK). Measured on an
# AVX-512 Xeon (lscpu model 167), 1 thread, kernels against ATen's, alternated processes, two each, blocks of 16 ->
# 64: GroupNorm(32) forward on 2x320x32x32 1.21, 1.24x -> 1.12, 1.13x; on 8x256x28x28 0.59, 0.64x -> 0.53, 0.51x; on
# 16x512x14x14 0.82, 0.84x -> 0.80, 0.85x; BatchNorm2d train on 8x256x28x28 0.90, 0.89x -> 0.79, 0.83x. Blocks of 32
# and 128 were between or slower; the same blocks in the backward were no faster (BatchNorm2d 8x256x28x28: 2.35,
# 2.25 -> 2.43, 2.55 ms).
CHANNEL_BLOCK = 64


def _forward_channel_sums(t: Tensor) -> Tensor:
    """_channel_sums in blocks of CHANNEL_BLOCK."""
    return _channel_sums(t, CHANNEL_BLOCK)


def _count(x: Tensor, dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:  # a plain loop: dynamo does not trace math.prod over a generator
        n *= x.shape[d]
    return n


def _row_sums(t: Tensor) -> Tensor:
    """t summed over its last dim (keepdim), in float64: sum_dim."""
    return sum_dim(t, -1)


def _shifted_sums(rows: Tensor, shift: Tensor, total=_row_sums) -> tuple[Tensor, Tensor]:
    """Sums of d and d^2 over the last dim of `rows`, d = rows - shift (in shift's dtype), keepdim, float64, taken by
    `total` (_row_sums; _channel_sums for (N, C, S) channel rows)."""
    d = rows.to(shift.dtype) - shift
    return total(d), total(d * d)


def _first_mean(rows: Tensor, cd: torch.dtype, center: bool = True) -> Tensor:
    """Mean of the first SHIFT_ELEMENTS elements of each row (keepdim): the shift of that row's set. Without
    centring (RMSNorm) there is nothing to shift: 0.

    Detached: the statistics and y are the same function of x whatever the shift (mean = shift + sum(x - shift)
    / n, and the variance and x - mean likewise), so every derivative through it is exactly zero, to any order.
    Left attached, autograd carries that zero back as a full-size tensor scattered from the first elements: in a
    user's torch.compile, a BatchNorm2d backward on 8x256x32x32 wrote and read it in two extra passes."""
    k = min(SHIFT_ELEMENTS, rows.shape[-1])
    # each element scaled, then summed: a reduction with nothing after it, which Inductor computes in the loop over
    # the rows that reads them (a division after the sum is a pointwise step of its own, a loop across the rows)
    first = (rows.narrow(-1, 0, k).to(cd) * (1.0 / k)).sum(-1, keepdim=True).detach()
    return first if center else torch.zeros_like(first)


def _moments_from_sums(s1: Tensor, s2: Tensor, n: int, center: bool = True) -> tuple[Tensor, Tensor]:
    """(mean - shift, biased variance) of sets of n elements from their shifted sums (float64). Without
    centring the mean is 0 and the 'variance' is the mean square E[x^2]."""
    if not center:
        return torch.zeros_like(s2), s2 / n
    mean_d = s1 / n
    return mean_d, (s2 / n - mean_d * mean_d).clamp_min(0)


def moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of x over dims (keepdim): (shift in compute_dtype, mean - shift, biased variance in float64).

    The general form of what `statistics` does per family (used by SyncBatchNorm for its local moments): the
    shift is the mean of the first elements of each set; the sums are cascaded (`sum_dim`).
    """
    cd = compute_dtype(x.dtype)
    if not dims:  # sets of one element each: the mean is the element itself
        return torch.zeros_like(x, dtype=cd), x.to(cd), torch.zeros_like(x, dtype=cd)
    rows, stat_shape = _rows(x, tuple(sorted(d % x.dim() for d in dims)))
    if rows.shape[-1] == 0:  # an empty set: no statistics
        zero = torch.zeros(stat_shape, dtype=cd, device=x.device)
        return zero, zero, zero + 1
    shift = _first_mean(rows, cd)
    mean_d, var = _moments_from_sums(*_shifted_sums(rows, shift), rows.shape[-1])
    return shift.reshape(stat_shape), mean_d.reshape(stat_shape), var.reshape(stat_shape)


def normalize_affine(x: Tensor, shift: Tensor, mean_d: Tensor, var: Tensor, eps: float,
                     weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """((x - shift) - mean_d) * rsqrt(var + eps) * weight + bias, computed in compute_dtype(x.dtype).

    mean = shift + mean_d. Subtracting the shift first keeps inputs with a large mean exact.
    """
    cd = compute_dtype(x.dtype)
    scale = torch.rsqrt(var.to(cd) + eps)
    scale = scale if weight is None else scale * weight.to(cd)
    y = ((x.to(cd) - shift.to(cd)) - mean_d.to(cd)) * scale
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
    if under_functorch():  # torch.func transforms: plain differentiable ops, no custom Function
        return reference_forward(spec, x, weight, bias, running_mean, running_var, momentum)
    with torch.no_grad():  # the statistics' share of the gradient is in _Normalize.backward's formula
        shift, mean_d, rstd = statistics(spec, x, running_mean, running_var, momentum)
    return _Normalize.apply(spec, x, weight, bias, shift, mean_d, rstd)


def under_functorch() -> bool:
    """True inside a torch.func transform (vmap, grad, jacrev, jvp, ...), whose wrapped tensors a custom
    autograd.Function without functorch rules cannot take."""
    if torch.compiler.is_compiling():  # dynamo handles torch.func itself (and cannot trace these queries)
        return False
    return torch._C._functorch.maybe_current_level() is not None


def reference_forward(spec: NormSpec, x: Tensor, weight=None, bias=None, running_mean=None, running_var=None,
                      momentum=None) -> Tensor:
    """The engine's same math with the statistics differentiated by autograd instead of a written-out backward:
    differentiable to any order (double backward) and by torch.func. Slower; used only where those are asked for.

    The shift drops out of every derivative exactly (mean = shift + sum(x - shift) / n), so it needs no detach.
    """
    shift, mean_d, rstd = statistics(spec, x, running_mean, running_var, momentum)
    return _normalize(spec, x, weight, bias, shift, mean_d, rstd)


def _layer_rows(spec: NormSpec, t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """_rows over a layer norm's dims."""
    return _rows(t, spec.layer_dims(t.dim()))


def _rows(t: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """t with `dims` (sorted, non-negative) moved last and flattened: (*other dims, n), a view where the dims are the
    trailing ones or a single dim; and the shape its statistics broadcast with (1 at the reduced dims)."""
    keep = [d for d in range(t.dim()) if d not in dims]
    moved = t.permute(keep + list(dims)) if keep != list(range(len(keep))) else t
    rows = moved.reshape(tuple(t.shape[d] for d in keep) + (_count(t, dims),))
    return rows, tuple(1 if d in dims else t.shape[d] for d in range(t.dim()))


def _channel_rows(x: Tensor) -> Tensor:
    """x (N, C, *spatial) as (N, C, S): a view for contiguous and channels_last inputs."""
    return x.reshape(x.shape[0], x.shape[1], _count(x, tuple(range(2, x.dim()))))


def statistics(spec: NormSpec, x: Tensor, running_mean=None, running_var=None, momentum=None):
    """(shift, mean - shift, rstd) broadcastable to x (per row, or per sample and channel), in compute_dtype.

    Every set (a row for layer norm; a sample's group, or a channel over the batch, for channel norms) is shifted by
    the mean of its first elements, and the sums of d and d^2 are taken per row or per (sample, channel) and
    pooled: one shift per set makes the pooled sums plain sums. A contiguous group is summed as one row.
    BatchNorm training also updates the running buffers here.
    """
    cd = compute_dtype(x.dtype)
    if spec.groups is None:  # layer norm: one set per position of the other dims
        rows, stat_shape = _layer_rows(spec, x)
        if x.numel() == 0:  # no statistics, and nothing they would be applied to
            zero = torch.zeros(stat_shape, dtype=cd, device=x.device)
            return zero, zero, zero + 1
        shift = _first_mean(rows, cd, spec.center)
        mean_d, var = _moments_from_sums(*_shifted_sums(rows, shift), rows.shape[-1], spec.center)
        return shift.reshape(stat_shape), stored(mean_d.to(cd).reshape(stat_shape)), stored(
            torch.rsqrt(var + spec.eps).to(cd).reshape(stat_shape))
    if x.numel() == 0:  # an empty batch: no statistics, nothing they would be applied to (buffers stay as they are)
        zero = torch.zeros(x.shape[:2] + (1,) * (x.dim() - 2), dtype=cd, device=x.device)
        return zero, zero, zero + 1
    N, C = x.shape[0], x.shape[1]
    if not spec.batch_stats:  # BatchNorm eval: the running statistics
        affine = (1, C) + (1,) * (x.dim() - 2)
        shift = running_mean.to(cd).reshape(affine)
        return shift, torch.zeros_like(shift), stored(torch.rsqrt(running_var.to(cd).reshape(affine) + spec.eps))
    rows = _channel_rows(x)  # (N, C, S)
    S = rows.shape[-1]
    if spec.batch:  # one set per channel over (N, S): shifted by the first elements of sample 0
        shift = _first_mean(rows[:1], cd)  # (1, C, 1)
        s1, s2 = _shifted_sums(rows, shift, _forward_channel_sums)
        # stored: traced for autograd (a user's torch.compile), their gradients are buffers too, not a float64 chain
        # inlined into the dx loop
        mean_d, var = _moments_from_sums(stored(s1.sum(0, keepdim=True)), stored(s2.sum(0, keepdim=True)), N * S)
        if updates_running(spec, running_mean):
            _update_running(spec, N * S, shift + mean_d, var, running_mean, running_var, momentum)
        affine = (1, C) + (1,) * (x.dim() - 2)
        return shift.reshape(affine), stored(mean_d.to(cd).reshape(affine)), stored(
            torch.rsqrt(var + spec.eps).to(cd).reshape(affine))
    shift, mean_d, var = _group_moments(spec, x)
    return _per_channel(spec, x, shift, mean_d, var)


def _group_moments(spec: NormSpec, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(shift, mean - shift in float64, biased variance in float64), each (N, G, 1), of a channel norm's sets: one
    per sample and group of C // G channels, shifted by the first elements of its first channel."""
    cd = compute_dtype(x.dtype)
    N, C, G = x.shape[0], x.shape[1], spec.groups
    members = C // G
    rows = _channel_rows(x)  # (N, C, S)
    S = rows.shape[-1]
    if x.is_contiguous():  # the group's elements are one contiguous row
        group_rows = x.reshape(N, G, members * S)
        shift = _first_mean(group_rows, cd, spec.center)  # (N, G, 1)
        s1, s2 = _shifted_sums(group_rows, shift)
    else:
        shift = _first_mean(rows.unflatten(1, (G, members))[:, :, 0], cd, spec.center)  # (N, G, 1)
        per_member = shift.unsqueeze(2).expand(N, G, members, 1).reshape(N, C, 1)
        s1, s2 = (t.reshape(N, G, members).sum(2, keepdim=True)
                  for t in _shifted_sums(rows, stored(per_member), _forward_channel_sums))
    mean_d, var = _moments_from_sums(s1, s2, members * S, spec.center)
    return shift, mean_d, var


def _per_channel(spec: NormSpec, x: Tensor, shift: Tensor, mean_d: Tensor, var: Tensor):
    """_group_moments' (N, G, 1) results as statistics returns them: (shift, mean - shift, rstd), one value per
    (sample, channel), in compute_dtype, each computed once into a buffer."""
    cd = compute_dtype(x.dtype)
    N, C, G = x.shape[0], x.shape[1], spec.groups
    per_channel = (N, C) + (1,) * (x.dim() - 2)
    expand = lambda t: t.reshape(N, G, 1).expand(N, G, C // G).reshape(per_channel)  # noqa: E731
    return stored(expand(shift)), stored(expand(mean_d.to(cd))), stored(expand(torch.rsqrt(var + spec.eps).to(cd)))


_ops_ready = False  # set by load_ops(), with Inductor (so not at normzoo's import)


def stored(t: Tensor, like: Tensor | None = None) -> Tensor:
    """Have Inductor compute a small per-channel tensor once into a buffer.

    Left to itself, Inductor inlines such pointwise results into the elementwise loop that reads them, and with
    libm's errno semantics the compiler cannot hoist the rsqrt and divisions out of it: they would run once per
    element vector. Forcing a layout realizes the buffer (contiguous, or with the strides of `like`). Eagerly
    this is the identity.

    A tensor autograd differentiates (a user's torch.compile traces the differentiable engine, BatchNorm training)
    goes through normzoo::realized: Inductor's op once Inductor decomposes it (load_ops), with a derivative that
    realizes the incoming gradient too, so that the backward's per-channel terms are also computed once. Not under
    torch.export: an exported program must not need normzoo's ops.
    """
    if torch.compiler.is_compiling() and _ops_loaded():
        strides = like.stride() if like is not None else _contiguous_strides(t.shape)
        if not (torch.is_grad_enabled() and t.requires_grad):
            return torch.ops.prims.inductor_force_stride_order(t, strides)
        if not torch.compiler.is_exporting():
            return torch.ops.normzoo.realized(t, strides)
    return t


@torch.library.custom_op("normzoo::realized", mutates_args=())
def _realized(t: Tensor, strides: list[int]) -> Tensor:
    """t as a buffer of these strides. Inductor computes Inductor's op in its place (load_ops); any other backend
    runs this copy."""
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


@_realized.register_fake
def _(t: Tensor, strides: list[int]) -> Tensor:
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)


def _realized_setup(ctx, inputs, output) -> None:
    ctx.strides = inputs[1]


def _realized_backward(ctx, grad: Tensor):
    return torch.ops.normzoo.realized(grad, ctx.strides), None


_realized.register_autograd(_realized_backward, setup_context=_realized_setup)


def load_ops() -> None:
    """Load Inductor's op and have Inductor decompose normzoo::realized into it (the decomposition table Inductor
    hands AOTAutograd, which applies it below autograd, so the op's derivative still holds)."""
    global _ops_ready
    if _ops_ready:
        return
    from torch._inductor import decomposition, inductor_prims  # noqa: F401  (inductor_prims registers the op)

    # the table and the copy of it Inductor caches at its first compile in the process (select_decomp_table)
    for table in (decomposition.decompositions, decomposition.select_decomp_table()):
        table.setdefault(torch.ops.normzoo.realized.default, torch.ops.prims.inductor_force_stride_order.default)
    _ops_ready = True


@torch._dynamo.assume_constant_result
def _ops_loaded() -> bool:
    """load_ops(), read as a constant of the trace (a guard on _ops_ready would recompile a user's graph traced
    before it was set)."""
    load_ops()
    return True


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _affine_view(spec: NormSpec, x: Tensor, t: Tensor | None, cd: torch.dtype) -> Tensor | None:
    """weight/bias shaped to broadcast against x: per channel, or per element of the normalized shape."""
    if t is None:
        return None
    dims = (1,) if spec.groups is not None else spec.layer_dims(x.dim())
    return t.to(cd).reshape([x.shape[d] if d in dims else 1 for d in range(dims[0], x.dim())])


class _Normalize(torch.autograd.Function):
    """y = act(((x - shift) - mean_d) * rstd * weight + bias), with the full norm's gradient written out.

    The derived backward of the shifted, pooled statistics costs extra passes; this one takes one pass over
    (x, dy) for the per-(sample, channel) sums of dy and dy * (x - shift) (cascaded, `sum_dim`), then one
    elementwise pass: dx = rstd * (dy' - mean(dy') - xhat * mean(dy' * xhat)), means over each normalized set,
    dy' = dy * weight (and the activation's derivative).
    """

    @staticmethod
    def forward(ctx, spec, x, weight, bias, shift, mean_d, rstd):
        ctx.spec = spec
        ctx.save_for_backward(x, weight, bias, shift, mean_d, rstd)
        return _normalize(spec, x, weight, bias, shift, mean_d, rstd)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, shift, mean_d, rstd = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[1:4])
        if torch.is_grad_enabled():  # create_graph=True
            grads = backward_create_graph(ctx.spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
        else:
            grads = backward(ctx.spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
        return (None,) + grads + (None, None, None)


def forward_inference(spec: NormSpec, x: Tensor, weight=None, bias=None, running_mean=None, running_var=None,
                      momentum=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward with no autograd: (y, shift, mean_d, rstd), the statistics being what `backward` needs.
    normzoo.compiling compiles this (an inference graph) and `backward` apart, and ties them with its own
    autograd.Function."""
    if _one_pass(spec, x):
        return _group_forward_one_pass(spec, x, weight, bias)
    if _one_row_pass(spec, x):
        return _layer_forward_one_pass(spec, x, weight, bias)
    shift, mean_d, rstd = statistics(spec, x, running_mean, running_var, momentum)
    return _normalize(spec, x, weight, bias, shift, mean_d, rstd), shift, mean_d, rstd


ONE_PASS_GROUPS = 8  # the fewest groups that take _group_forward_one_pass: its loop is parallel over N * G rows


def _one_pass(spec: NormSpec, x: Tensor) -> bool:
    """Whether Inductor compiles this forward as _group_forward_one_pass: a channel norm with batch statistics
    over contiguous groups, with enough groups that a batch of one still spreads over the threads (GroupNorm(1)
    on 4x96x56x56, 4 rows: no faster, and at 2 threads less even)."""
    return (torch.compiler.is_compiling() and spec.groups is not None and spec.groups >= ONE_PASS_GROUPS
            and not spec.batch and spec.batch_stats and x.dim() > 2 and x.numel() > 0 and x.is_contiguous())


def _group_forward_one_pass(spec: NormSpec, x: Tensor, weight: Tensor | None, bias: Tensor | None):
    """forward_inference of a channel norm over contiguous groups, laid out so that Inductor puts the statistics
    and the normalize in one loop over the (sample, group) rows (its outer-loop fusion): each group is normalized
    right after its sums, while it is still in cache, as ATen's GroupNorm does. The same values as the two-nest form
    (y = (x - shift) * a + k, a = rstd * weight, k = bias - mean_d * a), to the bit.

    What the fusion needs: every loop nest indexed by the row first (the normalize over (rows, C // G, S), its
    per-channel weight and bias read through the row's group), and the per-row rstd and mean as _per_row reductions.
    Measured on an AVX-512 Xeon, 2 threads, forward of GroupNorm(32) on 8x64x56x56 under torch.compile: 0.72 ms
    as two nests, 0.51 ms in one (torch 0.41 ms, a clone 0.29 ms)."""
    cd = compute_dtype(x.dtype)
    N, C, G = x.shape[0], x.shape[1], spec.groups
    members, S = C // G, _count(x, tuple(range(2, x.dim())))
    shift, mean_d, var = _group_moments(spec, x)  # (N, G, 1)
    first = x.reshape(N * G, members * S)
    rstd = _per_row(torch.rsqrt(var + spec.eps).to(cd).reshape(N * G, 1), first).unsqueeze(-1)
    mean = _per_row(mean_d.to(cd).reshape(N * G, 1), first).unsqueeze(-1)

    def per_member(t):  # weight or bias read through each row's group: (N * G, C // G, 1)
        return t.to(cd).reshape(1, G, members).expand(N, G, members).reshape(N * G, members, 1)

    a = rstd if weight is None else rstd * per_member(weight)
    k = -mean * a if bias is None else per_member(bias) - mean * a
    y = (x.reshape(N * G, members, S).to(cd) - shift.reshape(N * G, 1, 1)) * a + k
    if spec.activation is not None:
        y = ACTIVATIONS[spec.activation](y)
    # (N * G, ...) split back first: in one reshape, Inductor could not tell the symbolic N * G rows apart again
    # and copied y into x's shape
    y = y.to(x.dtype).reshape(N, G, members, S).reshape(x.shape)
    return (y,) + _per_channel(spec, x, shift, mean_d, var)


def _one_row_pass(spec: NormSpec, x: Tensor) -> bool:
    """Whether Inductor compiles this layer norm's forward as _layer_forward_one_pass: rows contiguous in memory
    (the normalized dims innermost) of at most ONE_ROW_PASS_MAX elements."""
    if not (torch.compiler.is_compiling() and spec.groups is None and x.numel() > 0):
        return False
    return _count(x, spec.layer_dims(x.dim())) <= ONE_ROW_PASS_MAX and _layer_rows_view(spec, x) is not None


def _layer_rows_view(spec: NormSpec, t: Tensor) -> Tensor | None:
    """t with a layer norm's dims moved last and flattened, (*other dims, n), where that is a view with the n
    elements of each row contiguous (trailing dims of a contiguous t; dim 1 of a channels_last t); else None. Only
    the normalized dims are flattened: a reshape across the symbolic batch and sequence dims would make Inductor
    index the result back into x's shape with divisions per element. A per-row statistic (1 at the normalized
    dims) comes out as (*other dims, 1)."""
    dims = spec.layer_dims(t.dim())
    keep = [d for d in range(t.dim()) if d not in dims]
    moved = t.permute(keep + list(dims))
    inner = zip(moved.shape[len(keep):], moved.stride()[len(keep):], _contiguous_strides(moved.shape[len(keep):]))
    if any(size > 1 and stride != contiguous for size, stride, contiguous in inner):
        return None
    return moved.flatten(len(keep)) if len(dims) > 1 else moved


def _from_layer_rows(spec: NormSpec, t: Tensor, x: Tensor) -> Tensor:
    """The inverse of _layer_rows_view for x's dims: t (*other dims, n) back in x's shape, or a per-row statistic
    (*other dims, 1) in the statistics' (1 at the normalized dims): the last dim unflattened, moved back in place."""
    dims = spec.layer_dims(x.dim())
    keep = [d for d in range(x.dim()) if d not in dims]
    back = [0] * x.dim()
    for i, dim in enumerate(keep + list(dims)):
        back[dim] = i
    inner = (1,) * len(dims) if t.shape[-1] == 1 else tuple(x.shape[d] for d in dims)
    return t.reshape(tuple(t.shape[:len(keep)]) + inner).permute(back)


def _layer_forward_one_pass(spec: NormSpec, x: Tensor, weight: Tensor | None, bias: Tensor | None):
    """forward_inference of a layer norm whose rows are contiguous and short (_one_row_pass), laid out so that
    Inductor computes each row's shift, sums, statistics and output in one loop over the rows (its outer-loop
    fusion): x is read once, each row again while it is in cache. The sums are one-level (16 vector lanes of at most
    64 elements, float32, then float64), as in the backward's row pass; the per-row statistics are _per_row
    reductions, which the row loop computes once per row (as `stored` buffers they would be computed in a loop
    across the rows, a nest of its own that splits the pass)."""
    cd = compute_dtype(x.dtype)
    rows = _layer_rows_view(spec, x)  # (*kept dims, n)
    n = rows.shape[-1]
    shift = _first_mean(rows, cd, spec.center)
    d = rows.to(cd) - shift
    s1, s2 = (t.sum(-1, keepdim=True).to(STATS_DTYPE) for t in (d, d * d))
    mean_d, var = _moments_from_sums(s1, s2, n, spec.center)
    rstd = _per_row(torch.rsqrt(var + spec.eps).to(cd), rows)
    mean = _per_row(mean_d.to(cd), rows)
    w = None if weight is None else weight.to(cd).reshape(n)
    b = None if bias is None else bias.to(cd).reshape(n)
    y = (d - mean) * rstd
    y = y if w is None else y * w
    y = y if b is None else y + b
    if spec.activation is not None:
        y = ACTIVATIONS[spec.activation](y)
    return tuple(_from_layer_rows(spec, t, x) for t in (y.to(x.dtype), shift, mean, rstd))


def _per_row(t: Tensor, rows: Tensor) -> Tensor:
    """t (rows, 1), as the max over SHIFT_ELEMENTS copies of itself, each plus an exact zero read from one of the
    row's first elements: a reduction, which Inductor computes once per row in the loop over rows and vectorizes
    along the copies (the read of the row keeps it from being vectorized across rows). The zero is |x| < 0 as a
    float: exact for every x, NaN and inf included, and a vector compare (nan_to_num(x * 0), before, was a scalar
    isnan loop over the 16 elements, which cost a 96-wide layer-norm row more than its sums). As a plain pointwise
    result it would be inlined into the normalize, its float64 division, sqrt and reciprocal once per vector
    (Inductor compiles with -fmath-errno, so gcc does not hoist them), or, kept in a buffer, computed in a loop
    vectorized across rows, which Inductor does not fuse into the row loop."""
    k = min(SHIFT_ELEMENTS, rows.shape[-1])
    return (t + _exact_zero(rows.narrow(-1, 0, k), t.dtype)).amax(-1, keepdim=True)


def _exact_zero(t: Tensor, dtype: torch.dtype) -> Tensor:
    """0 in `dtype`, shaped and indexed as t, that Inductor cannot fold away (it reads t): |t| < 0 as a float, exact
    for every t, NaN and inf included, and a vector compare (nan_to_num(t * 0) compiles to a scalar isnan loop)."""
    return (t.to(dtype).abs() < 0).to(dtype)


# The longest rows (contiguous) whose layer-norm backward Inductor compiles as one pass over each row (its outer-loop
# fusion): the row sums of dy' and dy' * (x - shift) in one level (16 vector lanes of at most 64 elements, in float32;
# longer rows keep sum_dim's chunks of 256), then dx while the row is in cache. In two levels the combine reads the
# chunk sums at other indices than their loop wrote them, and Inductor does not fuse the loops. It saves one read of
# x and dy, which counts where they do not fit in the cache. Measured on an AMD EPYC Zen 4, the backward's AOTInductor
# package alone against ATen's kernel, both in one process, interleaved, two runs, 1 / 2 threads: LayerNorm(1024) on
# 4x1024x1024 2.68, 2.04 / 2.60, 2.00x ATen before, 2.05, 1.84 / 2.39, 1.63x after; 8x197x768 (in cache) 1.08, 1.13 /
# 1.06, 1.02x before, 1.07, 1.08 / 1.05, 1.06x after; 96-channel rows (LayerNorm2d, channels_last) 1.99, 2.41 / 1.67,
# 1.62x before, 1.99, 2.44 / 1.57, 1.30x after. Errors against the float64 oracle equal to 3 digits.
# The forward likewise (_layer_forward_one_pass): measured on an AVX-512 Xeon (lscpu model 167), its kernel against
# ATen's, 1 thread, alternated processes of the old and new code, two each: LayerNorm2d(96) channels_last on
# 8x96x56x56 1.12, 1.27x -> 0.91, 0.91x; LayerNorm(768) on 8x197x768 1.35, 1.36x -> 1.05, 1.06x; LayerNorm(1024) on
# 4x1024x1024 1.55, 1.65x -> 0.85, 1.07x.
ONE_ROW_PASS_MAX = 1024


def backward(spec: NormSpec, needs: tuple[bool, bool, bool], x, weight, bias, shift, mean_d, rstd, dy):
    """(dx, dweight, dbias) of the norm (None where `needs` says not needed), the full gradient written out.

    One pass over (x, dy) for the per-(sample, channel) or per-row sums of dy and dy * (x - shift) (cascaded,
    `sum_dim`), then one elementwise pass: dx = rstd * (dy' - mean(dy') - xhat * mean(dy' * xhat)), means over each
    normalized set, dy' = dy * weight (and the activation's derivative).
    """
    if _blocked_row_pass(spec, needs, x, weight, bias):
        return _layer_backward_blocked(spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
    cd = compute_dtype(x.dtype)
    w, b = _affine_view(spec, x, weight, cd), _affine_view(spec, x, bias, cd)
    # x - shift, spelled differently from the forward's: if AOTAutograd's CSE merged the two, its partitioner
    # would save this full-size difference for the backward (an extra write in the forward) instead of x
    xc = x.to(cd) + (-shift.to(cd))
    xhat = (xc - mean_d) * rstd
    g = _through_activation(spec, dy.to(cd), xhat, w, b)
    r, m = rstd, mean_d
    needs_x, needs_w, needs_b = needs
    dx = dweight = dbias = None
    if spec.groups is None:  # layer norm: sums of dy' = dy * weight over each set; parameter grads over the rest
        n = _count(x, spec.layer_dims(x.dim()))
        innermost = x.stride(spec.layer_dims(x.dim())[-1]) == 1
        one_row_pass = torch.compiler.is_compiling() and innermost and n <= ONE_ROW_PASS_MAX
        if one_row_pass:  # in one level, read by the dx loop at the index it wrote them (ONE_ROW_PASS_MAX)
            row_sum = lambda t: (  # noqa: E731
                _layer_rows(spec, t)[0].sum(-1, keepdim=True).to(STATS_DTYPE).reshape(r.shape))
        else:
            row_sum = lambda t: sum_dim(_layer_rows(spec, t)[0], -1).reshape(r.shape)  # noqa: E731
        gw = g if w is None else g * w
        a = row_sum(gw)
        c = row_sum(gw * xc) - m * a  # sum of dy' * (x - mean)
        # in one row pass the per-row coefficients are not buffers (`stored`: computed in a loop across the rows,
        # which splits the pass again) but _per_row reductions, computed once per row in the row loop; left inline,
        # Inductor recomputed their ~20 scalar float64 operations for every 16-element vector of dx. Measured on an
        # AVX-512 Xeon, 1 thread, the backward of LayerNorm(768) on 8x197x768 with symbolic rows (as the store builds
        # it), two runs: 1.42, 1.43 -> 1.25, 1.26 ms (ATen's 0.66-0.71 ms; the column sums take about 0.6 ms of it)
        k1, k0 = _dx_coefficients(r, m, a, c, n, cd, spec.center, keep=not one_row_pass)
        x_rows = _layer_rows_view(spec, x) if one_row_pass else None
        if x_rows is not None:
            k1, k0 = (_from_layer_rows(spec, _per_row(_layer_rows_view(spec, k), x_rows), x) for k in (k1, k0))
        if needs_x:
            dx = gw * rstd + (xc * k1 + k0)
        # over the other dims, one value per element of the normalized dims
        rows = lambda t: _layer_rows(spec, t)[0].reshape(-1, n)  # noqa: E731
        # rows per sample where that count is static: a LayerNorm2d's positions (spatial sizes are static in every
        # kernel); other layer norms' rows run over symbolic sequence lengths
        per_sample = math.prod(x.shape[2:]) if spec.layer_dims(x.dim()) == (1,) else None
        if weight is not None and needs_w:
            if torch.compiler.is_compiling():
                # xhat from x's rows, not a view of the full-size xhat: Inductor then indexes this sum and dbias's
                # alike, and they share one loop nest
                per_row = lambda t: t.reshape(-1, 1)  # noqa: E731
                g_xhat = rows(g) * ((rows(x).to(cd) + (-per_row(shift.to(cd))) - per_row(m)) * per_row(r))
            else:
                g_xhat = rows(g * xhat)
            dweight = _column_sums(g_xhat, innermost, per_sample).reshape(weight.shape)
        if bias is not None and needs_b:
            dbias = _column_sums(rows(g), innermost, per_sample).reshape(bias.shape)
    else:
        # one pass over (x, dy): per-(sample, channel) sums of dy and dy * (x - mean); the parameter grads and
        # the pooled means of dx's formula all come from them
        N, C, G = x.shape[0], x.shape[1], spec.groups
        per_channel = (N, C) + (1,) * (x.dim() - 2)
        # dy's sum shares the loop nest of dy * (x - shift)'s (one read of dy) only if its loops have the same shape:
        # adding an exact 0 that reads the per-(sample, channel) shift keeps Inductor from merging them into others
        # (eagerly it would be one more full-size pass, so only where Inductor compiles). The zero is |shift| < 0 as
        # a float, as in _per_row: nan_to_num(shift * 0), before, was a scalar isnan loop per vector of the pass over
        # channels_last x and dy. Measured on an AVX-512 Xeon (lscpu model 167), 1 thread, backward kernels, two
        # alternated runs: GroupNorm(32) channels_last on 8x256x28x28 2.22, 2.26 -> 1.59, 1.57 ms (ATen 1.67-1.85),
        # on 32x512x7x7 1.30, 1.26 -> 1.08, 1.00 (ATen 0.54-0.73); BatchNorm2d channels_last on 8x256x28x28 2.23,
        # 2.34 -> 1.67, 1.45; contiguous inputs unchanged.
        if torch.compiler.is_compiling():
            g_sum = g + _exact_zero(shift, cd)
        else:
            g_sum = g
        a = _channel_sums(_channel_rows(g_sum)).reshape(per_channel)
        c = _channel_sums(_channel_rows(g * xc)).reshape(per_channel) - m * a
        if weight is not None and needs_w:
            dweight = (r * c).sum(0).reshape(weight.shape)
        if bias is not None and needs_b:
            dbias = a.sum(0).reshape(bias.shape)
        if needs_x:
            scale = rstd if w is None else stored(rstd * w)
            if x.numel() == 0 or not spec.batch_stats:  # BatchNorm eval: an affine map of x
                dx = g * scale
            else:
                if w is not None:  # sums of dy' = dy * weight
                    a, c = a * w, c * w
                pool = (0, 2) if spec.batch else (2,)

                def pooled(t):  # summed over each set's members, then one value per (sample,) channel again
                    t = t.reshape(N, G, C // G).sum(pool, keepdim=True)
                    return t.expand(t.shape[0], G, C // G).reshape(rstd.shape)

                n = x.numel() // C * (C // G) // (1 if spec.batch else N)
                k1, k0 = _dx_coefficients(r, m, pooled(a), pooled(c), n, cd, spec.center)
                dx = g * scale + (xc * k1 + k0)
    if dx is not None:
        # in x's memory format: dynamo traces this backward with a contiguous dy, and Inductor would otherwise
        # write a channels_last dx transposed, for autograd to copy back into x's layout
        dx = stored(dx.to(x.dtype), like=x)
    dweight = None if dweight is None else dweight.to(weight.dtype)
    dbias = None if dbias is None else dbias.to(bias.dtype)
    return dx, dweight, dbias


def _through_activation(spec: NormSpec, g: Tensor, xhat: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    """dy (in the compute dtype) through the fused activation's derivative, recomputing its input."""
    if spec.activation is None:
        return g
    pre = xhat if w is None else xhat * w
    return g * ACTIVATION_GRADS[spec.activation](pre if b is None else pre + b)


# Rows per block of the blocked layer-norm backward (_layer_backward_blocked); its rows are split in as many column
# chunks. It serves rows whose chunks are one float32 vector (16 elements) or at least 24 elements: a vector and a
# masked tail. Measured on an AVX-512 Xeon (lscpu model 167), the backward's package with and without it against
# ATen's kernel, interleaved, 1 / 2 threads: 8x197x384 (chunks of 24) 1.37 -> 1.29, 1.49 -> 1.32 / 1.05 -> 1.04,
# 1.18 -> 1.07x ATen; 8x197x400 (25) 1.52 -> 1.33 / 1.14 -> 1.07x; 8x256x640 (40) 1.72 -> 1.47 / 1.61 -> 1.24x;
# 8x256x320 (20) 1.46 -> 1.39 / 1.11 -> 1.11x; 8x256x272 (17) 1.52 -> 1.56 / 1.14 -> 1.22x; LayerNorm2d(96) (6)
# 8x slower. float32 only:
# in bfloat16 the second read of x and dy costs half as much, and the blocked pass measured slower (AVX-512 Xeon, the
# packages interleaved: LayerNorm(512) on 8x256x512 1.01 -> 1.05 ms at 1 thread, 0.57 -> 0.60 ms at 2; LayerNorm(768),
# whose 48-element chunks are a 32-element bfloat16 vector and a masked tail, 1.13 -> 1.32 ms and 0.61 -> 0.75 ms).
ROW_BLOCK = 16


def _blocked_row_pass(spec: NormSpec, needs, x: Tensor, weight, bias) -> bool:
    """Whether Inductor compiles this layer norm's backward as _layer_backward_blocked: float32, no fused activation,
    rows contiguous in memory and flattenable into one (rows, n) view, n split in ROW_BLOCK chunks of 16 or of at least
    24 elements, and a weight or bias gradient to sum."""
    if not (torch.compiler.is_compiling() and spec.groups is None and spec.activation is None
            and x.dtype == torch.float32 and x.numel() > 0):
        return False  # (with a fused activation, Inductor writes dy' out in full: the dy' * act'(pre) it reads thrice)
    if not ((weight is not None and needs[1]) or (bias is not None and needs[2])):
        return False  # no column sums: the one row pass (below) already reads x and dy once
    rows = _layer_rows_view(spec, x)
    if rows is None or not rows.is_contiguous() or rows.shape[-1] % ROW_BLOCK:
        return False
    chunk = rows.shape[-1] // ROW_BLOCK
    return chunk == 16 or chunk >= 24


def _layer_backward_blocked(spec: NormSpec, needs, x, weight, bias, shift, mean_d, rstd, dy):
    """backward() of a layer norm in one pass over x and dy: the weight and bias column sums computed while each
    block of ROW_BLOCK rows is in cache, with the row sums and dx.

    Inductor fuses loop nests over the same outer loops (its outer-loop fusion), and a producer into a consumer only
    where the consumer reads what the producer wrote at the same index. So every nest here loops over (block, i),
    i < ROW_BLOCK: the rows are gathered into (blocks, ROW_BLOCK, n), and each block's column sums are taken in
    ROW_BLOCK chunks of n / ROW_BLOCK columns, chunk i at step i. The chunks are the previous block's: those rows
    are in cache since that block's row passes, so that the row passes alone read memory, row after row (with the
    block's own rows, the first steps read every row's chunk from memory, ROW_BLOCK short strided reads that the
    prefetchers do not follow). Exact zeros tie the nests in a chain: each step's column partials -> a zero from them
    (an amax over the chunk) -> that row's sums -> its coefficients -> its dx.
    A zero read from one value per block (or per (block, chunk)) keeps Inductor from merging the (block, i) loops
    into one (its loop simplification merges dims that every index reads linearly).

    The rows are padded to R // ROW_BLOCK + 2 blocks by repeating the last row (a clamped gather: plain loads, where
    zero padding masks every load), and the previous block's rows likewise, the first row repeated before the start;
    the repeats are left out of the column sums (torch.where) and of dx (a view of the first rows). Measured on an
    AVX-512 Xeon (lscpu model 167), the backward's kernel-store package and ATen's kernel, interleaved in one process,
    LayerNorm(768) on 8x197x768, 1 / 2 threads: two nests 1.19 / 0.68 ms, blocked over the block's own rows 0.96 /
    0.57 ms (ATen 0.75 / 0.51); later, the previous block's chunks 1.39 -> 1.19 / 0.67 -> 0.60 ms (ATen 0.88 / 0.58);
    more shapes in the README ("LayerNorm backward: in one pass").
    """
    cd = compute_dtype(x.dtype)
    rows = _layer_rows_view(spec, x)
    n = rows.shape[-1]

    def flat(t: Tensor) -> Tensor:  # (R, n), or (R, 1) for a per-row statistic
        t = _layer_rows(spec, t)[0]
        return t.reshape(-1, t.shape[-1])

    x_rows = rows.reshape(-1, n)
    R = x_rows.shape[0]
    blocks = R // ROW_BLOCK + 2  # at least 2 for any row count, so no guard tells 1 block apart
    P = blocks * ROW_BLOCK
    position = torch.arange(P, device=x.device)
    before = position - ROW_BLOCK  # the rows of the previous block
    valid_before = ((before >= 0) & (before < R)).view(blocks, ROW_BLOCK, 1)

    def gathered(t: Tensor, at: Tensor) -> Tensor:  # (R, n) -> (blocks, ROW_BLOCK, n), rows `at` clamped into [0, R)
        return t[at.clamp(min=0, max=R - 1)].view(blocks, ROW_BLOCK, n)

    # a per-row statistic (R, 1) -> (blocks, ROW_BLOCK, 1), `front` zeros before the rows and zeros past them
    def padded(t: Tensor, front: int = 0) -> Tensor:
        return F.pad(t.to(cd), [0, 0, front, P - R - front]).view(blocks, ROW_BLOCK, 1)

    dy_rows = flat(dy)
    stats = [flat(t) for t in (shift, mean_d, rstd)]
    xb, dyb = gathered(x_rows, position), gathered(dy_rows, position)
    sb, mb, rb = (padded(t) for t in stats)
    per_block = _exact_zero(sb[:, :1], cd)  # (blocks, 1, 1)
    per_chunk = _exact_zero(sb, cd).view(blocks, 1, ROW_BLOCK, 1)  # (blocks, chunk)
    w = None if weight is None else weight.to(cd).reshape(n)
    b = None if bias is None else bias.to(cd).reshape(n)
    xc = xb.to(cd) + (-sb)
    g = dyb.to(cd)  # (no fused activation on this path: _blocked_row_pass)
    h = n // ROW_BLOCK

    def partials(t: Tensor) -> Tensor:  # (blocks, chunk, h): each chunk's sums over its block's rows
        return (t.view(blocks, ROW_BLOCK, ROW_BLOCK, h) + per_chunk).sum(1)

    # the previous block's rows; the repeated ones add exact zeros: their dy' is selected away, and their xhat is
    # (x - 0 - 0) * 0 (a non-finite x makes the whole weight gradient NaN in any case)
    sp, mp, rp = (padded(t, front=ROW_BLOCK) for t in stats)
    xhat_before = ((gathered(x_rows, before).to(cd) + (-sp)) - mp) * rp
    g_sums = torch.where(valid_before, gathered(dy_rows, before).to(cd), 0)
    sums = {}
    if weight is not None and needs[1]:
        sums["weight"] = partials(g_sums * xhat_before)
    if bias is not None and needs[2]:
        sums["bias"] = partials(g_sums)
    tie = sum(_exact_zero(t, cd) for t in sums.values())
    tie = (tie + per_block).amax(-1, keepdim=True) + per_block  # (blocks, ROW_BLOCK, 1)
    gw = g if w is None else g * w
    a = (gw + tie).sum(-1, keepdim=True).to(STATS_DTYPE)
    c = (gw * xc + tie).sum(-1, keepdim=True).to(STATS_DTYPE) - mb * a
    k1, k0 = _dx_coefficients(rb, mb, a, c, n, cd, spec.center, keep=False)
    k1, k0 = (_per_row(k + per_block, xb) for k in (k1, k0))
    dx = dweight = dbias = None
    if needs[0]:
        dx = (gw * rb + (xc * k1 + (k0 + per_block))).to(x.dtype)
        dx = stored(dx).view(P, n)[:R].reshape(rows.shape)
        dx = stored(_from_layer_rows(spec, dx, x), like=x)
    if "weight" in sums:
        dweight = sums["weight"].to(STATS_DTYPE).sum(0).reshape(weight.shape).to(weight.dtype)
    if "bias" in sums:
        dbias = sums["bias"].to(STATS_DTYPE).sum(0).reshape(bias.shape).to(bias.dtype)
    return dx, dweight, dbias


def _normalize(spec, x, weight, bias, shift, mean_d, rstd) -> Tensor:
    """act(((x - shift) - mean_d) * rstd * weight + bias), in x's dtype."""
    cd = compute_dtype(x.dtype)
    w, b = _affine_view(spec, x, weight, cd), _affine_view(spec, x, bias, cd)
    if spec.groups is None:  # per-row rstd, per-element weight
        y = ((x.to(cd) - shift.to(cd)) - mean_d) * rstd
        y = y if w is None else y * w
        y = y if b is None else y + b
    else:  # per-(sample, channel) coefficients: y = (x - shift) * a + k, two roundings after the exact x - shift
        a = rstd if w is None else stored(rstd * w)
        k = stored(-mean_d * a if b is None else b - mean_d * a)
        y = (x.to(cd) - shift.to(cd)) * a + k
    if spec.activation is not None:
        y = ACTIVATIONS[spec.activation](y)
    return y.to(x.dtype)


def backward_create_graph(spec: NormSpec, needs, x, weight, bias, shift, mean_d, rstd, dy):
    """The backward for create_graph=True: gradients that are themselves differentiable. The written-out formula
    treats the statistics as constants, exact for the first derivative only; where they are constants (BatchNorm
    eval) it is differentiable as it stands, elsewhere the gradient is re-derived with the statistics in the graph."""
    if not spec.batch_stats:
        return backward(spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
    return differentiable_backward(spec, needs, x, weight, bias, dy)


def differentiable_backward(spec: NormSpec, needs: tuple[bool, bool, bool], x, weight, bias, dy):
    """(dx, dweight, dbias) of reference_forward, with create_graph: gradients that are themselves differentiable
    (double backward). x, weight and bias are the forward's own tensors, so the graph reaches them."""
    import dataclasses

    inputs = [t for t, need in zip((x, weight, bias), needs) if need and t is not None]
    with torch.enable_grad():
        y = reference_forward(dataclasses.replace(spec, momentum=None), x, weight, bias)  # no buffer update
        grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    out = []
    for t, need in zip((x, weight, bias), needs):
        gi = next(grads) if need and t is not None else None
        out.append(torch.zeros_like(t) if gi is None and need and t is not None else gi)
    return tuple(out)


def _dx_coefficients(r, m, a, c, n, cd, center=True, keep=True):
    """dx = r * (dy' - mean(dy') - xhat * mean(dy' * xhat)) = r * dy' + k1 * (x - shift) + k0, per set.

    r: rstd, m: mean - shift, a: sum of dy', c: sum of dy' * (x - mean) over each normalized set of n elements.
    Without centring (RMSNorm: xhat = x * r, r = rsqrt(E[x^2] + eps)) the mean has no share in the gradient:
    dx = r * (dy' - xhat * mean(dy' * xhat)), the same formula without the mean(dy') term (and m = 0).
    keep: each computed once into a buffer (`stored`); False: left pointwise, for Inductor to inline where read.
    """
    mean_g = a * (1.0 / n) if center else 0.0
    mean_gx = r * c * (1.0 / n)
    buffer = stored if keep else (lambda t: t)
    k1 = buffer((-r * r * mean_gx).to(cd))
    k0 = buffer((r * (r * mean_gx * m - mean_g)).to(cd))
    return k1, k0


def updates_running(spec: NormSpec, running_mean) -> bool:
    """Whether a call updates running statistics in place: BatchNorm training that tracks them."""
    return spec.batch and spec.batch_stats and spec.momentum is not None and running_mean is not None


def update_running_from(spec: NormSpec, x: Tensor, shift, mean_d, rstd, running_mean, running_var, momentum) -> None:
    """BatchNorm's running update from the statistics (shift, mean_d, rstd) of the same call without it, for a
    kernel that cannot write its inputs (an AOTInductor package: normzoo.policy._Updating). The batch variance is
    recovered from rstd = 1 / sqrt(var + eps) as stored (float32 for float32 x): a relative error of at most
    2.4e-7 x (1 + eps / var), before the momentum scales it; never below 0."""
    with torch.no_grad():
        var = rstd.double().pow(-2).sub_(spec.eps).clamp_min_(0)
        _update_running(spec, x.numel() // x.shape[1], shift.double() + mean_d, var, running_mean, running_var,
                        momentum)


def _update_running(spec, n, mean, var, running_mean, running_var, momentum) -> None:
    """BatchNorm's running buffers: EMA of the batch mean and of the *unbiased* batch variance (n values)."""
    factor = spec.momentum if momentum is None else momentum
    with torch.no_grad():
        batch_var = var.reshape(-1) * (n / max(n - 1, 1))
        running_mean.mul_(1 - factor).add_(mean.reshape(-1).to(running_mean.dtype) * factor)
        running_var.mul_(1 - factor).add_(batch_var.to(running_var.dtype) * factor)
