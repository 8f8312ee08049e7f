"""normzoo's C++ extension (normzoo/csrc/node.cpp): the autograd node and the layers' fast path.

A training call through the Python autograd.Function costs tens of microseconds more than torch.nn's, and every
call pays for the Python between a layer and its kernel (the checks, the plan's key): most of a small input's time
(the README's small-input study). The node ties a store kernel's forward and backward into autograd with no Python
between them; a layer's fast path (normzoo.layers) runs a signature served before straight from the layer's
forward. The extension is compiled once per torch version and source into the kernel store by the background
builder (normzoo.builder, ~30 s of gcc) and imported by later processes in milliseconds. Until it is there, and
wherever it is not (NORMZOO_NATIVE=0, a build that failed), calls take the Python path: the same kernels, the same
numbers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import torch

from . import engine, store

ENV_NATIVE = "NORMZOO_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "node.cpp"
POLL_S = 0.2  # how often a call looks for the extension while it is being built


def enabled() -> bool:
    return os.environ.get(ENV_NATIVE, "1").strip().lower() not in ("0", "false", "off", "no")


@functools.cache
def name() -> str:
    """The extension's module name: it changes with its source, torch's version and the Python ABI, so an entry
    built for any other is never imported."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(f"{torch.__version__}|{sys.implementation.cache_tag}|{sys.platform}".encode())
    return f"normzoo_node_{h.hexdigest()[:16]}"


def fields() -> dict:
    """The extension's entry in the kernel store (normzoo.store: manifest with its sha256, written atomically,
    checked before every import; a truncated or foreign file is removed, never loaded: dlopen of a truncated
    library crashes the process)."""
    return {"format": store.FORMAT, "native": name(), "torch": torch.__version__}


def lookup(root: Path | None = None) -> Path | None:
    """The extension's file in the store when its entry is whole, else None."""
    return store.lookup(name(), fields(), root)


def build(root: Path) -> Path:
    """Compile the extension in a temporary directory and commit it to the store (`root`)."""
    import tempfile

    from torch.utils import cpp_extension

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".native-") as tmp:
        cpp_extension.load(name(), [str(SOURCE)], build_directory=tmp, extra_cflags=["-O2"], verbose=False)
        return store.commit(name(), fields(), Path(tmp) / f"{name()}.so", root)


class _State:
    def __init__(self) -> None:
        self.module = None
        self.error: str | None = None  # why the extension cannot be had in this process
        self.asked = False  # whether the builder was handed the job
        self.next_check = 0.0
        self.results: dict = {}  # the builder's answers by key (normzoo.policy's), for fast_path()'s looks


_state = _State()
_lock = threading.Lock()
_tokens: dict = {}  # spec -> token (the C++ node's name for it), and back in _specs
_specs: list = []


def token(spec: engine.NormSpec) -> int:
    with _lock:
        if spec not in _tokens:
            _tokens[spec] = len(_specs)
            _specs.append(spec)
        return _tokens[spec]


def _create_graph_backward(token, needs, x, weight, bias, shift, mean_d, rstd, dy):
    return tuple(engine.backward_create_graph(_specs[token], needs, x, weight, bias, shift, mean_d, rstd, dy))


def module(submit, results: dict):
    """The extension's module, or None while it is not there (or cannot be). `submit(job)` hands the build to the
    background builder (False: none can take it); `results` holds the builder's answers by key."""
    state = _state
    if state.module is not None or state.error is not None:
        return state.module
    state.results = results
    now = time.monotonic()
    if now < state.next_check:
        return None
    with _lock:
        state.next_check = now + POLL_S
        file = lookup()
        if file is not None:
            state.module = _import(file)
            return state.module
        result = results.get(name())
        if result is not None and result["status"] == "failed":
            _fail(f"building it failed ({result.get('error')})")
        elif not state.asked:
            state.asked = True
            if not submit({"key": name(), "role": "native"}):
                _fail("the background builder could not be started")
    return None


def _import(file: Path):
    if name() in sys.modules:  # imported once per process: pybind11 registers its types at import
        return sys.modules[name()]
    try:
        loader = importlib.machinery.ExtensionFileLoader(name(), str(file))
        spec = importlib.util.spec_from_file_location(name(), str(file), loader=loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        sys.modules[name()] = mod
    except Exception as err:  # noqa: BLE001 - a broken entry: the Python path serves, and says why once
        _fail(f"{file} does not import ({type(err).__name__}: {err}); it is removed, so a later process rebuilds it")
        store.discard(name())
        return None
    mod.set_create_graph_backward(_create_graph_backward)
    return mod


def _fail(why: str) -> None:
    _state.error = why
    store.warn_once("native", f"the C++ autograd node is not available: {why}; training calls take the Python "
                              f"autograd.Function (same kernels, more per-call time). {ENV_NATIVE}=0 silences this.")


def fast_path():
    """A new, empty fast path for a layer (normzoo.layers), or None while the extension is not loaded (looked for
    again, every POLL_S, once a build was asked for)."""
    state = _state
    if state.module is None:
        if not state.asked or state.error is not None or time.monotonic() < state.next_check:
            return None
        if module(lambda job: True, state.results) is None:
            return None
    return state.module.FastPath()


def invalidate() -> None:
    """Every fast path forgets what it learned: a kernel left a cache, or compilation was turned off."""
    if _state.module is not None:
        _state.module.invalidate()


def status() -> str:
    """For cache_info(): 'off', 'loaded', 'failed: why', 'building' or 'not needed yet'."""
    if not enabled():
        return "off"
    if _state.module is not None:
        return "loaded"
    if _state.error is not None:
        return f"failed: {_state.error}"
    return "building" if _state.asked else "not needed yet"
