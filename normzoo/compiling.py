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

import os
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


_state = _State()


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
    _state.kernels.clear()


def _entry(spec, x, weight, bias, running_mean, running_var, momentum):
    return engine.forward(spec, x, weight, bias, running_mean, running_var, momentum)


def _fresh_entry(tag: int):
    # dynamo caches compiled code on the *code object*: a new code object per signature keeps the caches apart.
    code = _entry.__code__.replace(co_name=f"normzoo_kernel_{tag}")
    return types.FunctionType(code, _entry.__globals__, code.co_name)


# dynamo names the graph inputs after the entry function's arguments
_ARG_NAMES = ("x", "weight", "bias", "running_mean", "running_var", "momentum")
_PLACEHOLDER_INDEX = {f"l_{name}_": i for i, name in enumerate(_ARG_NAMES)}


class _Kernel:
    """One signature's compiled engine: dynamo + Inductor for the first call, then Inductor's callable directly."""

    def __init__(self, tag: int):
        self.direct = None  # Inductor's compiled callable, and which of our arguments it takes
        self.arg_index: list[int] = []
        self.traced = torch.compile(_fresh_entry(tag), backend=self._backend, dynamic=False, fullgraph=True)

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if all(name in _PLACEHOLDER_INDEX for name in names):  # else keep going through dynamo
            self.direct, self.arg_index = compiled, [_PLACEHOLDER_INDEX[name] for name in names]
        return compiled

    def __call__(self, spec, args):
        if self.direct is not None:
            return self.direct(*[args[i] for i in self.arg_index])[0]
        return self.traced(spec, *args)


def _signature(t: Tensor | None):
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)


def run(spec: engine.NormSpec, x, weight=None, bias=None, running_mean=None, running_var=None, momentum=None,
        *, compile: bool = True) -> Tensor:
    """Compute engine.forward, through the per-signature compiled kernel unless compilation is off."""
    args = (x, weight, bias, running_mean, running_var, momentum)
    if (
        not compile
        or torch.compiler.is_compiling()  # already inside a user's torch.compile: trace the engine inline
        or not compile_enabled()
        or x.numel() == 0  # nothing to compute; not worth a kernel
        or torch.jit.is_scripting()
        or engine.under_functorch(x, weight, bias)  # torch.func: the engine's plain differentiable ops
    ):
        return engine.forward(spec, *args)
    key = (spec, torch.is_grad_enabled(), torch.is_inference_mode_enabled()) + tuple(_signature(t) for t in args)
    kernel = _state.kernels.get(key)
    if kernel is not None:
        _state.kernels.move_to_end(key)
        return kernel(spec, args)
    if engine.STORE_OP is None:  # loaded with Inductor, so not at normzoo's import
        from torch._inductor import inductor_prims  # noqa: F401  (registers the op)

        engine.STORE_OP = torch.ops.prims.inductor_force_stride_order
    kernel = _Kernel(_state.compiles)
    start = time.perf_counter()
    try:
        out = kernel(spec, args)
    except Exception as err:  # noqa: BLE001 - any compiler failure: fall back loudly, never silently
        if not _is_compiler_failure(err):
            raise
        _state.broken = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        warnings.warn(
            "normzoo: torch.compile failed, so normzoo layers now run eagerly (correct but slower). "
            f"Cause: {_state.broken}. Install a C++ compiler (gcc/g++) for compiled kernels, or set "
            f"{ENV_COMPILE}=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return engine.forward(spec, *args)
    _state.compiles += 1
    _state.compile_seconds += time.perf_counter() - start
    _state.kernels[key] = kernel
    while len(_state.kernels) > _max_cache_size():
        _state.kernels.popitem(last=False)
        _state.evictions += 1
    return out


def _is_compiler_failure(err: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed

    if isinstance(err, BackendCompilerFailed):
        return True
    name = type(err).__name__
    return name in ("InductorError", "CppCompileError", "InvalidCxxCompiler")
