"""The in-memory compile: torch.compile applied to the engine in this process (NORMZOO_COMPILE=sync, and whatever
the kernel store does not take; normzoo.policy decides which calls come here).

How (measured on a 2-core AVX-512 Xeon, torch 2.13; dynamo falls back to eager after 8 recompiles of one code
object, so that limit must never be reached):

- one kernel per input signature: spec, shape, layout, dtype, device (not requires_grad or grad mode), kept in a
  bounded LRU cache (NORMZOO_CACHE_SIZE, default 64 signatures);
- shapes: the batch dim, and for layer norms every dim outside the normalized ones, compile as symbolic sizes
  (`batch_dims`): they ran at the static kernel's speed, while symbolic spatial sizes ran 6-7x slower, so spatial
  sizes stay in the signature (NORMZOO_DYNAMIC_BATCH=0: every shape static);
- a kernel is a forward (an inference graph: statistics + normalize) and a backward per set of needed gradients,
  compiled on first use and tied by `_CompiledNorm`: one forward serves grad and no-grad calls, and create_graph
  (double backward) takes the engine's differentiable formulation instead of the compiled backward;
- each graph compiles a fresh copy of its entry function (dynamo caches per code object), and its first call is
  traced by dynamo; later calls go straight to the Inductor-compiled callable (our signature key is the guard),
  which saves ~60-80 us a call. Where a graph recorded a shape guard that another batch size could fail, calls keep
  going through dynamo and its guards instead;
- first calls compile under a lock: concurrent threads meeting a new signature compile it once;
- inside a user's own torch.compile region a call is one opaque op (normzoo.graph_ops, chosen by normzoo.policy)
  whose kernels are picked when it runs; where the op does not serve (torch.export, compile=False, BatchNorm eval
  and BatchNorm training that updates its buffers) the engine is traced inline as plain differentiable ops (`inline`: no nested
  compile, no graph break, no autograd.Function, which would keep AOTAutograd from caching the user's graph);
  inside torch.func transforms it runs as plain differentiable ops too;
- kernels read the thread count at run time (Inductor's cpp.dynamic_threads), so Inductor's cache serves a process
  with another thread count;
- NORMZOO_COMPILE=0 (or compile=False on a layer) runs the engine eagerly, on purpose;
- if Inductor cannot compile at all (no C++ compiler), warn once and compute eagerly from then on.

Background compiling in a thread of this process was tried and left out: dynamo's state is process-wide
(torch.compiler.is_compiling() read True in the main thread during a background compile, and config patches leak
across threads). normzoo.builder compiles in a process of its own instead.
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
from torch.autograd import forward_ad

from . import engine, native

ENV_COMPILE = "NORMZOO_COMPILE"
ENV_CACHE_SIZE = "NORMZOO_CACHE_SIZE"
ENV_DYNAMIC_BATCH = "NORMZOO_DYNAMIC_BATCH"


def raw_env(name: str):
    """os.environ's value of `name` as the platform stores it (bytes on POSIX), or None: what the per-call fast path
    compares on every call to see a setting change. os.environ.get converts key and value each time, 10x slower."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        return os.environ.get(name)
    key = _ENCODED_KEYS.get(name)
    if key is None:
        key = _ENCODED_KEYS[name] = os.environ.encodekey(name)
    return data.get(key)


_ENCODED_KEYS: dict = {}


def dynamic_batch_enabled() -> bool:
    """False when NORMZOO_DYNAMIC_BATCH is 0/false/off/no: then every batch size compiles its own kernel."""
    return os.environ.get(ENV_DYNAMIC_BATCH, "1").strip().lower() not in ("0", "false", "off", "no")


def compile_enabled() -> bool:
    """False when NORMZOO_COMPILE is 0/false/off/no, or after a failed compile turned compilation off."""
    if _state.broken is not None:
        return False
    raw = raw_env(ENV_COMPILE)
    enabled = _ENABLED.get(raw)
    if enabled is None:
        enabled = _ENABLED[raw] = os.environ.get(ENV_COMPILE, "1").strip().lower() not in ("0", "false", "off", "no")
    return enabled


_ENABLED: dict = {}  # raw NORMZOO_COMPILE value -> compile_enabled()'s answer


