"""normzoo inside a user's torch.compile: each norm call is two opaque custom ops, `normzoo::norm` (the forward:
y and the statistics its backward needs) and `normzoo::norm_backward`, whose autograd ties them together.

Why opaque: traced inline, the engine's statistics (shifted, chunked sums pooled in float64) are dozens of ops per
layer for dynamo to trace and for AOTAutograd and Inductor to derive, partition and compile in every user graph; a
whole torchvision ResNet-18 with GroupNorm(32) took 1.5x torch.nn's first step cold and warm that way (2026-12-01,
Xeon). As one op a layer, the user's graph is what it would be with torch.nn's layers minus their decomposition, and
at run time each call takes the kernel normzoo.policy picks (the store's, or the in-memory compile's), as an eager
call would.

- The ops take the spec as plain fields (a custom op's schema has no NormSpec) and the kernel lookup from
  normzoo.policy (`runtime`, set there: this module does not import it).
- The fake (meta) functions give every output its canonical layout: y and dx in x's dense layout (contiguous
  otherwise), the statistics and parameter gradients contiguous; the real functions return the same layouts (a copy
  only where a kernel's output differs), since Inductor asserts them.
- The ops take their inputs in whatever layout Inductor gave them (`flexible_layout`): on CPU Inductor lays
  convolution outputs out channels_last, and the default constraint (the traced strides, NCHW) copied each norm's
  input to NCHW and its output back. Measured 2026-12-02 (AVX-512 Xeon, 2 threads, `scripts/bench_models.py`,
  two alternated runs): ResNet-50 GroupNorm(32) under torch.compile, eval 1.12 and 1.15x torch.nn's step with the
  copies, 1.05 and 1.05x without; training 1.12 and 1.12x against 1.02 and 1.04x. An input in no dense layout (a
  padded one) is copied to contiguous, the layout a store kernel takes. Inductor asks the fake functions for the
  outputs' layouts with the inputs' actual strides, so they agree with the real ones.
- BatchNorm stays inline in eval (a per-channel affine Inductor folds into its neighbours) and in training that
  updates its running buffers (an op with an autograd formula cannot mutate its inputs).
- Double backward through a compiled graph is refused by torch.compile itself, as for any compiled graph.
- torch.export keeps the engine inline (policy decides): an exported program must not need this module's ops.
"""

import functools

import torch
from torch import Tensor

from . import builder, engine

# normzoo.policy's: (spec, (x, weight, bias, running_mean, running_var, momentum)) -> kernel with forward(tensors)
# and backward(needs, tensors), or None where the eager engine serves the call
runtime = None


@functools.lru_cache(maxsize=256)
def _spec(groups, eps, dims, center, batch, batch_stats, momentum, activation) -> engine.NormSpec:
    return engine.NormSpec(groups=None if groups < 0 else groups, eps=eps, dims=tuple(dims), center=center,
                           batch=batch, batch_stats=batch_stats, momentum=None if momentum < 0 else momentum,
                           activation=activation or None)


def _fields(spec: engine.NormSpec) -> tuple:
    """The spec as the ops' scalar arguments (no None where the schema wants a number: -1 for no groups or no
    momentum, "" for no activation)."""
    return (-1 if spec.groups is None else spec.groups, spec.eps, list(spec.dims), spec.center, spec.batch,
            spec.batch_stats, -1.0 if spec.momentum is None else spec.momentum, spec.activation or "")


def _format(x: Tensor) -> torch.memory_format:
    layout = builder.layout_of(x)
    return builder.MEMORY_FORMATS[layout] if layout is not None else torch.contiguous_format


def _stat_shape(spec: engine.NormSpec, x: Tensor) -> list:
    """The shape of shift, mean_d and rstd (engine.statistics): 1 at a layer norm's reduced dims; per (sample,
    channel) for GroupNorm and InstanceNorm; per channel for BatchNorm."""
    if spec.groups is None:
        reduced = spec.layer_dims(x.dim())
        return [1 if d in reduced else x.shape[d] for d in range(x.dim())]
    rest = [1] * (x.dim() - 2)
    if spec.batch or not spec.batch_stats:
        return [1, x.shape[1]] + rest
    return [x.shape[0], x.shape[1]] + rest


def _canonical(t: Tensor, memory_format=torch.contiguous_format) -> Tensor:
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(memory_format=memory_format)


