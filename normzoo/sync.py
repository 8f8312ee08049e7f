"""SyncBatchNorm: BatchNorm whose statistics are taken over the whole batch held by all ranks of a process group.

Forward: each rank takes its own count n_i, mean_i and centred sum of squares M2_i = sum (x - mean_i)^2 with the
engine's shifted single-pass moments (sums in float64 for float32 input); one all-gather of (n_i, mean_i, M2_i)
(a world_size x (2C + 1) float64 table, the same traffic as torch.nn.SyncBatchNorm's all-gather of mean/invstd/count)
and every rank combines them in the same order with the parallel-variance formula (Chan et al.):

    n = sum n_i,   mean = sum n_i mean_i / n,   M2 = sum M2_i + sum n_i (mean_i - mean)^2,   var = M2 / n

No E[x^2] - E[x]^2 across ranks, so inputs with a large mean stay exact, and every rank gets bit-identical statistics.
A rank holding zero samples sends n_i = 0 and contributes nothing. The elementwise step is the engine's
normalize_affine. Running statistics use the global count (unbiased variance M2 / (n - 1)).

Backward: one all-reduce of (sum dy, sum dy * xhat) per channel, and

    dx = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)

with the global sums; the parameter gradients are each rank's own sums (DDP or the user all-reduces them, as with
torch.nn.SyncBatchNorm).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import engine
from .layers import _BatchNorm

__all__ = ["SyncBatchNorm"]


def _per_channel(x: Tensor) -> tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]:
    """For x of shape (N, C, *): C, the dtype the arithmetic runs in, the dims a channel's statistics reduce (all
    but dim 1), and the shape that broadcasts a per-channel statistic over x."""
    C = x.shape[1]
    return C, engine.compute_dtype(x.dtype), (0,) + tuple(range(2, x.dim())), (1, C) + (1,) * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group, world_size):
        C, acc, dims, stat_shape = _per_channel(x)
        f64 = torch.float64
        xa = x.to(acc)
        n_local = x.numel() // C
        # local moments: shift (an element of each channel, or 0 when empty), mean - shift, biased variance
        shift, mean_d, var = engine.moments(xa, dims)
        if n_local == 0:
            local_mean = torch.zeros(C, dtype=f64, device=x.device)
            local_m2 = torch.zeros(C, dtype=f64, device=x.device)
        else:
            local_mean = shift.to(f64).reshape(C) + mean_d.to(f64).reshape(C)
            local_m2 = var.to(f64).reshape(C) * n_local
        packed = torch.cat([torch.full((1,), float(n_local), dtype=f64, device=x.device), local_mean, local_m2])
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=group)
        table = torch.stack(gathered)  # (world_size, 1 + 2C), identical on every rank
        counts, means, m2s = table[:, :1], table[:, 1:1 + C], table[:, 1 + C:]
        n = float(counts.sum().item())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} value(s) per "
                             f"channel over all {world_size} ranks (this rank's input: {list(x.shape)})")
        mean = (counts * means).sum(0) / n
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        gvar = m2 / n  # biased, for normalizing

        if running_mean is not None and running_var is not None and momentum is not None:
            with torch.no_grad():
                factor = momentum.to(f64) if isinstance(momentum, Tensor) else momentum
                running_mean.copy_((running_mean.to(f64) * (1 - factor) + mean * factor).to(running_mean.dtype))
                running_var.copy_((running_var.to(f64) * (1 - factor) + (m2 / (n - 1)) * factor)
                                  .to(running_var.dtype))

        # normalize around this rank's own shift, so x - shift is exact and (mean - shift) is small
        mean_d_global = (mean.reshape(stat_shape) - shift.to(f64)).to(acc)
        gvar = gvar.reshape(stat_shape)
        w = None if weight is None else weight.to(acc).reshape(stat_shape)
        b = None if bias is None else bias.to(acc).reshape(stat_shape)
        y = engine.normalize_affine(xa, shift, mean_d_global, gvar, eps, w, b)

        invstd = torch.rsqrt(gvar + eps).to(acc)
        ctx.save_for_backward(x, weight, shift, mean_d_global, invstd)
        ctx.n, ctx.group, ctx.has_bias = n, group, bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, shift, mean_d, invstd = ctx.saved_tensors
        C, acc, dims, stat_shape = _per_channel(x)
        sdt = engine.STATS_DTYPE
        dya = dy.to(acc)
        xhat = ((x.to(acc) - shift) - mean_d) * invstd
        sum_dy = dya.to(sdt).sum(dims)
        sum_dy_xhat = (dya * xhat).to(sdt).sum(dims)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)
            dist.all_reduce(packed, group=ctx.group)
            mean_dy = (packed[:C] / ctx.n).reshape(stat_shape).to(acc)
            mean_dy_xhat = (packed[C:] / ctx.n).reshape(stat_shape).to(acc)
            scale = invstd if weight is None else invstd * weight.to(acc).reshape(stat_shape)
            grad_x = ((dya - mean_dy - xhat * mean_dy_xhat) * scale).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype if weight is not None else x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _sync_batch_norm_eager(x, weight, bias, running_mean, running_var, momentum, eps, group, world_size,
                           activation):
    y = _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps, group, world_size)
    return y if activation is None else engine.ACTIVATIONS[activation](y)


_sync_batch_norm = None


def _compiler_disabled_sync():
    """The synchronized step wrapped in torch.compiler.disable: under torch.compile the collectives run eagerly
    (a graph break; the rest of the model compiles). Wrapped on first use (from __init__, never while tracing),
    because torch.compiler.disable imports torch._dynamo (2-3 s) and `import normzoo` should not pay for it."""
    global _sync_batch_norm
    if _sync_batch_norm is None:
        _sync_batch_norm = torch.compiler.disable(_sync_batch_norm_eager)
    return _sync_batch_norm


class SyncBatchNorm(_BatchNorm):
    r"""Batch Normalization over the batch held by all ranks of a process group, a drop-in for
    :class:`torch.nn.SyncBatchNorm` that also runs on CPU (gloo) as well as CUDA (nccl).

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, with an initialized process group of more than one rank, mean and biased variance per channel
    are taken over (N, *spatial) of *every* rank's input, as if one BatchNorm saw the concatenated batch: one
    all-gather of each rank's (count, mean, centred sum of squares) in the forward, one all-reduce of
    (sum dy, sum dy * xhat) in the backward. Ranks may hold different batch sizes, including zero. Running
    statistics are updated with the global statistics (unbiased with the global count), so they stay identical
    on every rank. Without a process group, with world size 1, or in eval mode it is exactly
    :class:`normzoo.BatchNorm2d` (any number of dims).

    Under torch.compile the synchronized step is a graph break (``torch.compiler.disable``): results are correct,
    the layers around it compile; ``fullgraph=True`` is not possible in the synchronized case.

    Args:
        num_features: C, the channels.
        eps: added to the variance. Default: 1e-5
        momentum: EMA factor of the running statistics; None for the cumulative average. Default: 0.1
        affine: learnable per-channel weight (ones) and bias (zeros). Default: True
        track_running_stats: keep running_mean / running_var / num_batches_tracked. Default: True
        process_group: the group to synchronize over; None: the default (world) group.
        bias: learn the bias too (with ``affine``; keyword only, as torch.nn). Default: True
        compile, activation: as for :class:`normzoo.BatchNorm2d` (``compile`` applies to the unsynchronized path).

    Shape:
        - Input: :math:`(N, C, *)`; N may be 0 on some ranks
        - Output: same as the input

    Example::

        >>> # in each process, after torch.distributed.init_process_group("gloo", ...)
        >>> model = normzoo.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> ddp = torch.nn.parallel.DistributedDataParallel(model)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, compile: bool = True, activation: str | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         compile=compile, activation=activation)
        self.process_group = process_group
        _compiler_disabled_sync()

    def _check_input(self, input: Tensor) -> bool:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of shape (N, C, *) with at least 2 dims, "
                             f"got shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) expects {self.num_features} channels at dim 1, "
                             f"got input of shape {tuple(input.shape)}")
        return False

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        world_size = self._world_size()
        if world_size == 1:
            return super().forward(input)
        self._check_input(input)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average
                momentum = 1.0 / self.num_batches_tracked.to(torch.float64)
        else:
            momentum = None
        sync_fn = _sync_batch_norm if _sync_batch_norm is not None else _compiler_disabled_sync()
        return sync_fn(input, self.weight, self.bias, self.running_mean, self.running_var, momentum,
                                float(self.eps), self.process_group, world_size, self.activation)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm*d (torch.nn's, torch.nn.SyncBatchNorm, normzoo's) in `module` by a
        normzoo.SyncBatchNorm with the same parameters, buffers and training flag, recursively, as
        torch.nn.SyncBatchNorm.convert_sync_batchnorm does; returns the module (or the new layer if `module` is
        a BatchNorm itself). Parameters are the same Parameter objects, so an optimizer built before still works.
        """
        module_output = module
        is_bn = isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm))
        if is_bn and not isinstance(module, cls):
            weight = getattr(module, "weight", None)
            ref = weight if weight is not None else module.running_mean
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group, bias=module.bias is not None,
                                compile=getattr(module, "compile", True) if isinstance(module, _BatchNorm) else True,
                                activation=getattr(module, "activation", None))
            if ref is not None:
                module_output.to(device=ref.device, dtype=ref.dtype)
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output