@dataclass
class _State:
    kernels: OrderedDict = field(default_factory=OrderedDict)  # signature -> compiled callable
    compiles: int = 0
    hits: int = 0
    compile_seconds: float = 0.0
    evictions: int = 0
    generation: int = 0  # bumped whenever a kernel leaves `kernels` (eviction, clear): policy's call plans then lapse
    broken: str | None = None  # why compilation was turned off, once it failed
    lock: threading.RLock = field(default_factory=threading.RLock)  # one compile per signature across threads


_state = _State()
_tags = itertools.count()


def max_cache_size() -> int:
    try:
        return max(1, int(os.environ.get(ENV_CACHE_SIZE, "64")))
    except ValueError:
        raise ValueError(f"{ENV_CACHE_SIZE} must be a positive integer, got {os.environ[ENV_CACHE_SIZE]!r}") from None


def cache_info() -> dict:
    """Signatures held, calls that found their kernel (hits), compiled graphs (a forward, and a backward per set of
    needed gradients) and the seconds their first calls took, evictions, and why compilation is off."""
    with _state.lock:
        return {
            "signatures": len(_state.kernels),
            "max_signatures": max_cache_size(),
            "hits": _state.hits,
            "compiles": _state.compiles,
            "compile_seconds": round(_state.compile_seconds, 3),
            "evictions": _state.evictions,
            "compile_disabled_reason": _state.broken,
        }


def clear_cache() -> None:
    with _state.lock:
        _state.kernels.clear()
        _state.generation += 1
        native.invalidate()


def _forward_entry(spec, x, weight, bias, running_mean, running_var, momentum):
    return engine.forward_inference(spec, x, weight, bias, running_mean, running_var, momentum)


def _backward_entry(spec, needs, x, weight, bias, shift, mean_d, rstd, dy):
    return engine.backward(spec, needs, x, weight, bias, shift, mean_d, rstd, dy)


# what torch._dynamo.mark_dynamic sets on a tensor (torch 2.13)
_MARKS = ("_dynamo_dynamic_indices", "_dynamo_dynamic_range", "_dynamo_hint_overrides", "_specialize_on",
          "_has_dynamo_dim_marking")


class _Compiled:
    """One function compiled for one signature: dynamo + Inductor for the first call, then Inductor's callable
    directly (our signature key is the guard). Each instance compiles a fresh copy of the entry's code object:
    dynamo caches per code object, so its recompile limit is never reached.

    `dynamic` names, per tensor argument, the dims compiled as symbolic sizes (the batch dims of the shape policy
    below); the direct call then passes their sizes too.
    """

    def __init__(self, entry, n_static: int, n_outputs: int, dynamic: dict[int, tuple[int, ...]] | None = None):
        code = entry.__code__.replace(co_name=f"normzoo_{entry.__name__.strip('_')}_{next(_tags)}")
        self.arg_names = code.co_varnames[n_static:code.co_argcount]
        self.dynamic = dynamic or {}
        self.traced_once = False
        self.graphs = 0  # graphs dynamo handed to the backend for this function
        self.n_outputs = n_outputs  # the tensors the entry returns (its None results are not graph outputs)
        self.direct = None
        self.getters: list[tuple[int, int | None]] = []  # per graph input: (tensor argument, size dim or None)
        fn = types.FunctionType(code, entry.__globals__, code.co_name)
        self.traced = torch.compile(fn, backend=self._backend, dynamic=False, fullgraph=True)

    def _backend(self, gm, example_inputs):
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        # (engine.INDUCTOR_CONFIGS: the thread count read at run time, so that a process with another thread count
        # finds the same kernels in Inductor's cache, whose key leaves the thread count out in this mode; FMAs)
        with inductor_config.patch(engine.INDUCTOR_CONFIGS):
            compiled = compile_fx(gm, example_inputs)
        getters = [self._getter(n) for n in gm.graph.nodes if n.op == "placeholder"]
        outputs = gm.graph.output_node().args[0]
        # the direct call returns the graph's outputs: only when they are exactly the entry's tensor results
        # (an output that is an input, say, would be returned by dynamo's code, not by the graph), and it skips
        # dynamo's guards: only when no guard on a symbolic size can fail for another batch size
        self.graphs += 1
        if (self.graphs == 1  # only the first, shape-generic graph: a recompile by dynamo's guards is a static
                # graph, valid for its sizes only
                and all(g is not None for g in getters) and len(outputs) == self.n_outputs
                and _guards_hold_for_any_size(example_inputs)):  # else keep going through dynamo
            self.direct, self.getters = compiled, getters
        return compiled

    def _getter(self, node):
        """Where a graph input comes from: one of our tensor arguments, or one of its sizes (a symbolic dim)."""
        source = getattr(node.meta.get("grapharg"), "source", None)
        base = getattr(source, "base", None)
        if type(source).__name__ == "LocalSource" and source.local_name in self.arg_names:
            return self.arg_names.index(source.local_name), None
        if (type(source).__name__ == "TensorPropertySource" and source.prop.name == "SIZE"
                and getattr(base, "local_name", None) in self.arg_names):
            return self.arg_names.index(base.local_name), source.idx
        return None

    def __call__(self, static: tuple, tensors: tuple):
        if self.direct is not None:
            return self.direct(*[tensors[i] if d is None else tensors[i].shape[d] for i, d in self.getters])
        if not self.dynamic or self.traced_once:
            # without a direct path after the first trace (a guard ties the graph to sizes), dynamo's guards decide
            # from here: a size outside them recompiles, as a static graph
            return self.traced(*static, *tensors)
        self.traced_once = True
        # mark the batch dims for this one trace, then put the tensors' own markings back: the caller's tensors
        # must not carry ours into their own torch.compile (marking a view instead would tie the dims to its base)
        saved = [(tensors[i], {a: getattr(tensors[i], a) for a in _MARKS if hasattr(tensors[i], a)})
                 for i in self.dynamic]
        try:
            for i, dims in self.dynamic.items():
                torch._dynamo.mark_dynamic(tensors[i], list(dims))
            with torch.fx.experimental._config.patch(use_duck_shape=False):  # equal sizes stay separate symbols
                return self.traced(*static, *tensors)
        finally:
            for t, attrs in saved:
                for a in _MARKS:
                    if a in attrs:
                        setattr(t, a, attrs[a])
                    elif hasattr(t, a):
                        delattr(t, a)


