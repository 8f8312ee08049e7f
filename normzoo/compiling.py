"""When and how torch.compile is applied to the engine.

Policy (DESIGN.md: dynamic shapes are 30-90x slower than native on CPU, and dynamo falls back to eager after 8
recompiles of one code object):

- one static-shape Inductor kernel per input signature (shapes, strides, dtypes, devices, requires_grad, grad mode,
  spec), kept in a bounded LRU cache (NORMZOO_CACHE_SIZE, default 64 signatures);
- each signature compiles a fresh copy of the engine's entry function, so dynamo's per-code-object cache holds
  exactly one entry and its recompile limit is never reached; an evicted signature takes its code with it;
- dynamo traces the first call; later calls of that signature go straight to the Inductor-compiled callable that
  our backend kept, skipping dynamo's guards (our signature key is the guard): that saves ~60-80 us a call;
- inside a user's own torch.compile region the engine is traced inline (no nested compile, no graph break);
- NORMZOO_COMPILE=0 (or compile=False on a layer) runs the engine eagerly, on purpose;
- if Inductor cannot compile at all (no C++ compiler), warn once and compute eagerly from then on.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import engine

ENV_COMPILE = "NORMZOO_COMPILE"
ENV_CACHE_SIZE = "NORMZOO_CACHE_SIZE"


def compile_enabled() -> bool:
    """False when NORMZOO_COMPILE is 0/false/off/no, or after a failed compile turned compilation off."""
    if _state.broken is not None:
        return False
    return os.environ.get(ENV_COMPILE, "1").strip().lower() not in ("0", "false", "off", "no")


@dataclass
class _State:
    kernels: OrderedDict = field(default_factory=OrderedDict)  # signature -> compiled callable
    compiles: int = 0
    compile_seconds: float = 0.0
    evictions: int = 0
    broken: str | None = None  # why compilation was turned off, once it failed
    lock: threading.RLock = field(default_factory=threading.RLock)  # one compile per signature across threads


_state = _State()
_tags = itertools.count()


def _max_cache_size() -> int:
    try:
        return max(1, int(os.environ.get(ENV_CACHE_SIZE, "64")))
    except ValueError:
        raise ValueError(f"{ENV_CACHE_SIZE} must be a positive integer, got {os.environ[ENV_CACHE_SIZE]!r}") from None


def cache_info() -> dict:
    """Kernels held, compiles done and the seconds they took (first calls), evictions, and why compile is off."""
    return {
        "signatures": len(_state.kernels),
        "max_signatures": _max_cache_size(),
        "compiles": _state.compiles,
        "compile_seconds": round(_state.compile_seconds, 3),
        "evictions": _state.evictions,
        "compile_disabled_reason": _state.broken,
    }


def clear_cache() -> None:
    with _state.lock:
        _state.kernels.clear()


def _forward_entry(spec, x, weight, bias, running_mean, running_var, momentum):
    return engine.forward_inference(spec, x, weight, bias, running_mean, running_var, momentum)


def _backward_entry(spec, needs, x, weight, bias, shift, mean_d, rstd, dy):
    return engine.backward(spec, needs, x, weight, bias, shift, mean_d, rstd, dy)


class _Compiled:
    """One function compiled for one signature: dynamo + Inductor for the first call, then Inductor's callable
    directly (our signature key is the guard). Each instance compiles a fresh copy of the entry's code object:
    dynamo caches per code object, so its recompile limit is never reached."""

    def __init__(self, entry, n_static: int):
        code = entry.__code__.replace(co_name=f"normzoo_{entry.__name__.strip('_')}_{next(_tags)}")
        names = code.co_varnames[n_static:code.co_argcount]
        self.placeholder_index = {f"l_{name}_": i for i, name in enumerate(names)}  # dynamo's names for them
        self.direct = None
        self.arg_index: list[int] = []
        fn = types.FunctionType(code, entry.__globals__, code.co_name)
        self.traced = torch.compile(fn, backend=self._backend, dynamic=False, fullgraph=True)

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if all(name in self.placeholder_index for name in names):  # else keep going through dynamo
            self.direct, self.arg_index = compiled, [self.placeholder_index[name] for name in names]
        return compiled

    def __call__(self, static: tuple, tensors: tuple):
        if self.direct is not None:
            return self.direct(*[tensors[i] for i in self.arg_index])
        return self.traced(*static, *tensors)


class _Kernel:
    """A signature's forward (an inference graph: statistics + normalize) and its backward graphs, one per set of
    needed gradients and dy signature, each compiled the first time it is asked for."""

    def __init__(self, spec):
        self.spec = spec
        self.compiled_forward: _Compiled | None = None
        self.backwards: dict = {}

    def forward(self, tensors: tuple):
        if self.compiled_forward is None:
            with _state.lock:
                if self.compiled_forward is None:
                    compiled = _Compiled(_forward_entry, 1)
                    try:
                        out = _first_call(compiled, (self.spec,), tensors)
                    except Exception as err:  # noqa: BLE001 - any compiler failure: fall back loudly, never silently
                        if not _is_compiler_failure(err):
                            raise
                        _turn_compile_off(err)
                        return engine.forward_inference(self.spec, *tensors)
                    self.compiled_forward = compiled
                    return out
        return self.compiled_forward((self.spec,), tensors)

    def backward(self, needs, tensors: tuple):
        key = (needs, _signature(tensors[-1]))
        compiled = self.backwards.get(key)
        if compiled is None:
            with _state.lock:
                compiled = self.backwards.get(key)
                if compiled is None:
                    compiled = _Compiled(_backward_entry, 2)
                    out = _first_call(compiled, (self.spec, needs), tensors)
                    self.backwards[key] = compiled
                    return out
        return compiled((self.spec, needs), tensors)


class _CompiledNorm(torch.autograd.Function):
    """Ties a kernel's compiled forward and backward into autograd. With create_graph (double backward) the
    gradient comes from the engine's differentiable formulation instead: compiled graphs have no derivatives."""

    @staticmethod
    def forward(ctx, kernel, x, weight, bias, running_mean, running_var, momentum):
        y, shift, mean_d, rstd = kernel.forward((x, weight, bias, running_mean, running_var, momentum))
        ctx.kernel = kernel
        ctx.save_for_backward(x, weight, bias, shift, mean_d, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, shift, mean_d, rstd = ctx.saved_tensors
        needs = tuple(bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[1:4], (x, weight, bias)))
        if torch.is_grad_enabled():  # create_graph=True
            grads = engine.backward_create_graph(ctx.kernel.spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
        elif compile_enabled():
            grads = ctx.kernel.backward(needs, (x, weight, bias, shift, mean_d, rstd, dy))
        else:  # compilation turned off since (a compiler failure)
            grads = engine.backward(ctx.kernel.spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
        return (None,) + tuple(grads) + (None, None, None)


def _signature(t: Tensor | None):
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def run(spec: engine.NormSpec, x, weight=None, bias=None, running_mean=None, running_var=None, momentum=None,
        *, compile: bool = True) -> Tensor:
    """Compute engine.forward, through the per-signature compiled kernels unless compilation is off."""
    args = (x, weight, bias, running_mean, running_var, momentum)
    if (
        not compile
        or torch.compiler.is_compiling()  # already inside a user's torch.compile: trace the engine inline
        or not compile_enabled()
        or x.numel() == 0  # nothing to compute; not worth a kernel
        or torch.jit.is_scripting()
        or engine.under_functorch()  # torch.func: the engine's plain differentiable ops
    ):
        return engine.forward(spec, *args)
    key = (spec, torch.is_inference_mode_enabled()) + tuple(_signature(t) for t in args)
    kernel = _state.kernels.get(key)
    if kernel is None:
        return _compile_and_run(key, spec, args)
    _state.kernels.move_to_end(key)
    return _apply(kernel, args)


def _apply(kernel: _Kernel, args: tuple) -> Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:3]):
        return _CompiledNorm.apply(kernel, *args)
    return kernel.forward(args)[0]


