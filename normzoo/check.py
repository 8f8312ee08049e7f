"""normzoo.check: is my norm right? Your own layer against the float64 oracle of the norm it is meant to be.

`check(layer, like)` runs `layer` (an nn.Module instance, a class with its constructor arguments, or a function of
x) on a small grid: float32 and float64, input means 0, 1e2 and 1e3 (standard deviation 1), batch 1 and a larger
batch, train and eval, each point a fresh layer called twice on the same input. Each output, the input gradient
and the affine gradients (for a fixed random upstream gradient) are compared with the float64 oracle of `like`
(normzoo/sweeps/oracle.py), and the same input goes through torch.nn's layer for its error next to yours.
Before that the layer's affine parameters get non-trivial values: by name (weight/gamma/scale, bias/beta/shift;
running_mean/running_var for BatchNorm), otherwise by shape in registration order.

Where the layer is off, the diagnosis recomputes the oracle with the usual mistakes (exactly, in float64) and
names those that explain the difference, with their errors: unbiased variance, eps outside the sqrt or another
eps, statistics over the wrong axes, a per-element affine, BatchNorm's batch statistics in eval; and, by
measurement, state carried between calls, train and eval that differ, an input modified in place, E[x^2] - E[x]^2
cancellation and low-precision arithmetic. A layer that is right gets PASS with its error next to torch's; a
difference nothing explains is reported as such, with numbers.

This module runs the grid and is the public entry (`normzoo check`, `normzoo.check`); the parts live in
- normzoo/user_layer.py: loading a user's file and class (`load_target` runs its code: once per process, when asked,
  never on import of normzoo), constructor arguments, fresh instances, the first call (`probe`);
- normzoo/binding.py: which of its tensors plays weight, bias and the running statistics, and the oracle's values
  copied into them;
- normzoo/diagnosis.py: the mistakes as variants of the oracle (`Variant`, `variant_forward`) and the diagnosis;
- normzoo/check_report.py: the rows of the grid and the CheckReport.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn

from . import registry
from .accuracy import default_tolerance, rel_err, rel_err_reshaped as _err, tolerance, worst as _max
from .binding import BIAS_NAMES, WEIGHT_NAMES, bind, element_values, load_user, prepare_user, prepare_zoo, tensor_at
from .check_report import DTYPES, ERROR, FAIL, MEANS, MODES, PASS, CheckReport, Row
from .diagnosis import Variant, diagnose, variant_forward
from .families import Geometry, family_of, fix_type, geometry
from .sweeps import oracle
from .user_layer import (CheckError, UserLayer, call_text, first_line, layer_factory, layer_name, load_target,
                         parse_init, parse_shape, probe)

_geometry = geometry  # the name tests/test_check.py uses, from before the split


def _state(module) -> dict[str, Tensor]:
    """Every tensor the layer holds: registered ones and plain tensor attributes."""
    if not isinstance(module, nn.Module):
        return {}
    out = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, Tensor)}
    for prefix, m in module.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, Tensor) and not k.startswith("_"):
                out[f"{prefix}.{k}" if prefix else k] = v.detach().clone()
    return out


def _changed(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[str]:
    return [k for k in after if k not in before or before[k].shape != after[k].shape
            or not torch.equal(before[k], after[k])]


def _call(layer, x: Tensor, dy: Tensor | None, tensors: dict[str, Tensor]) -> dict:
    """One call on a copy of x (its gradient flows to x); grads of x and of the affine tensors when dy is given."""
    xr = x.clone().requires_grad_(dy is not None)
    x_in = xr.clone()
    y = layer(x_in)
    if not isinstance(y, Tensor):
        raise CheckError(f"the layer returned {type(y).__name__}, not a tensor")
    if y.shape != x.shape:
        raise CheckError(f"the layer changes the shape: input {list(x.shape)}, output {list(y.shape)}")
    out = {"y": y.detach().clone(), "modified": not torch.equal(x_in.detach(), x), "ydtype": y.dtype}
    if dy is not None and y.requires_grad:
        names = [r for r in ("weight", "bias") if r in tensors and tensors[r].requires_grad]
        targets = [xr] + [tensors[r] for r in names]
        grads = torch.autograd.grad(y, targets, dy.to(y.dtype), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        out["dx"] = grads[0]
        out.update({f"d{r}": g for r, g in zip(names, grads[1:])})
    elif dy is not None:
        out["no_grad"] = True
    return out


def _grads_want(ref: oracle.Reference, x: Tensor, dy: Tensor, training: bool, roles: list[str]) -> dict:
    x64 = x.detach().to(torch.float64).requires_grad_(True)
    y = ref.forward(x64, training)
    params = [getattr(ref, r) for r in roles]
    grads = torch.autograd.grad(y, [x64] + params, dy.to(torch.float64))
    out = {"y": y.detach(), "dx": grads[0]}
    out.update({f"d{r}": g for r, g in zip(roles, grads[1:])})
    out["y2"] = ref.forward(x.detach().to(torch.float64), training).detach()
    if training and ref.running_mean is not None:
        out["running_mean"], out["running_var"] = ref.running_mean.clone(), ref.running_var.clone()
    return out


def check(layer, like, *, args: tuple = (), kwargs: dict | None = None, shape: tuple[int, ...] | None = None,
          seed: int = 0, name: str | None = None) -> CheckReport:
    """Check `layer` against the float64 oracle of `like` (a preset name or spec); returns a CheckReport.

    layer: an nn.Module instance (deep-copied for every grid point), a class (built with args and kwargs for every
    grid point), or a function of x. shape: the input (N, C, *spatial), or (N, ..., D) for a layer norm; by default
    (4, C, 8, 8) (or (4, 5, D)) with C (D) read from the layer's num_channels/num_features/normalized_shape or its
    affine parameters. Raises CheckError for bad input (a constructor that raises, a layer that changes the shape).
    """
    try:
        spec = registry.resolve_spec(like)
    except registry.PresetError as err:
        raise CheckError(f"like {like!r}: {err}") from None
    make = layer_factory(layer, tuple(args), kwargs)
    sample = make()
    label = name or (call_text(layer, tuple(args), kwargs or {}) if isinstance(layer, type) else layer_name(layer))
    fam0 = family_of(spec["type"])
    shape = tuple(shape) if shape is not None else _default_shape(sample, fam0)
    spec = fix_type(spec, len(shape))
    family = family_of(spec["type"])
    nf = shape[-1] if family == "layer_norm" else shape[1]
    zoo = _build_like(spec, nf, like)
    probe(sample, shape, label)
    geo = geometry(zoo, shape, family)
    bound, notes = bind(sample, zoo, geo)
    prepare_zoo(zoo, bound)
    elem = element_values(bound, seed)
    roles = [r for r in ("weight", "bias") if r in bound and tensor_at(sample, bound[r].name).requires_grad]
    for r in ("weight", "bias"):
        p = getattr(zoo, r, None)
        if p is not None and r not in roles:
            p.requires_grad_(False)
    is_module = isinstance(sample, nn.Module)
    modes = MODES if is_module else ("train",)
    batches = tuple(dict.fromkeys((1, shape[0])))
    rows: list[Row] = []
    for dname, mean, batch in itertools.product(DTYPES, MEANS, batches):
        dtype = getattr(torch, dname)
        gen = torch.Generator().manual_seed(seed * 1000 + len(rows))
        xshape = (batch,) + shape[1:]
        x64 = torch.randn(xshape, generator=gen, dtype=torch.float64) + mean
        dy = torch.randn(xshape, generator=gen, dtype=torch.float64).to(dtype)
        x = x64.to(dtype)
        rm = (mean + torch.randn(nf, generator=gen, dtype=torch.float64) * 0.5, 0.5 + torch.rand(nf, generator=gen,
              dtype=torch.float64))
        for mode in modes:
            rows.append(_run_row(make, zoo, geo, bound, elem, roles, dname, mean, batch, mode, x, dy, rm,
                                 is_module))
    return _report(label, like, spec, geo, rows, bound, notes, roles, sample, zoo)


def _default_shape(sample, family: str) -> tuple[int, ...]:
    nf, spatial = None, (8, 8)
    for attr in ("num_channels", "num_features", "channels", "normalized_shape"):
        v = getattr(sample, attr, None)
        if isinstance(v, int) and v > 0:
            nf = v
            break
        if isinstance(v, (tuple, list, torch.Size)) and v and all(isinstance(s, int) for s in v):
            nf = v[-1] if family == "layer_norm" else v[0]
            if family != "layer_norm" and len(v) > 1:
                spatial = tuple(v[1:])
            break
    if nf is None and isinstance(sample, nn.Module):
        for pname, p in sample.named_parameters():
            if pname.rsplit(".", 1)[-1] in WEIGHT_NAMES + BIAS_NAMES and p.dim() >= 1:
                nf = p.shape[-1] if family == "layer_norm" else p.shape[0]
                if family != "layer_norm" and p.dim() > 1 and any(s > 1 for s in p.shape[1:]):
                    spatial = tuple(p.shape[1:])  # a per-element affine fixes the spatial size
                break
    if nf is None:
        raise CheckError("cannot tell the layer's number of channels (no num_channels, num_features or "
                         "normalized_shape attribute, no affine parameters): pass shape=(N, C, H, W) (--shape)")
    return (4, 5, nf) if family == "layer_norm" else (4, nf) + spatial


def _build_like(spec: dict, nf: int, like) -> nn.Module:
    """The `like` layer in float64 with an affine (so the user's affine always has a counterpart), non-trivial."""
    forced = {"group_norm": {"affine": True}, "layer_norm": {"elementwise_affine": True, "bias": True}}
    fam = family_of(spec["type"])
    extra = forced.get(fam, {"affine": True} if spec["type"] != "frozen_batch_norm" else {})
    try:
        zoo = registry.build(spec, nf, compile=False, **extra).double()
    except Exception as err:  # noqa: BLE001 - a spec that cannot take this shape is bad input
        raise CheckError(f"like {like!r} cannot take {nf} features: {first_line(err)}") from None
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for role in ("weight", "bias"):
            p = getattr(zoo, role, None)
            if p is not None:
                r = torch.rand(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(r + 0.5 if role == "weight" else r - 0.5)
    return zoo


def _run_row(make, zoo0, geo, bound, elem, roles, dname, mean, batch, mode, x, dy, rm, is_module) -> Row:
    dtype = getattr(torch, dname)
    training = mode == "train"
    zoo = copy.deepcopy(zoo0)
    if getattr(zoo, "running_mean", None) is not None and not training:
        with torch.no_grad():
            zoo.running_mean.copy_(rm[0])
            zoo.running_var.copy_(rm[1])
    zoo.train(training)
    running = (zoo.running_mean.clone(), zoo.running_var.clone()) if getattr(zoo, "running_mean", None) is not None \
        else None
    ref = oracle.Reference(zoo)
    want = _grads_want(ref, x, dy, training, roles)
    row = Row(dname, mean, batch, mode, x, dy, tolerance(default_tolerance(dname), x),
               zoo.weight.detach().clone() if getattr(zoo, "weight", None) is not None else None,
               zoo.bias.detach().clone() if getattr(zoo, "bias", None) is not None else None,
               elem.get("weight"), elem.get("bias"), running, want)
    # torch.nn's layer on the same input
    theirs = oracle.torch_counterpart(copy.deepcopy(zoo).to(dtype), x.dim())
    tn = oracle.norm_of(theirs)
    try:
        row.torch_got = _call(theirs, x, dy, {r: getattr(tn, r) for r in roles})
    except Exception:  # noqa: BLE001 - torch lacking a kernel is not the user's problem
        row.torch_got = None
    # the user's layer: fresh, the oracle's values, this dtype and mode; called twice on the same input
    user = make()
    if is_module:
        user = user.to(dtype)
        user.train(training)
    tensors = load_user(user, zoo, bound, elem) if is_module else {}
    before = _state(user)
    try:
        row.got = _call(user, x, dy, tensors)
        middle = _state(user)
        row.got2 = _call(user, x, None, tensors)
        after = _state(user)
        row.changed = list(dict.fromkeys(_changed(before, middle) + _changed(middle, after)))
        for buf in ("running_mean", "running_var"):
            if buf in tensors and training:
                row.got2[buf] = tensors[buf].detach().clone()
    except CheckError:
        raise
    except Exception as err:  # noqa: BLE001 - reported as this row's ERROR
        row.error = first_line(err)
    return row


def _report(label, like, spec, geo: Geometry, rows: list[Row], bound, notes, roles, sample, zoo) -> CheckReport:
    ok_rows = [r for r in rows if r.error is None]
    if not ok_rows:
        raise CheckError(f"{label} raised on every input: {rows[0].error}")
    for r in rows:
        res = {"dtype": r.dtype, "mean": r.mean, "batch": r.batch, "mode": r.mode, "tolerance": r.tol}
        if r.error is None:
            want = r.want
            res["out"] = _err(r.got["y"], want["y"])
            res["out2"] = _err(r.got2["y"], want["y2"])
            res["grad"] = _max(_err(r.got.get(k), want[k]) for k in ("dx", "dweight", "dbias") if k in want)
            res["stats"] = _max(_err(r.got2.get(k), want[k]) for k in ("running_mean", "running_var") if k in want)
            res["same_twice"] = rel_err(r.got2["y"], r.got["y"])
            t = r.torch_got
            res["torch_out"] = _err(t["y"], want["y"]) if t else None
            res["torch_grad"] = _max(_err(t.get(k), want[k]) for k in ("dx", "dweight", "dbias")
                                     if k in want) if t else None
            vals = [res["out"], res["out2"], res["grad"], res["stats"]]
            res["verdict"] = PASS if all(v is None or v <= r.tol for v in vals) else FAIL
            res["note"] = None
        else:
            res.update(out=None, out2=None, grad=None, stats=None, torch_out=None, torch_grad=None, same_twice=None,
                       verdict=ERROR, note=r.error)
        r.result = res
    verdict = PASS if all(r.result["verdict"] == PASS for r in rows) else FAIL
    how = [f"{b.name} {list(b.shape)} -> {r} ({b.how}{', per element' if b.per_element else ''})"
           for r, b in bound.items()]
    if isinstance(sample, nn.Module):
        notes = ([f"parameters set: {'; '.join(how)}"] if how else
                 ["no affine parameters found on the layer: compared with weight 1 and bias 0"]) + notes
    diagnosis = diagnose(geo, rows, bound, roles, sample, zoo, verdict)
    return CheckReport(label, like if isinstance(like, str) else str(like), geo.title, geo.shape, verdict,
                       [r.result for r in rows], diagnosis, notes)


__all__ = ["check", "CheckReport", "CheckError", "load_target", "parse_init", "parse_shape", "UserLayer",
           "Variant", "variant_forward", "prepare_user", "probe"]