def _guards_hold_for_any_size(example_inputs) -> bool:
    """True when every shape guard dynamo and Inductor recorded holds for any values of the symbolic sizes (tried on
    a spread of sizes, each symbol independently): then skipping the guards can never run a kernel outside the
    sizes it is valid for. A guard like rows % 256 == 0 (code that branched on a batch size) makes this False."""
    import itertools

    import sympy

    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None:
        return True
    # sizes dynamo found equal (x's batch dim and dy's, say) are one symbol once its replacements are applied
    exprs = [shape_env.simplify(g.expr) for g in shape_env.guards]
    symbols = sorted({s for e in exprs for s in e.free_symbols}, key=str)
    if len(symbols) > 3:  # more symbols than the shape policy makes: be strict
        return False
    for values in itertools.product((2, 3, 5, 16, 97, 1000, 4099), repeat=len(symbols)):
        subs = dict(zip(symbols, values))
        if any(e.xreplace(subs) is not sympy.true for e in exprs):
            return False
    return True


class _Kernel:
    """A signature's forward (an inference graph: statistics + normalize) and its backward graphs, one per set of
    needed gradients and dy signature, each compiled the first time it is asked for."""

    def __init__(self, spec, batch_dims: tuple[int, ...]):
        self.spec = spec
        self.batch_dims = batch_dims  # x's dims compiled as symbolic sizes
        self.compiled: dict = {}  # "forward", or (needs, dy signature) -> _Compiled
        self.cache_key = None  # its key in the signature cache, when it is there

    def forward(self, tensors: tuple):
        compiled = self.compiled.get("forward")
        if compiled is None:
            make = lambda: _Compiled(_forward_entry, 1, 4, {0: self.batch_dims} if self.batch_dims else None)  # noqa
            compiled, out = self._obtain("forward", make, (self.spec,), tensors)
            if compiled is None:  # compilation is off (a compiler failure): this call runs eagerly
                return engine.forward_inference(self.spec, *tensors)
            if out is not None:
                return out
        return compiled((self.spec,), tensors)

    def infer(self, tensors: tuple) -> Tensor:
        """y of a call that needs no gradient: the forward's (one graph fewer to compile than a y-only one)."""
        return self.forward(tensors)[0]

    def backward(self, needs, tensors: tuple):
        """tensors: (x, weight, bias, shift, mean_d, rstd, dy)."""
        key = (needs, signature(tensors[-1], self.batch_dims))
        compiled = self.compiled.get(key)
        if compiled is None:
            per_sample = backward_dynamic(tensors, self.batch_dims)
            make = lambda: _Compiled(_backward_entry, 2, sum(needs), per_sample)  # noqa: E731
            compiled, out = self._obtain(key, make, (self.spec, needs), tensors)
            if compiled is None:
                return engine.backward(self.spec, needs, *tensors)
            if out is not None:
                return out
        out = compiled((self.spec, needs), tensors)
        if compiled.direct is None:
            return out
        results = iter(out)  # the graph returns the needed gradients only
        return tuple(next(results) if need else None for need in needs)

    def _obtain(self, key, make, static: tuple, tensors: tuple):
        """Compile what `key` names, once (under the lock: concurrent first calls wait for the one compile).
        Returns (compiled, output of the compiling call), or (None, None) when compilation is off: then this call
        runs eagerly."""
        with _state.lock:
            if key in self.compiled:
                return self.compiled[key], None
            if not compile_enabled():
                return None, None
            compiled = make()
            try:
                out = _first_call(compiled, static, tensors)
            except Exception as err:  # noqa: BLE001 - any compiler failure: fall back loudly, never silently
                if not _is_compiler_failure(err):
                    raise
                _turn_compile_off(err)
                return None, None
            self.compiled[key] = compiled
            return compiled, out


