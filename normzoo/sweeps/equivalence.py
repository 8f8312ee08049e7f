"""The equivalence sweep: the zoo and torch.nn, each against the float64 oracle, case by case.

Per case: forward output, input gradient and parameter gradients for a fixed random upstream gradient, and for
BatchNorm in train mode the running statistics after WARM_STEPS + 1 steps. Errors are max-abs errors divided by
the oracle's max-abs value. The tolerance is

    tol = base(dtype) * (1 + eps(compute) / eps(dtype) * |mean(x)| / std(x)),   base(dtype) = 16 * eps(dtype)

(base from the sweep's `tolerances` when given). The first term is rounding to the dtype; the second is the cost
of x - mean in the precision the arithmetic runs in (float32 for float16/bfloat16, as torch's CPU kernels do it):
about eps * |x| / std in the normalized output, so an input with mean 1e3 and std 1 is allowed about 1e3 times
the error of a centred one.

Verdicts: PASS (zoo within tolerance), TORCH-OFF (zoo within, torch not), FAIL (zoo outside, or it raised).

Devices (`device="cuda"`, `normzoo equivalence --device cuda`): inputs, upstream gradients and parameter values are
drawn on the CPU (the same numbers on every device), copied to the device for the zoo and torch.nn, and the oracle
runs in float64 on the CPU from those CPU copies. So a cpu and a cuda report measure against bit-identical oracle
values, and the oracle shares no kernel with the device under test. Errors are computed on the oracle's side.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import report as rp
from .. import policy
from ..accuracy import rel_err, tolerance, worst
from ..binding import prepare_user
from ..frozen import FrozenBatchNorm2d
from .grid import DTYPES, Case, Sweep, format_shape, memory_format
from .oracle import Reference, norm_of, torch_counterpart

WARM_STEPS = 2  # BatchNorm train: steps before the checked one, so the running statistics have a history
PASS, FAIL, TORCH_OFF = "PASS", "FAIL", "TORCH-OFF"
TOLERANCE_RULE = ("error = max|got - oracle| / max|oracle|, for the output, each gradient and each running statistic; "
                  "tol = base(dtype) * (1 + eps(compute)/eps(dtype) * |mean(x)|/std(x)), base = 16 * eps(dtype) "
                  "unless the sweep sets `tolerances`; compute = float32 for float16/bfloat16, else the dtype")


def _run(layer, norm, steps: list[Tensor], x: Tensor, dy: Tensor, tensors: dict | None = None,
         second_order: bool = False) -> dict:
    """Warm steps (forward only, as a training loop's earlier batches), then forward + backward on x.

    `tensors` maps weight / bias / running_mean / running_var to the layer's own tensors where its names differ
    (a user's layer under `normzoo check`); by default they are the norm's attributes of those names.
    """
    if tensors is None:
        tensors = {n: getattr(norm, n) for n in ("weight", "bias", "running_mean", "running_var")
                   if getattr(norm, n, None) is not None}
    for s in steps:
        layer(s.clone().requires_grad_(True))
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    names = [n for n in ("weight", "bias") if n in tensors and tensors[n].requires_grad]
    grads = torch.autograd.grad(y, [xr] + [tensors[n] for n in names], dy, allow_unused=True,
                                create_graph=second_order)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip([xr] + [tensors[n] for n in names], grads)]
    out = {"y": y.detach(), "dx": grads[0].detach()}
    if second_order:
        out["d2x"] = _second(grads[0], xr, dy)
    grads = [g.detach() for g in grads]
    out.update({f"d{n}": g for n, g in zip(names, grads[1:])})
    for buf in ("running_mean", "running_var"):
        if buf in tensors and norm.training and not isinstance(norm, FrozenBatchNorm2d):
            out[buf] = tensors[buf].detach().clone()
    return out


def _second(dx: Tensor, x: Tensor, dy: Tensor) -> Tensor:
    """d/dx <dx, dy>: a Hessian-vector product of <y, dy> (double backward through the norm)."""
    if not dx.requires_grad:  # the gradient does not depend on x (an affine map: BatchNorm eval)
        return torch.zeros_like(x)
    (d2x,) = torch.autograd.grad((dx * dy.to(dx.dtype)).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if d2x is None else d2x.detach()


def _oracle(ref: Reference, steps: list[Tensor], x: Tensor, dy: Tensor, training: bool,
            second_order: bool = False) -> dict:
    """The oracle's output, gradients and running statistics for steps then x, in float64 on the oracle's device
    (the CPU: x and dy are copied there when they are on another device)."""
    for s in steps:
        ref.forward(s, training)
    x64 = x.detach().to(device=ref.device, dtype=torch.float64).requires_grad_(True)
    y = ref.forward(x64, training)
    params = ref.params()
    dy64 = dy.to(device=ref.device, dtype=torch.float64)
    grads = torch.autograd.grad(y, [x64] + params, dy64, create_graph=second_order)
    out = {"y": y.detach(), "dx": grads[0].detach()}
    if second_order:
        out["d2x"] = _second(grads[0], x64, dy64)
    grads = [g.detach() for g in grads]
    names = [n for n, p in (("weight", ref.weight), ("bias", ref.bias)) if p is not None and p.requires_grad]
    out.update({f"d{n}": g for n, g in zip(names, grads[1:])})
    if training and ref.running_mean is not None and not isinstance(ref.zoo, FrozenBatchNorm2d):
        out["running_mean"], out["running_var"] = ref.running_mean, ref.running_var
    return out


def _errors(got: dict | None, want: dict) -> dict | None:
    if got is None:
        return None
    return {k: rel_err(got.get(k), v) for k, v in want.items()}


def run_case(case: Case, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Measure one case on `device`; never raises for a layer's failure (a zoo exception is a FAIL with its message).

    The data are drawn on the CPU and copied to the device; the oracle and the tolerance use the CPU copies.
    """
    dtype = DTYPES[case.dtype]
    device = torch.device(device)
    fmt = memory_format(case.layout, len(case.shape))
    gen = torch.Generator().manual_seed(seed)

    def sample(offset: float) -> Tensor:
        t = torch.randn(case.shape, generator=gen, dtype=torch.float64) + offset
        return t.to(dtype).contiguous(memory_format=fmt)

    training = case.mode == "train"
    zoo = case.build(device).to(dtype)
    frozen = isinstance(zoo, FrozenBatchNorm2d)
    with torch.no_grad():  # a non-trivial affine (and running statistics near the data where they are used)
        for name in ("weight", "bias"):
            p = getattr(zoo, name, None)
            if p is not None:
                r = torch.rand(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(r + 0.5 if name == "weight" else r - 0.5)
        if (not training or frozen) and getattr(zoo, "running_mean", None) is not None:
            c = zoo.running_mean.shape
            zoo.running_mean.copy_(case.offset + torch.randn(c, generator=gen, dtype=torch.float64) * 0.5)
            zoo.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
    zoo.train(training)
    measured, tensors = zoo, None
    if case.user is not None:  # a user's layer (normzoo check): measured in the zoo's place, with its values
        make = case.user.factory()
        measured, tensors, _ = prepare_user(lambda: _on(make(), device), zoo, case.shape, dtype, training)
    theirs = torch_counterpart(zoo, len(case.shape))
    ref = Reference(zoo, dtype)
    bn_train = training and getattr(zoo, "running_mean", None) is not None and not frozen
    steps = [sample(case.offset) for _ in range(WARM_STEPS)] if bn_train else []
    x = sample(case.offset)
    dy = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)

    want = _oracle(ref, steps, x, dy, training, case.second_order)  # on the CPU copies
    steps_d, x_d, dy_d = ([_on(t, device, fmt) for t in steps], _on(x, device, fmt), _on(dy, device, fmt))
    notes = []
    try:
        got_zoo = _run(measured, measured, steps_d, x_d, dy_d, tensors, case.second_order)
    except Exception as err:  # noqa: BLE001 - the sweep reports it as this case's FAIL and goes on
        got_zoo = None
        who = "normzoo" if case.user is None else case.layer
        notes.append(f"{who} raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    try:
        got_torch = _run(theirs, norm_of(theirs), steps_d, x_d, dy_d, second_order=case.second_order)
    except Exception as err:  # noqa: BLE001 - torch lacking a kernel is a finding, not our failure
        got_torch = None
        notes.append(f"torch raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    tol = tolerance(case.tolerance, x)
    magnitude = tol / case.tolerance
    ez, et = _errors(got_zoo, want), _errors(got_torch, want)
    diff = None
    if got_zoo is not None and got_torch is not None:
        diff = worst(rel_err(got_zoo[k], got_torch[k]) for k in want if k in got_zoo and k in got_torch)

    def pick(errs, keys):
        return None if errs is None else worst(errs.get(k) for k in keys)

    grad_keys = [k for k in want if k.startswith("d") and k != "d2x"]
    stat_keys = [k for k in want if k.startswith("running")]
    zoo_ok = ez is not None and all(v is not None and v <= tol for v in ez.values())
    torch_ok = et is None or all(v is not None and v <= tol for v in et.values())
    verdict = FAIL if not zoo_ok else (PASS if torch_ok else TORCH_OFF)
    return {
        "layer": case.layer,
        "family": case.family,
        "type": case.spec_dict["type"],
        "shape": list(case.shape),
        "dtype": case.dtype,
        "layout": case.layout,
        "offset": case.offset,
        "mode": case.mode,
        "compiled": case.compiled,
        "tolerance": tol,
        "magnitude": magnitude,
        "err_zoo": pick(ez, ["y"]),
        "err_torch": pick(et, ["y"]),
        "grad_err_zoo": pick(ez, grad_keys),
        "grad_err_torch": pick(et, grad_keys),
        "second_err_zoo": pick(ez, ["d2x"]) if case.second_order else None,
        "second_err_torch": pick(et, ["d2x"]) if case.second_order else None,
        "stats_err_zoo": pick(ez, stat_keys) if stat_keys else None,
        "stats_err_torch": pick(et, stat_keys) if stat_keys else None,
        "diff_zoo_torch": diff,
        "errors": {"zoo": ez, "torch": et},
        "verdict": verdict,
        "note": "; ".join(notes) or None,
    }


def _on(t, device: torch.device, fmt=None):
    """t on `device` (a tensor keeps its memory format; a user's module is moved); the object itself on the CPU."""
    if device.type == "cpu" or t is None:
        return t
    if isinstance(t, Tensor):
        out = t.to(device)
        return out if fmt is None else out.contiguous(memory_format=fmt)
    return t.to(device) if isinstance(t, torch.nn.Module) else t


def build_report(sweep: Sweep, results: list[dict], interrupted: bool = False, env: dict | None = None) -> dict:
    counts = {v: sum(r["verdict"] == v for r in results) for v in (PASS, FAIL, TORCH_OFF)}
    return {
        "kind": "equivalence",
        "source": sweep.source,
        "environment": env or rp.environment(),
        "summary": {"cases": len(results), "pass": counts[PASS], "fail": counts[FAIL],
                    "torch_off": counts[TORCH_OFF]},
        "tolerance": TOLERANCE_RULE,
        "notes": list(sweep.notes) + [f"{r['layer']} {format_shape(r['shape'])} {r['dtype']}: {r['note']}"
                                      for r in results if r.get("note")],
        "cases": results,
    }


def _offset(v: float) -> str:
    return "0" if v == 0 else rp.sci(v).replace(".0", "").replace("e+", "e")


COLUMNS = [
    rp.Column("layer", lambda c: c["layer"][:14]),
    rp.Column("shape", lambda c: format_shape(c["shape"])),
    rp.Column("dtype", lambda c: rp.short_dtype(c["dtype"])),
    rp.Column("lay", lambda c: "cl" if c["layout"] == "channels_last" else "c"),
    rp.Column("off", lambda c: _offset(c["offset"]), "right"),
    rp.Column("mode", lambda c: c["mode"]),
    rp.Column("comp", lambda c: "yes" if c["compiled"] else "no"),
    rp.Column("out\nzoo", lambda c: rp.sci(c["err_zoo"]), "right"),
    rp.Column("out\ntorch", lambda c: rp.sci(c["err_torch"]), "right"),
    rp.Column("grad\nzoo", lambda c: rp.sci(c["grad_err_zoo"]), "right"),
    rp.Column("grad\ntorch", lambda c: rp.sci(c["grad_err_torch"]), "right"),
    rp.Column("2nd\nzoo", lambda c: rp.sci(c.get("second_err_zoo")), "right"),
    rp.Column("2nd\ntorch", lambda c: rp.sci(c.get("second_err_torch")), "right"),
    rp.Column("stats\nzoo", lambda c: rp.sci(c["stats_err_zoo"]), "right"),
    rp.Column("stats\ntorch", lambda c: rp.sci(c["stats_err_torch"]), "right"),
    rp.Column("tol", lambda c: rp.sci(c["tolerance"]), "right"),
    rp.Column("verdict", lambda c: c["verdict"]),
]


def label(case: Case) -> str:
    return (f"{case.layer} {format_shape(case.shape)} {case.dtype} {case.layout} off={case.offset:g} "
            f"{case.mode} {'compiled' if case.compiled else 'eager'}")


def run(sweep: Sweep, on_update=lambda report: None, progress: rp.Progress | None = None,
        device: str = "cpu") -> tuple[dict, bool]:
    """Run every case on `device` (cpu or cuda; see grid.check_device); returns (report, interrupted)."""
    policy.sync_by_default()
    env = rp.environment(device)  # once, at the start: the date and load the sweep began with
    return rp.drive(sweep.cases, lambda case: run_case(case, device=device),
                    lambda res, intr: build_report(sweep, res, intr, env), on_update, label=label, progress=progress)


def exit_status(report: dict) -> int:
    return 1 if report["summary"]["fail"] else 0
