"""Build the kernels a model needs into the kernel store ahead of time, so that a container or a cluster job ships
a ready store (`normzoo precompile`).

`precompile(model, *example_inputs)` runs a copy of the model once on the example inputs (forward and, with
grad=True, the backward of the sum of its outputs), eagerly, noting each kernel its norms would ask the store for;
then builds the ones the store does not hold, one after the other, with a progress line each. The model itself is
not touched (its running statistics stay as they are).
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from . import builder, native, policy, store


def _outputs_sum(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        parts = [_outputs_sum(o) for o in out]
        return sum(parts) if parts else torch.zeros(())
    return torch.zeros(())


def jobs_for(model: torch.nn.Module, *example_inputs, grad: bool = True) -> list[dict]:
    """The kernels (builder jobs) a forward, and with grad a backward, of the model on these inputs asks the store
    for, each once, in the order of first use, and the C++ extension (normzoo.native: the autograd node and the
    layers' fast path) that calls them. Runs a copy of the model eagerly."""
    probe = copy.deepcopy(model)
    with policy.forced_background(), policy.recording() as recorded:
        if grad:
            with torch.enable_grad():
                loss = _outputs_sum(probe(*example_inputs))
                if loss.requires_grad:
                    loss.backward()
        else:
            with torch.no_grad():
                probe(*example_inputs)
    unique: dict[str, dict] = {}
    for job in recorded:
        unique.setdefault(job["key"], job)
    if native.enabled() and recorded:
        unique[native.name()] = {"key": native.name(), "role": "native"}
    return list(unique.values())


def describe_job(job: dict) -> str:
    if job["role"] == "native":
        return "the C++ autograd node (normzoo.native)"
    spec = job["spec"]
    family = (f"groups={spec['groups']}" if spec["groups"] is not None else f"dims={tuple(spec['dims'])}")
    x = job["args"][0]
    shape = "x".join("N" if d in x["dynamic"] else str(n) for d, n in enumerate(x["shape"]))
    needs = job["needs"]
    role = job["role"] if needs is None else "backward(" + ",".join(
        n for n, need in zip(("dx", "dweight", "dbias"), needs) if need) + ")"
    return f"{role} {family} {shape} {x['dtype']} {x['layout']}"


def build_jobs(jobs: list[dict], progress: bool = True, stream=None) -> dict:
    """Build each job the store does not hold. Returns counts and failures."""
    stream = sys.stderr if stream is None else stream
    summary = {"kernels": len(jobs), "built": 0, "stored": 0, "busy": 0, "failed": {},
               "kernel_dir": str(store.kernel_dir())}
    start = time.perf_counter()
    width = 24
    for i, job in enumerate(jobs, 1):
        t0 = time.perf_counter()
        try:
            status = builder.build_job_once(job)
        except Exception as err:  # noqa: BLE001 - report and go on with the next kernel
            status = "failed"
            summary["failed"][job["key"]] = f"{describe_job(job)}: {type(err).__name__}: {str(err).strip()[:300]}"
        else:
            summary[status] += 1
        if progress:
            done = int(width * i / len(jobs))
            print(f"[{'#' * done}{'.' * (width - done)}] {i}/{len(jobs)} {status:6s} {time.perf_counter() - t0:6.1f} s"
                  f"  {describe_job(job)}", file=stream, flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def precompile(model: torch.nn.Module, *example_inputs, grad: bool = True, progress: bool = True) -> dict:
    """Build into the kernel store (NORMZOO_KERNEL_DIR) every kernel `model` needs on inputs like these.

    grad=True: the forward and backward kernels of a training step (which serve calls without gradients too);
    grad=False: the inference kernels (y alone), for a process that only runs the model without gradients. Kernels
    serve every batch size (and, for layer norms, every sequence length) of the shapes given; a spatial size is part
    of a kernel, so give one example per resolution you will run. Returns {"kernels", "built", "stored",
    "busy", "failed", "kernel_dir", "seconds"}; "failed" maps kernel keys to their errors.
    """
    if not store.writable():
        raise OSError(f"normzoo precompile: the kernel store {store.kernel_dir()} is not writable "
                      f"(set {store.ENV_KERNEL_DIR} to a writable directory)")
    return build_jobs(jobs_for(model, *example_inputs, grad=grad), progress=progress)