def backward_dynamic(tensors: tuple, batch_dims: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """A backward's symbolic dims per argument (x, weight, bias, shift, mean_d, rstd, dy): x, dy and the per-sample
    statistics share x's batch dims (per-channel statistics and the affine have none)."""
    x = tensors[0]
    return {i: batch_dims for i in (0, 3, 4, 5, 6) if batch_dims and tensors[i].dim() == x.dim()
            and all(tensors[i].shape[d] == x.shape[d] for d in batch_dims)}


class _CompiledNorm(torch.autograd.Function):
    """Ties a kernel's compiled forward and backward into autograd. With create_graph (double backward) the
    gradient comes from the engine's differentiable formulation instead: compiled graphs have no derivatives."""

    @staticmethod
    def forward(ctx, kernel, x, weight, bias, buffers):
        # buffers: (running_mean, running_var, momentum), never differentiated: in a tuple, autograd skips them
        y, shift, mean_d, rstd = kernel.forward((x, weight, bias) + buffers)
        ctx.kernel = kernel
        ctx.save_for_backward(x, weight, bias, shift, mean_d, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, shift, mean_d, rstd = ctx.saved_tensors
        wanted = ctx.needs_input_grad  # False for None inputs
        needs = (wanted[1], wanted[2], wanted[3])
        if torch.is_grad_enabled():  # create_graph=True
            grads = engine.backward_create_graph(ctx.kernel.spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
        elif compile_enabled():
            grads = ctx.kernel.backward(needs, (x, weight, bias, shift, mean_d, rstd, dy))
        else:  # compilation turned off since (a compiler failure)
            grads = engine.backward(ctx.kernel.spec, needs, x, weight, bias, shift, mean_d, rstd, dy)
        return None, grads[0], grads[1], grads[2], None


def signature(t: Tensor | None, batch_dims: tuple[int, ...] = ()):
    """What a compiled kernel depends on: shape (None at the batch dims), layout, dtype, device."""
    if t is None:
        return None
    if batch_dims:  # only for dense layouts: their strides follow from the shape
        layout = "channels_last" if t.dim() in (4, 5) and not t.is_contiguous() else "contiguous"
        return (tuple(None if d in batch_dims else n for d, n in enumerate(t.shape)), layout, t.dtype, t.device)
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


def batch_dims(spec: engine.NormSpec, x: Tensor) -> tuple[int, ...]:
    """The dims of x one kernel serves at every size (the shape policy): the batch dim, and for layer norms every
    dim outside the normalized ones (rows, sequence lengths). Measured on an AVX-512 Xeon: symbolic batch and row
    counts run at the static kernel's speed, while symbolic spatial sizes ran 6-7x slower, so those stay static.
    Dims of size 1 stay static (dynamo specializes them), and so do inputs of any other layout than contiguous
    or channels_last (their strides are part of the signature)."""
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))):
        return ()
    if spec.groups is None:
        reduced = spec.layer_dims(x.dim())
        candidates = [d for d in range(x.dim()) if d not in reduced and (d == 0 or reduced != (1,))]
    else:
        candidates = [0]
    return tuple(d for d in candidates if x.shape[d] >= 2)