@torch.library.custom_op("normzoo::norm", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
         running_var: Tensor | None, groups: int, eps: float, dims: list[int], center: bool, batch: bool,
         batch_stats: bool, spec_momentum: float, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, shift, mean_d, rstd) of the norm the fields describe, by the kernel an eager call would take. The running
    buffers are read only (BatchNorm eval): a call that updates them is traced inline (an op with an autograd
    formula cannot mutate its inputs)."""
    spec = _spec(groups, eps, tuple(dims), center, batch, batch_stats, spec_momentum, activation)
    x = _canonical(x, _format(x))  # a dense layout as it is; any other contiguous (as _format says for the fake)
    tensors = (x, weight, bias, running_mean, running_var, None)
    kernel = runtime(spec, tensors) if runtime is not None else None
    with torch.no_grad():
        out = kernel.forward(tensors) if kernel is not None else engine.forward_inference(spec, *tensors)
    y, shift, mean_d, rstd = out
    if not spec.batch_stats:  # BatchNorm eval: the shift may be a view of running_mean; an op's outputs are its own
        shift = shift.clone()
    return _canonical(y, _format(x)), _canonical(shift), _canonical(mean_d), _canonical(rstd)


@norm.register_fake
def _(x, weight, bias, running_mean, running_var, groups, eps, dims, center, batch, batch_stats, spec_momentum,
      activation):
    spec = _spec(groups, eps, tuple(dims), center, batch, batch_stats, spec_momentum, activation)
    shape = _stat_shape(spec, x)
    cd = engine.compute_dtype(x.dtype)
    stats = [x.new_empty(shape, dtype=cd) for _ in range(3)]
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x)), *stats)


@torch.library.custom_op("normzoo::norm_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def norm_backward(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor, mean_d: Tensor, rstd: Tensor,
                  dy: Tensor, needs_x: bool, needs_weight: bool, needs_bias: bool, groups: int, eps: float,
                  dims: list[int], center: bool, batch: bool, batch_stats: bool, spec_momentum: float,
                  activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); an empty tensor stands for a gradient not asked for (an op returns tensors only)."""
    spec = _spec(groups, eps, tuple(dims), center, batch, batch_stats, spec_momentum, activation)
    needs = (needs_x, needs_weight and weight is not None, needs_bias and bias is not None)
    x = _canonical(x, _format(x))
    tensors = (x, weight, bias, shift, mean_d, rstd, dy)
    kernel = runtime(spec, (x, weight, bias, None, None, None)) if runtime is not None else None
    with torch.no_grad():
        grads = kernel.backward(needs, tensors) if kernel is not None else engine.backward(spec, needs, *tensors)
    dx, dweight, dbias = grads
    empty = x.new_empty(0)
    return (empty if dx is None else _canonical(dx, _format(x)), empty if dweight is None else _canonical(dweight),
            empty if dbias is None else _canonical(dbias))


@norm_backward.register_fake
def _(x, weight, bias, shift, mean_d, rstd, dy, needs_x, needs_weight, needs_bias, *fields):
    def like(t, need, memory_format=torch.contiguous_format):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format) if need and (
            t is not None) else x.new_empty(0)

    return like(x, needs_x, _format(x)), like(weight, needs_weight), like(bias, needs_bias)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs[:3]
    _, shift, mean_d, rstd = output
    ctx.fields = tuple(inputs[5:])
    ctx.save_for_backward(x, weight, bias, shift, mean_d, rstd)


def _backward(ctx, dy, *unused_stat_grads):
    x, weight, bias, shift, mean_d, rstd = ctx.saved_tensors
    wanted = ctx.needs_input_grad
    dx, dweight, dbias = norm_backward(x, weight, bias, shift, mean_d, rstd, dy.contiguous(memory_format=_format(x)),
                                       wanted[0], wanted[1], wanted[2], *ctx.fields)
    return ((dx if wanted[0] else None), (dweight if wanted[1] else None), (dbias if wanted[2] else None),
            None, None) + (None,) * len(ctx.fields)


norm.register_autograd(_backward, setup_context=_setup_context)


def takes(spec: engine.NormSpec, args: tuple) -> bool:
    """Whether the op computes this call: not BatchNorm eval, a per-channel affine that Inductor folds into the ops
    around it (as one op: ResNet-50 eval under torch.compile 1.33x torch.nn's step, against 0.96x inline), and not
    BatchNorm training that updates running buffers (an op with an autograd formula cannot mutate its inputs)."""
    return spec.batch_stats and not (spec.momentum is not None and args[3] is not None)


def call(spec: engine.NormSpec, args: tuple) -> Tensor:
    """The norm of one call as the op: its y."""
    return norm(*args[:5], *_fields(spec))[0]