def _first_call(compiled: _Compiled, static: tuple, tensors: tuple):
    """Run a new compiled function's first call (the compile), counted and timed; called under _state.lock."""
    start = time.perf_counter()
    with torch.no_grad():  # an inference graph: autograd is _CompiledNorm's business
        out = compiled(static, tensors)
    _state.compiles += 1
    _state.compile_seconds += time.perf_counter() - start
    return out


def _compile_and_run(key, spec, args) -> Tensor:
    """A signature seen for the first time: one kernel object, even when several threads meet it at once (its
    graphs compile on first use, under the same lock)."""
    with _state.lock:
        kernel = _state.kernels.get(key)
        if kernel is None:
            if engine.STORE_OP is None:  # loaded with Inductor, so not at normzoo's import
                from torch._inductor import inductor_prims  # noqa: F401  (registers the op)

                engine.STORE_OP = torch.ops.prims.inductor_force_stride_order
            kernel = _state.kernels[key] = _Kernel(spec)
            while len(_state.kernels) > _max_cache_size():
                _state.kernels.popitem(last=False)
                _state.evictions += 1
    return _apply(kernel, args)


def _turn_compile_off(err: Exception) -> None:
    _state.broken = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    warnings.warn(
        "normzoo: torch.compile failed, so normzoo layers now run eagerly (correct but slower). "
        f"Cause: {_state.broken}. Install a C++ compiler (gcc/g++) for compiled kernels, or set "
        f"{ENV_COMPILE}=0 to silence this.",
        RuntimeWarning,
        stacklevel=5,
    )


def _is_compiler_failure(err: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed

    if isinstance(err, BackendCompilerFailed):
        return True
    name = type(err).__name__
    return name in ("InductorError", "CppCompileError", "InvalidCxxCompiler")
