"""The kernel builder: an engine function made into an AOTInductor package in the kernel store.

A job names one kernel: its role (the forward, the inference forward that returns y alone, or a backward and the
gradients it returns), the spec, and per tensor argument its example shape, dtype, layout and the dims that are
symbolic. `build(job)` exports the engine function with those dims as `torch.export.Dim`s (min 2: sizes 0 and 1 are
served elsewhere), compiles it with AOTInductor (thread count read at run time) and commits it to the store
(normzoo.store).

`python -m normzoo.builder` is the background worker: it reads jobs as JSON lines on stdin (each naming the store
directory it goes to), builds each one that
the store does not hold yet (a lock file per key keeps two processes from building the same kernel at once) and
writes one JSON line per job on stdout. It runs in its own process, so dynamo and Inductor state never mix with
the caller's, and at a lower priority, so a training step that runs meanwhile keeps its cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from . import engine, native, store

FORWARD_ARGS = ("x", "weight", "bias", "running_mean", "running_var", "momentum")
BACKWARD_ARGS = ("x", "weight", "bias", "shift", "mean_d", "rstd", "dy")
STALE_LOCK_S = 900  # a lock older than this belongs to a builder that died: take over


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                  "channels_last_3d": torch.channels_last_3d}


def layout_of(t: torch.Tensor) -> str | None:
    """The dense layout t is in (a key of MEMORY_FORMATS), or None for any other strides: a kernel's contract names
    dense layouts only, since an AOTInductor kernel reads its inputs with the strides it was built for."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    return None


def describe(t: torch.Tensor | None, dynamic: tuple[int, ...] = ()) -> dict | None:
    """An argument as a job holds it: example shape, dtype, layout, symbolic dims."""
    if t is None:
        return None
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "layout": layout_of(t),
            "dynamic": sorted(dynamic)}


def contract(arg: dict | None) -> dict | None:
    """What of an argument a kernel key holds: sizes (None where symbolic), dtype, layout."""
    if arg is None:
        return None
    return {"shape": [None if d in arg["dynamic"] else n for d, n in enumerate(arg["shape"])],
            "dtype": arg["dtype"], "layout": arg["layout"]}


def spec_fields(spec: engine.NormSpec) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}


def spec_from(fields: dict) -> engine.NormSpec:
    return engine.NormSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()})


def job_for(role: str, spec: engine.NormSpec, tensors: tuple, dynamic: dict[int, tuple[int, ...]],
            needs: tuple[bool, bool, bool] | None = None) -> dict:
    """A job for the kernel of `role` on these example tensors (None: absent): "forward" (y and the statistics the
    backward needs), "inference" (y alone) or "backward"."""
    args = [describe(t, dynamic.get(i, ())) for i, t in enumerate(tensors)]
    job = {"role": role, "spec": spec_fields(spec), "args": args, "needs": list(needs) if needs else None}
    role_key = role if needs is None else f"{role}:{''.join('1' if n else '0' for n in needs)}"
    job["fields"] = store.key_fields(role_key, job["spec"], [contract(a) for a in args])
    job["key"] = store.key_of(job["fields"])
    return job


class _Entry(torch.nn.Module):
    """The engine function a job names, taking only its present tensors (AOTInductor packages take tensors)."""

    def __init__(self, job: dict) -> None:
        super().__init__()
        self.spec = spec_from(job["spec"])
        self.present = [a is not None for a in job["args"]]
        self.role = job["role"]
        self.needs = tuple(job["needs"]) if job["needs"] else None

    def forward(self, *tensors):
        it = iter(tensors)
        args = [next(it) if p else None for p in self.present]
        if self.role == "forward":
            return tuple(engine.forward_inference(self.spec, *args))
        if self.role == "inference":  # y alone, for calls that need no gradient: no statistics to write out
            return (engine.forward_inference(self.spec, *args)[0],)
        grads = engine.backward(self.spec, self.needs, *args)
        return tuple(g for g in grads if g is not None)


def _example(arg: dict) -> torch.Tensor:
    t = torch.randn(arg["shape"], dtype=torch.float64).to(getattr(torch, arg["dtype"]))
    return t.contiguous(memory_format=MEMORY_FORMATS[arg["layout"]])


def build(job: dict, root: Path | None = None) -> Path:
    """Export, compile and commit the job's kernel; returns its package in the store."""
    engine.load_ops()  # Inductor's op engine.stored uses
    present = [a for a in job["args"] if a is not None]
    examples = tuple(_example(a) for a in present)
    dims: dict[int, torch.export.Dim] = {}  # x's dim -> its Dim, shared by every argument with that dim symbolic
    dynamic_shapes = []
    for a in present:
        spec_dims = {d: dims.setdefault(d, torch.export.Dim(f"s{d}", min=2)) for d in a["dynamic"]}
        dynamic_shapes.append(spec_dims or None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices
        program = torch.export.export(_Entry(job), examples, dynamic_shapes=(tuple(dynamic_shapes),), strict=False)
        with tempfile.TemporaryDirectory(prefix="normzoo-build-") as tmp:
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=os.path.join(tmp, "kernel.pt2"),
                inductor_configs=dict(engine.INDUCTOR_CONFIGS))
            return store.commit(job["key"], job["fields"], Path(package), root)


def _take_lock(key: str, root: Path) -> bool:
    lock = root / f"{key}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime < STALE_LOCK_S:
                return False  # another process builds it now
            lock.unlink()
        except OSError:
            return False
        return _take_lock(key, root)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def build_once(job: dict, root: Path | None = None) -> str:
    """Build a job's kernel unless the store holds it or another process is building it. Returns what happened:
    "stored" (already there), "busy" (another builder holds the lock), "built"."""
    return _once(job["key"], root, lambda r: store.lookup(job["key"], job["fields"], r) is not None,
                 lambda r: build(job, r))


def build_native_once(root: Path | None = None) -> str:
    """The same for the C++ autograd node (normzoo.native)."""
    return _once(native.name(), root, lambda r: native.lookup(r) is not None, native.build)


def build_job_once(job: dict, root: Path | None = None) -> str:
    """A kernel job's build_once, or the node's (a job with role "native")."""
    return build_native_once(root) if job.get("role") == "native" else build_once(job, root)


def _once(key: str, root: Path | None, there, make) -> str:
    root = store.kernel_dir() if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    if there(root):
        return "stored"
    if not _take_lock(key, root):
        return "busy"
    try:
        if there(root):
            return "stored"
        make(root)
        return "built"
    finally:
        try:
            (root / f"{key}.lock").unlink()
        except OSError:
            pass


def worker() -> int:
    """The background builder: jobs as JSON lines on stdin, one JSON result line each on stdout."""
    try:
        os.nice(10)
    except OSError:
        pass
    torch.set_num_threads(1)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        start = time.perf_counter()
        try:
            root = Path(job["root"]) if job.get("root") else None
            status = build_job_once(job, root)
            result = {"key": job["key"], "status": status}
        except Exception as err:  # noqa: BLE001 - report it; the caller falls back for this kernel
            result = {"key": job["key"], "status": "failed",
                      "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"}
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(worker())