def run(spec: engine.NormSpec, x, weight=None, bias=None, running_mean=None, running_var=None, momentum=None,
        *, compile: bool = True) -> Tensor:
    """Compute engine.forward, through the per-signature compiled kernels unless compilation is off."""
    args = (x, weight, bias, running_mean, running_var, momentum)
    kernel = kernel_of(spec, args, compile)
    if kernel is None:
        return inline(spec, args)
    return apply(kernel, args)


def plain_ops_only() -> bool:
    """True where no custom autograd.Function can serve a call: inside a torch.func transform, or while a dual level
    of forward-mode AD (torch.autograd.forward_ad) is open, whose tangents only differentiable ops carry."""
    return engine.under_functorch() or forward_ad._current_level >= 0


def inline(spec: engine.NormSpec, args: tuple) -> Tensor:
    """A call no kernel serves: traced inline inside a user's torch.compile or torch.export, else the eager engine."""
    if torch.compiler.is_compiling():
        # inside a user's torch.compile: trace the engine inline as plain differentiable ops (no autograd.Function,
        # which would keep AOTAutograd from caching the user's graph); their backward is derived in that graph
        return engine.reference_forward(spec, *args)
    if forward_ad._current_level >= 0:  # the engine's autograd.Function has no forward derivative
        return engine.reference_forward(spec, *args)
    return engine.forward(spec, *args)


def kernel_of(spec: engine.NormSpec, args: tuple, compile: bool = True) -> "_Kernel | None":
    """The in-memory kernel of a call's signature (created on first sight, its graphs compiled on first use), or
    None where none serves the call: compilation off, an empty input, a user's torch.compile, torch.func, TorchScript."""
    x = args[0]
    if (
        torch.compiler.is_compiling()
        or not compile
        or not compile_enabled()
        or x.numel() == 0  # nothing to compute; not worth a kernel
        or torch.jit.is_scripting()
        or plain_ops_only()  # torch.func, forward-mode AD: the engine's plain differentiable ops
    ):
        return None
    dims = batch_dims(spec, x) if dynamic_batch_enabled() else ()
    key = (spec, torch.is_inference_mode_enabled(), signature(x, dims)) + tuple(signature(t) for t in args[1:])
    kernel = _state.kernels.get(key)
    if kernel is None:
        return _new_kernel(key, spec, dims)
    _state.kernels.move_to_end(key)
    _state.hits += 1
    return kernel


def apply(kernel, args: tuple) -> Tensor:
    """Run a kernel (this module's, or normzoo.policy's store kernel) on a call's arguments, through autograd
    when a gradient is needed."""
    x, weight, bias = args[0], args[1], args[2]
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        if kernel.__class__ is not _Kernel:  # a store kernel (normzoo.policy): its C++ autograd node, once there
            y = kernel.native_apply(args)
            if y is not None:
                return y
        return _CompiledNorm.apply(kernel, x, weight, bias, args[3:])
    return kernel.infer(args)


def _first_call(compiled: _Compiled, static: tuple, tensors: tuple):
    """Run a new compiled function's first call (the compile), counted and timed."""
    start = time.perf_counter()
    with torch.no_grad():  # an inference graph: autograd is _CompiledNorm's business
        out = compiled(static, tensors)
    with _state.lock:
        _state.compiles += 1
        _state.compile_seconds += time.perf_counter() - start
    return out


def kernel_for(spec: engine.NormSpec, dims: tuple[int, ...]) -> "_Kernel":
    """An in-memory kernel for a spec and shape policy, outside the signature cache (normzoo.policy's fallback for
    kernels the store cannot serve)."""
    engine.load_ops()
    return _Kernel(spec, dims)


def _new_kernel(key, spec, dims) -> "_Kernel":
    """A signature seen for the first time: one kernel object, even when several threads meet it at once (its
    graphs compile on first use, under the same lock)."""
    with _state.lock:
        kernel = _state.kernels.get(key)
        if kernel is None:
            engine.load_ops()
            kernel = _state.kernels[key] = _Kernel(spec, dims)
            kernel.cache_key = key
            while len(_state.kernels) > max_cache_size():
                _state.kernels.popitem(last=False)
                _state.evictions += 1
                _state.generation += 1
                native.invalidate()
    return kernel


def _turn_compile_off(err: Exception) -> None:
    native.invalidate()
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
