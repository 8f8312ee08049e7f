"""Which kernel serves a layer call, and when: the store's, the in-memory compile's, or the eager engine.

NORMZOO_COMPILE picks the policy:

- `1` (the default; also `background`): kernels come from the kernel store (normzoo.store). A signature whose
  kernel the store holds loads it in milliseconds. One it does not hold runs the eager engine (the same math, no
  compile) while a background builder process (normzoo.builder) builds the kernel into the store; the first call
  after the kernel lands switches to it. No call waits for a compile. Measured on the AVX-512 Xeon: the eager
  engine's whole ResNet-18 GroupNorm(32) training step costs about 1.2x torch.nn's, against ~30 s for the first
  step's compiles.
- `sync`: the in-memory compile of normzoo.compiling, blocking on the first call of each signature (what the
  benchmarks and the test suite use: the kernel a call gets does not depend on timing).
- `0` (or `compile=False` on a layer): the eager engine.

Training calls whose forward and backward kernels came from the store go through the C++ autograd node
(normzoo.native) once it is built (by the same background builder); before that, and with NORMZOO_NATIVE=0,
through the Python autograd.Function of normzoo.compiling, with the same kernels.

Signatures the store does not take run the in-memory compile: CUDA inputs, layouts other than contiguous and
channels_last. BatchNorm training that updates running statistics runs the store's kernels of the call without the
update, then the update (_Updating: an AOTInductor package does not write its inputs). Sizes 0 run eagerly; dims of
size 1 are static in a kernel's shape contract (another kernel). A store that cannot be written, or a build that
fails, warns once and falls back to the in-memory compile.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import builder, compiling, engine, graph_ops, native, store

ENV_COMPILE = compiling.ENV_COMPILE
_ENV_DYNAMIC_BATCH = compiling.ENV_DYNAMIC_BATCH
_raw_env = compiling.raw_env
POLL_S = 0.2  # how often a call running eagerly looks for its kernel in the store


def sync_by_default() -> None:
    """For sweeps, checks and benchmarks: measure the compiled kernels, each compiled before its first timed or
    checked call, not the eager engine that serves calls while a background build is under way. An explicit
    NORMZOO_COMPILE wins."""
    os.environ.setdefault(ENV_COMPILE, "sync")


def mode() -> str:
    """'background', 'sync' or 'off', from NORMZOO_COMPILE."""
    value = os.environ.get(ENV_COMPILE, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return "off"
    if value == "sync":
        return "sync"
    if value in ("", "1", "true", "on", "yes", "background"):
        return "background"
    raise ValueError(f"{ENV_COMPILE} must be 1 (background, the default), sync or 0, got {value!r}")


class _Stats:
    def __init__(self) -> None:
        self.loaded = 0  # kernels loaded from the store
        self.requested = 0  # kernels handed to the background builder
        self.eager_calls = 0  # calls run by the eager engine while their kernel was being built
        self.fallbacks = 0  # kernels served by the in-memory compile instead (store unusable, build failed)


_stats = _Stats()
_kernels: OrderedDict = OrderedDict()  # signature -> StoreKernel
_lock = threading.RLock()
_FALLBACK = object()  # an entry the store cannot serve: the in-memory compile's kernel serves it


class _Background:
    """The builder process: started on the first job, fed JSON lines, read by a thread."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.results: dict[str, dict] = {}  # key -> the builder's last line about it
        self.pending: set[str] = set()
        self.error: str | None = None  # why the builder could not be started or fed, last time

    def submit(self, job: dict) -> bool:
        """Hand a job to the builder (started, or restarted, as needed). False when no builder can take it."""
        job = dict(job, root=str(store.kernel_dir()))  # the store the caller reads now, whatever the builder started with
        with _lock:
            for _ in range(2):  # a builder that died since the last job is restarted once
                try:
                    if self.proc is None or self.proc.poll() is not None:
                        self._start()
                    self.proc.stdin.write(json.dumps(job) + "\n")
                    self.proc.stdin.flush()
                except OSError as err:  # no interpreter to start, a broken pipe
                    self.error = f"{type(err).__name__}: {err}"
                    self.proc = None
                    continue
                self.pending.add(job["key"])
                return True
            return False

    def _start(self) -> None:
        env = dict(os.environ, NORMZOO_KERNEL_DIR=str(store.kernel_dir()))
        self.proc = subprocess.Popen([sys.executable, "-m", "normzoo.builder"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        proc = self.proc
        threading.Thread(target=self._read, args=(proc,), daemon=True, name="normzoo-builder-reader").start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                result = json.loads(line)
            except ValueError:
                continue
            with _lock:
                self.results[result["key"]] = result
                self.pending.discard(result["key"])
            if result["status"] in ("built", "stored") and native.enabled():
                # the C++ extension next, behind the kernels asked for so far, so that it is in the store when
                # this process stops calling (a later process would build it beside its own steps)
                native.module(self.submit, self.results)
        with _lock:  # the process ended: what it had not answered is lost
            for key in list(self.pending):
                self.results.setdefault(key, {"key": key, "status": "failed", "error": "the builder process ended"})
            self.pending.clear()

    def info(self) -> dict:
        with _lock:
            alive = self.proc is not None and self.proc.poll() is None
            failed = {k: r.get("error") for k, r in self.results.items() if r["status"] == "failed"}
            return {"running": alive, "pending": len(self.pending),
                    "built": sum(r["status"] == "built" for r in self.results.values()), "failed": failed,
                    "start_error": self.error}

    def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # the builder finishes the job at hand and exits
            except OSError:
                pass


background = _Background()
atexit.register(background.close)


class _Pending:
    def __init__(self, job: dict) -> None:
        self.job = job
        self.next_check = time.monotonic() + POLL_S


def _dense(t: Tensor | None) -> Tensor | None:
    """t in a dense layout a kernel's contract can name (builder.layout_of), copied only if it is in none."""
    return t if t is None or builder.layout_of(t) is not None else t.contiguous()


def _like(dy: Tensor, x: Tensor) -> Tensor:
    """dy in x's layout (a copy only where they differ: sum().backward()'s expanded ones, say), so that one backward
    kernel per x layout serves every dy, and precompile's dry run asks for the kernel training uses."""
    if dy.is_contiguous() and x.is_contiguous():
        return dy
    layout = builder.layout_of(x)
    return dy if builder.layout_of(dy) == layout else dy.contiguous(memory_format=builder.MEMORY_FORMATS[layout])


class StoreKernel:
    """A signature's kernels from the store, with the compiled-kernel interface that normzoo.compiling's
    autograd.Function ties together: forward(tensors) -> (y, shift, mean_d, rstd), backward(needs, tensors) ->
    (dx, dweight, dbias), and infer(tensors) -> y for calls that need no gradient."""

    def __init__(self, spec: engine.NormSpec, dims: tuple[int, ...]) -> None:
        self.spec = spec
        self.batch_dims = dims
        self.entries: dict = {}  # "forward", "inference" or needs -> store.Loaded | _Pending | _FALLBACK
        self._memory: compiling._Kernel | None = None  # the in-memory compile, for entries the store cannot serve
        self.dense: bool | None = None  # whether every argument is in a layout the kernels take as it is
        self.nodes: dict = {}  # needs -> the C++ autograd node (normzoo.native) of the loaded forward and backward

    def forward(self, tensors: tuple):
        out = self._run("forward", tensors)
        return out if out is not None else self._eager(tensors)

    def infer(self, tensors: tuple) -> Tensor:
        """y of a call that needs no gradient. A signature first seen in such a call gets the inference kernel: y
        alone, no statistics to write out (a small input's call is 1-3 us shorter). One whose forward kernel is
        loaded (a training layer's no-grad calls) takes the forward's y, and no further kernel is built for it.
        While the inference kernel is being built: the forward's y where that is loaded, else the eager engine's."""
        if self._forward_serves_no_grad():
            return self.forward(tensors)[0]
        out = self._run("inference", tensors)
        if out is None:
            out = self._run("forward", tensors) if self.entries.get("forward").__class__ is store.Loaded else None
        return (out if out is not None else self._eager(tensors))[0]

    def _forward_serves_no_grad(self) -> bool:
        """Whether the loaded forward kernel serves the no-grad calls: no inference kernel was asked for first."""
        return self.entries.get("inference") is None and self.entries.get("forward").__class__ is store.Loaded

    def no_grad_package(self) -> str:
        """The package infer() runs for good ("": none yet), for the layers' fast path."""
        if self._forward_serves_no_grad():
            return str(self.entries["forward"].package)
        inference = self.entries.get("inference")
        return str(inference.package) if inference.__class__ is store.Loaded else ""

    def _run(self, role: str, tensors: tuple):
        """The outputs of the role's kernel (loaded, or compiled in memory where the store cannot serve it), or None
        while it is being built."""
        entry = self.entries.get(role)
        if entry.__class__ is store.Loaded and self.dense:  # the steady state, with the least Python
            return tuple(entry([t for t in tensors if t is not None]))
        given, tensors = tensors, tuple(_dense(t) for t in tensors)
        if self.dense is None:  # the kernel's key fixes the arguments' layouts: whether they need a copy is fixed too
            self.dense = all(a is b for a, b in zip(given, tensors))
        entry = self._entry(role, lambda: builder.job_for(role, self.spec, tensors, {0: self.batch_dims}))
        if isinstance(entry, store.Loaded):
            if self.dense and native.enabled():  # the layers' fast path needs the extension, forwards alone too
                native.module(background.submit, background.results)
            return tuple(entry([t for t in tensors if t is not None]))
        if entry is _FALLBACK:
            return self._in_memory().forward(tensors)  # (y first, as the inference kernel's)
        return None

    def _eager(self, tensors: tuple):
        _stats.eager_calls += _recording is None
        return engine.forward_inference(self.spec, *(_dense(t) for t in tensors))

    def backward(self, needs, tensors: tuple):
        """tensors: (x, weight, bias, shift, mean_d, rstd, dy)."""
        x, dy = tensors[0], tensors[-1]
        given = tensors[:3] if self.dense else tuple(_dense(t) for t in tensors[:3])
        tensors = given + tuple(_dense(t) for t in tensors[3:-1]) + (_like(dy, x),)
        entry = self.entries.get(needs)
        if entry.__class__ is not store.Loaded:
            entry = self._entry(needs, lambda: builder.job_for(
                "backward", self.spec, tensors, compiling.backward_dynamic(tensors, self.batch_dims), needs))
        if entry.__class__ is store.Loaded:
            results = iter(entry([t for t in tensors if t is not None]))  # the needed gradients, in order
            return tuple(next(results) if need else None for need in needs)
        if entry is _FALLBACK:
            return self._in_memory().backward(needs, tensors)
        _stats.eager_calls += _recording is None
        return engine.backward(self.spec, needs, *tensors)

    def native_apply(self, args: tuple):
        """y from the C++ autograd node for a call that needs gradients, or None where there is none (yet): the
        backward kernel for these needs is loaded by a first backward through the Python autograd.Function, and the
        extension by the background builder."""
        x, weight, bias = args[0], args[1], args[2]
        needs = (x.requires_grad, weight is not None and weight.requires_grad, bias is not None and bias.requires_grad)
        node = self.nodes.get(needs)
        if node is None:
            node = self._node(needs, x)
            if node is None:
                return None
        return node(x, weight, bias, args[3], args[4])

    def _node(self, needs, x):
        forward, backward = self.entries.get("forward"), self.entries.get(needs)
        if not (forward.__class__ is store.Loaded and backward.__class__ is store.Loaded and self.dense
                and x.__class__ is Tensor and native.enabled()):  # a tensor subclass keeps its Python path
            return None
        ext = native.module(background.submit, background.results)
        if ext is None:
            return None
        with _lock:
            if needs not in self.nodes:
                self.nodes[needs] = ext.Node(str(forward.package), str(backward.package), needs, builder.layout_of(x),
                                             native.token(self.spec))
            return self.nodes[needs]

    def _in_memory(self) -> compiling._Kernel:
        if self._memory is None:
            self._memory = compiling.kernel_for(self.spec, self.batch_dims)
        return self._memory

    def _entry(self, key, make_job):
        entry = self.entries.get(key)
        if entry is None or (isinstance(entry, _Pending) and time.monotonic() >= entry.next_check):
            with _lock:
                entry = self.entries[key] = _resolve(entry, make_job)
        return entry


_recording: list | None = None  # normzoo.precompile's list of the jobs calls would hand to the builder


def _resolve(entry, make_job):
    """The next state of an entry: loaded from the store, still being built, or served in memory."""
    if entry is None:
        job = make_job()
        if _recording is not None:  # precompile: note the job, load and build nothing now, compute eagerly
            _recording.append(job)
            return _Pending(job)
        loaded = store.load(job["key"], job["fields"])
        if loaded is not None:
            _stats.loaded += 1
            return loaded
        if not store.writable():
            _stats.fallbacks += 1
            return _FALLBACK
        if not background.submit(job):
            store.warn_once("builder", f"the background builder could not be started ({background.error}); kernels "
                                       "are compiled in memory instead")
            _stats.fallbacks += 1
            return _FALLBACK
        _stats.requested += 1
        return _Pending(job)
    job = entry.job
    if _recording is not None:
        entry.next_check = time.monotonic() + POLL_S
        return entry
    result = background.results.get(job["key"])
    # the entry may come from our builder, or from another process's (a "busy" answer, a forked parent's builder)
    if (result is None or result["status"] != "failed") and store.paths(job["key"])[1].exists():
        loaded = store.load(job["key"], job["fields"])
        if loaded is not None:
            _stats.loaded += 1
            return loaded
    if result is not None and result["status"] in ("failed", "built", "stored"):
        # failed, or built and then not loadable: this kernel is compiled in memory from now on
        store.warn_once(f"failed:{job['key']}", f"building a kernel failed ({result.get('error', 'not loadable')});"
                                                " it is compiled in memory instead")
        _stats.fallbacks += 1
        return _FALLBACK
    entry.next_check = time.monotonic() + POLL_S
    return entry


def _store_takes(spec: engine.NormSpec, args: tuple) -> bool:
    x = args[0]
    if x.device.type != "cpu" or args[5] is not None:
        return False
    if engine.updates_running(spec, args[3]):  # an AOTInductor package does not write its inputs: _Updating serves it
        return False
    return builder.layout_of(x) is not None


class _Updating:
    """BatchNorm training that updates its running statistics, served from the store: the kernel of the same call
    without the update (the kernel of track_running_stats=False), then the update in place from the batch
    statistics it returns (engine.update_running_from)."""

    __slots__ = ("inner", "spec", "update")

    def __init__(self, inner, update: engine.NormSpec) -> None:
        self.inner, self.spec, self.update = inner, inner.spec, update

    def forward(self, tensors: tuple):
        x, weight, bias, running_mean, running_var, momentum = tensors
        out = self.inner.forward((x, weight, bias, None, None, None))
        engine.update_running_from(self.update, x, *out[1:], running_mean, running_var, momentum)
        return out

    def infer(self, tensors: tuple) -> Tensor:
        return self.forward(tensors)[0]  # the update needs the statistics: the forward kernel's

    def backward(self, needs, tensors: tuple):
        return self.inner.backward(needs, tensors)

    def native_apply(self, args: tuple):
        return None  # the C++ node returns y alone: the update needs the statistics (the Python function has them)


def run(spec: engine.NormSpec, x, weight=None, bias=None, running_mean=None, running_var=None, momentum=None,
        *, compile: bool = True) -> Tensor:
    """Compute engine.forward with the kernel the policy picks for this call.

    A call whose exact signature was seen before takes the kernel picked then (`_plans`): the per-call Python
    between a layer and its kernel was most of a small input's time (about 25 us against the kernel's 7-14 us on
    a 4x32x16x16 GroupNorm, AVX-512 Xeon, 1 thread). What the pick depends on is in the plan's key, or checked on
    every call (a user's torch.compile, torch.func, precompile's recording, compilation turned off by a failure).
    """
    args = (x, weight, bias, running_mean, running_var, momentum)
    if torch.compiler.is_compiling():
        # a user's torch.compile: one opaque op (normzoo.graph_ops), whose kernels are picked when it runs; traced
        # inline for torch.export (an exported program must not need normzoo's ops) or without compiled kernels
        if compile and mode() != "off" and not torch.compiler.is_exporting() and graph_ops.takes(spec, args):
            return graph_ops.call(spec, args)
        return compiling.inline(spec, args)
    key = None
    # not under torch.func or forward-mode AD (compiling.plain_ops_only, with is_compiling already known False)
    if _recording is None and torch._C._functorch.maybe_current_level() is None and forward_ad._current_level < 0:
        # written out, not by _sig: on a small input every 100 ns of this shows
        key = (spec, compile, _raw_env(ENV_COMPILE), _raw_env(_ENV_DYNAMIC_BATCH), torch.is_inference_mode_enabled(),
               x.shape, x.stride(), x.dtype, x.device,
               None if weight is None else (weight.shape, weight.stride(), weight.dtype, weight.device),
               None if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device),
               None if running_mean is None and running_var is None and momentum is None
               else (_sig(running_mean), _sig(running_var), _sig(momentum)))
        plan = _plans.get(key)
        if plan is not None and plan.generation == (compiling._state.generation, _generation[0]) and (
                compiling._state.broken is None):
            if plan.memory_key is not None:  # an in-memory kernel: counted and kept fresh in its LRU, as compiling.kernel_of does
                compiling._state.kernels.move_to_end(plan.memory_key)
                compiling._state.hits += 1
            y = compiling.apply(plan.kernel, args)
            if learning.call is not None:
                _teach(learning.call, plan.kernel, args)
            return y
    kernel = _kernel_of(spec, args, compile)
    if kernel is None:
        return compiling.inline(spec, args)
    if key is not None and not torch.jit.is_scripting():
        if len(_plans) >= _PLANS_MAX:
            _plans.clear()
        _plans[key] = _Plan(kernel)
    y = compiling.apply(kernel, args)
    if learning.call is not None and key is not None:
        _teach(learning.call, kernel, args)
    return y


class _Learning(threading.local):
    call = None  # (the calling layer's fast path, its input), while the layer's call takes this Python way


learning = _Learning()


def _teach(call: tuple, kernel, args: tuple) -> None:
    """Tell a layer's fast path which store kernels served this call, so that its next call with this signature
    skips the Python between the layer and them. Only what the plan's key fixes: store kernels loaded, arguments
    in the layouts the kernels take, and the kernel given the layer's own input (the fast path checks the signature
    of that input, not of something made from it). Running statistics only as read (BatchNorm eval): a call that
    updates them is no store kernel's (_store_takes)."""
    fast, input = call
    if args[0] is not input or kernel.__class__ is not StoreKernel or not kernel.dense:
        return
    package = kernel.no_grad_package()
    if package or kernel.nodes:
        fast.learn(args[0], args[1], args[2], args[3], args[4], package, list(kernel.nodes.items()))


class _Plan:
    """A call signature's kernel, valid while no kernel has left the caches since (their generations)."""

    __slots__ = ("kernel", "generation", "memory_key")

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.generation = (compiling._state.generation, _generation[0])
        self.memory_key = getattr(kernel, "cache_key", None)


_plans: dict = {}  # exact call signature -> _Plan
_PLANS_MAX = 1024
_generation = [0]  # bumped whenever a kernel leaves _kernels


def _sig(t: Tensor | None):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _kernel_of(spec: engine.NormSpec, args: tuple, compile: bool):
    """The kernel that serves a call (a StoreKernel, or the in-memory compile's), or None: computed inline."""
    x = args[0]
    which = mode() if compile else "off"
    if which == "background" and engine.updates_running(spec, args[3]) and not torch.compiler.is_compiling():
        inner_spec, inner_args = dataclasses.replace(spec, momentum=None), args[:3] + (None, None, None)
        if _store_takes(inner_spec, inner_args):
            inner = _kernel_of(inner_spec, inner_args, compile)
            return None if inner is None else _Updating(inner, spec)
    if _recording is not None and not _store_takes(spec, args):  # precompile: the store has no kernel for it
        return None
    if which != "background" or torch.compiler.is_compiling() or not _store_takes(spec, args):
        return compiling.kernel_of(spec, args, compile and which != "off")
    if (x.numel() == 0 or torch.jit.is_scripting() or compiling.plain_ops_only()
            or not compiling.compile_enabled()):
        return None
    dims = compiling.batch_dims(spec, x)
    key = (spec, compiling.signature(x, dims)) + tuple(compiling.signature(t) for t in args[1:])
    kernel = _kernels.get(key)
    if kernel is None:
        with _lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = _kernels[key] = StoreKernel(spec, dims)
                while len(_kernels) > compiling.max_cache_size():
                    _kernels.popitem(last=False)
                    _generation[0] += 1
                    native.invalidate()
    return kernel


def _op_kernel(spec: engine.NormSpec, args: tuple):
    """graph_ops' kernel lookup: what an eager call with these arguments would take (None: the eager engine)."""
    return _kernel_of(spec, args, True)


graph_ops.runtime = _op_kernel


def info() -> dict:
    """The store's share of cache_info(): kernels loaded from the store, handed to the background builder,
    calls that ran eagerly meanwhile, fallbacks to the in-memory compile, and the builder's state."""
    return {"mode": mode(), "kernel_dir": str(store.kernel_dir()), "store_loaded": _stats.loaded,
            "store_requested": _stats.requested, "eager_interim_calls": _stats.eager_calls,
            "store_fallbacks": _stats.fallbacks, "background": background.info(), "native_node": native.status()}


def cache_info() -> dict:
    """normzoo.compiling.cache_info() (the in-memory compiles) with the store's share (policy.info()): kernels
    loaded from the store apart from kernels compiled, and what the background builder is doing."""
    return {**compiling.cache_info(), **info()}


def clear() -> None:
    with _lock:
        _kernels.clear()
        _plans.clear()
        _generation[0] += 1
        native.invalidate()


class recording:
    """Within it, calls that would hand a kernel to the background builder note its job instead (and compute
    eagerly); on exit the signatures seen are forgotten, so later calls look in the store again."""

    def __enter__(self) -> list:
        global _recording
        with _lock:
            _recording = []
            clear()
            return _recording

    def __exit__(self, *exc) -> None:
        global _recording
        with _lock:
            _recording = None
            clear()


def forced_background():
    """A context in which the store policy applies whatever NORMZOO_COMPILE says (for precompile)."""
    return _ModeOverride("background")


class _ModeOverride:
    def __init__(self, value: str) -> None:
        self.value = value

    def __enter__(self):
        self.saved = os.environ.get(ENV_COMPILE)
        os.environ[ENV_COMPILE] = self.value

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop(ENV_COMPILE, None)
        else:
            os.environ[ENV_COMPILE] = self.saved
