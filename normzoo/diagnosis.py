"""The usual mistakes as variants of the float64 oracle, and the diagnosis of a check: which of them explain where a
user's layer is off.

A Variant is the family's math with mistakes (every field left at None/False is the family's own math; Variant() is
the oracle itself); `variant_forward` computes it exactly, in float64. The diagnosis tries every variant with one or
two mistakes that applies to the family and shape, and names those that explain the difference, with their errors:

- unbiased variance (n - 1); eps added to the std instead of inside the sqrt; another eps;
- statistics over the wrong axes: per channel instead of per group, over the batch, one group, groups made of
  every G-th channel, another number of groups; LayerNorm([C, H, W]) (a per-element affine) instead of
  GroupNorm(1, C);
- BatchNorm: eval with the batch's statistics;

and, by measurement: state carried between calls (the same input twice gives two outputs), train and eval that
differ, an input modified in place, E[x^2] - E[x]^2 cancellation (the error grows with the mean, as the unshifted
formula's does) and low-precision arithmetic (errors at the rounding level of a narrower dtype, simulated). A layer
that is right gets PASS with its error next to torch's; a difference nothing explains is reported as such, with
numbers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .accuracy import rel_err, rel_err_reshaped as _err, worst as _max
from .check_report import DTYPES, PASS, Row, mean_label as _mean
from .families import Geometry
from .sweeps import oracle
from .sweeps import report as rp

EXPLAINS = 10.0  # a variant explains a row when it brings the error under the tolerance or 10x down
BAND = 10.0  # a rounding simulation explains an error within 10x of its own (rounding orders differ)


@dataclass(frozen=True)
class Variant:
    """The oracle with mistakes; every field left at None/False is the family's own math."""

    groups: int | None = None  # channel families: statistics per this many groups
    over_batch: bool | None = None  # statistics taken over the batch too
    interleaved: bool = False  # group g = channels g, g + G, g + 2G, ... (reshape to (N, C/G, G, ...))
    ln_dims: str | None = None  # layer norm: "sample" (all dims but the batch) or "batch" (per feature)
    unbiased: bool = False
    eps_outside: bool = False
    per_element: bool = False  # the affine per element of (C, *spatial)
    eps: float | None = None
    eval_batch_stats: bool = False  # BatchNorm eval with the batch's statistics

    def mistakes(self, geo: Geometry) -> list[tuple[str, str]]:
        """(what it does, what the family does) for each mistake: plain words for the report."""
        out = []
        c, g = geo.channels, geo.groups
        fam = geo.title.split("(")[0]
        if self.groups is not None:
            own = "per channel" if g == c else f"per group of {c // g} channels"
            if self.groups == c:
                out.append(("statistics per channel", f"{fam}'s are {own}"))
            elif self.groups == 1:
                out.append(("statistics over all channels (one group)", f"{fam}'s are {own}"))
            else:
                out.append((f"num_groups={self.groups}", f"{fam}'s statistics are {own}"))
        if self.over_batch is not None:
            out.append(("statistics over the whole batch", f"{fam}'s are per sample") if self.over_batch
                       else ("statistics per sample", f"{fam}'s are over the batch"))
        if self.interleaved:
            out.append(("groups of every G-th channel (a reshape to (N, C/G, G, ...))",
                        f"{fam}'s groups are {c // g} consecutive channels (a reshape to (N, G, C/G, ...))"))
        if self.ln_dims == "sample":
            out.append(("statistics over every dim but the batch", f"{fam}'s are over the last {geo.k} dim(s)"))
        elif self.ln_dims == "batch":
            out.append(("statistics per feature over the batch", f"{fam}'s are per row, over the features"))
        if self.unbiased:
            out.append(("the unbiased variance (divide by n-1)",
                        "torch and the paper use the biased one (divide by n)"))
        if self.eps_outside:
            out.append(("eps added to the std, (x - mean) / (sqrt(var) + eps)",
                        "torch and the paper use (x - mean) / sqrt(var + eps)"))
        if self.per_element:
            per_ch = f"per channel ({c},)"
            if g == 1 and not geo.over_batch and geo.family == "group_norm":
                out.append(("a per-element affine, as LayerNorm([C, H, W]) has",
                            f"the statistics agree, but GroupNorm(1, C)'s affine is {per_ch}"))
            else:
                out.append(("an affine per element", f"the affine is {per_ch}"))
        if self.eps is not None:
            out.append((f"eps={self.eps:g}", f"{geo.title}'s eps is {geo.eps:g}"))
        if self.eval_batch_stats:
            out.append(("the batch's statistics in eval", "eval normalizes with the running statistics"))
        return out

    def count(self, geo: Geometry) -> int:
        return len(self.mistakes(geo))


def _view(geo: Geometry, v: Variant, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(view shape, reduced dims) of the statistics for x of `shape` under variant v."""
    if geo.family == "layer_norm":
        nd, k = len(shape), geo.k
        dims = {None: range(nd - k, nd), "sample": range(1, nd), "batch": range(0, nd - k)}[v.ln_dims]
        return tuple(shape), tuple(dims)
    n, c = shape[0], shape[1]
    g = v.groups if v.groups is not None else geo.groups
    over_batch = v.over_batch if v.over_batch is not None else geo.over_batch
    if v.interleaved:
        return (n, c // g, g, -1), ((0,) if over_batch else ()) + (1, 3)
    return (n, g, -1), ((0,) if over_batch else ()) + (2,)


def _affine_view(geo: Geometry, t: Tensor | None, shape, per_element: bool) -> Tensor | None:
    if t is None:
        return None
    if geo.family == "layer_norm":
        return t.reshape(geo.affine_shape)
    if per_element:
        return t.reshape((1,) + tuple(shape[1:]))
    return t.reshape((1, shape[1]) + (1,) * (len(shape) - 2))


def _apply(y: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
    """The affine with w and b already in y's broadcast shape (None: absent)."""
    if w is not None:
        y = y * w
    return y if b is None else y + b


def variant_forward(geo: Geometry, v: Variant, x: Tensor, w: Tensor | None, b: Tensor | None, training: bool,
                    running: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The family's float64 math with the mistakes of v (Variant() is the oracle itself)."""
    eps = geo.eps if v.eps is None else v.eps
    shape = tuple(x.shape)
    if geo.family == "batch_norm" and running is not None and not training and not v.eval_batch_stats:
        cshape = (1, shape[1]) + (1,) * (len(shape) - 2)
        rm, rv = running[0].reshape(cshape), running[1].reshape(cshape)
        y = (x - rm) / (torch.sqrt(rv) + eps if v.eps_outside else torch.sqrt(rv + eps))
    else:
        view, dims = _view(geo, v, shape)
        y, _, _ = oracle._normalize(x.reshape(view), dims, eps, unbiased=v.unbiased, eps_outside=v.eps_outside)
        y = y.reshape(shape)
    y = _apply(y, _affine_view(geo, w, shape, v.per_element), _affine_view(geo, b, shape, v.per_element))
    if geo.activation is not None:
        y = oracle._F64_ACTIVATIONS[geo.activation](y)
    return y


def _variants(geo: Geometry, user_groups: int | None, user_eps: float | None, per_element: bool,
              batch: int) -> list[Variant]:
    """Every variant with one or two mistakes that applies to this family and shape (cheapest first)."""
    c, g = geo.channels, geo.groups
    axes: list[dict] = []
    if geo.family == "layer_norm":
        if len(geo.shape) > geo.k + 1:
            axes.append({"ln_dims": "sample"})
        if batch > 1:
            axes.append({"ln_dims": "batch"})
    else:
        others = [d for d in range(1, c + 1) if c % d == 0] if geo.family == "group_norm" else [1]
        for g2 in dict.fromkeys([c, 1, user_groups or g] + others):
            if g2 != g and c % g2 == 0:
                axes.append({"groups": g2})
        if batch > 1:
            axes.append({"over_batch": not geo.over_batch})
        if 1 < g < c:
            axes.append({"interleaved": True})
    flags: list[dict] = [{"unbiased": True}, {"eps_outside": True}]
    if per_element:
        flags.append({"per_element": True})
    if user_eps is not None and not math.isclose(user_eps, geo.eps):
        flags.append({"eps": user_eps})
    if geo.family == "batch_norm":
        flags.append({"eval_batch_stats": True})
    singles = axes + flags
    out = [Variant(**s) for s in singles]
    for a, b in itertools.combinations(singles, 2):
        if set(a) & set(b) or (a in axes and b in axes):
            continue
        out.append(Variant(**a, **b))
    return out


def variant_result(geo: Geometry, v: Variant, row: Row, roles: list[str], elem_roles: set[str]) -> dict:
    x64 = row.x.to(torch.float64).requires_grad_(True)
    w = row.w_elem if (v.per_element and "weight" in elem_roles) else row.w
    b = row.b_elem if (v.per_element and "bias" in elem_roles) else row.b
    leaves = {}
    if "weight" in roles and w is not None:
        w = leaves.setdefault("weight", w.detach().clone().requires_grad_(True))
    if "bias" in roles and b is not None:
        b = leaves.setdefault("bias", b.detach().clone().requires_grad_(True))
    y = variant_forward(geo, v, x64, w, b, row.training, row.running)
    grads = torch.autograd.grad(y, [x64] + list(leaves.values()), row.dy.to(torch.float64))
    out = {"y": y.detach(), "dx": grads[0]}
    out.update({f"d{r}": g for r, g in zip(leaves, grads[1:])})
    return out


def _row_err(got: dict, want: dict) -> float | None:
    return _max(_err(got.get(k), want.get(k)) for k in ("y", "dx", "dweight", "dbias") if k in want)


def rows_text(rows: list[Row]) -> str:
    """A compact description of a set of rows: 'f64 at means 0, 1e2; f32 at mean 0'."""
    by = {}
    for r in rows:
        by.setdefault(r.dtype, []).append(r.mean)
    parts = []
    for d in DTYPES[::-1]:
        if d in by:
            ms = sorted(set(by[d]))
            parts.append(f"{d} at mean{'s' if len(ms) > 1 else ''} {', '.join(_mean(m) for m in ms)}")
    return "; ".join(parts)


def diagnose(geo: Geometry, rows: list[Row], bound, roles, sample, zoo, verdict: str) -> list[str]:
    ok_rows = [r for r in rows if r.error is None]
    out: list[str] = []
    errs = [r for r in rows if r.error is not None]
    if errs:
        out.append(f"raised on {len(errs)} of {len(rows)} inputs ({rows_text(errs)}): {errs[0].error}")
    if verdict == PASS:
        parts = []
        for d in DTYPES:
            dr = [r for r in ok_rows if r.dtype == d]
            z = [r for r in dr if r.mean == 0]

            def most(key, rs):
                return rp.sci(_max(r.result[key] for r in rs))
            parts.append(f"{d}: output {most('out', z)} at mean 0, at most {most('out', dr)} (torch.nn "
                         f"{most('torch_out', z)}, {most('torch_out', dr)}); gradients at most {most('grad', dr)} "
                         f"(torch.nn {most('torch_grad', dr)})")
        out.append(f"PASS: matches {geo.title} within tolerance on all {len(rows)} inputs. " + "; ".join(parts))
        return out
    out.append(f"FAIL: differs from {geo.title} on {sum(r.result['verdict'] != PASS for r in rows)} of "
               f"{len(rows)} inputs")
    # state carried between calls
    stateful = [r for r in ok_rows if r.result["same_twice"] is not None and r.result["same_twice"] > r.tol]
    if stateful:
        w = max(stateful, key=lambda r: r.result["same_twice"])
        changed = sorted({c for r in stateful for c in r.changed})
        what = (f"; {', '.join(changed)} changed between the calls" if changed else "")
        keeps = ("its output depends on the input alone" if geo.family != "batch_norm" else
                 "in train mode its output depends on the batch alone")
        out.append(f"state carried between calls: the same input twice in a row gave outputs "
                   f"{rp.sci(w.result['same_twice'])} apart ({w.label()}; {len(stateful)} of {len(ok_rows)} "
                   f"inputs){what}. {geo.title.split('(')[0]} keeps no state that way: {keeps}")
    # train and eval differ where the family computes the same in both
    if geo.family != "batch_norm" and isinstance(sample, nn.Module):
        pairs = {}
        for r in ok_rows:
            pairs.setdefault((r.dtype, r.mean, r.batch), {})[r.mode] = r
        diffs = [(rel_err(p["eval"].got["y"], p["train"].got["y"]), p["train"]) for p in pairs.values()
                 if "train" in p and "eval" in p]
        diffs = [(d, r) for d, r in diffs if d > r.tol]
        if diffs:
            d, r = max(diffs, key=lambda t: t[0])
            out.append(f"train and eval differ: the same input gave outputs {rp.sci(d)} apart in train and eval "
                       f"({r.label().replace(' train', '')}); {geo.title.split('(')[0]} computes the same "
                       f"statistics in both modes")
    modified = [r for r in ok_rows if r.got["modified"]]
    if modified:
        out.append(f"the layer modifies its input in place ({len(modified)} of {len(ok_rows)} inputs)")
    nograd = [r for r in ok_rows if r.got.get("no_grad")]
    if nograd:
        out.append("the output has no gradient (the layer detaches it): no gradients compared")
    # first-call differences: formulas, then rounding
    fail1 = [r for r in ok_rows if _row_err(r.got, r.want) is not None and _row_err(r.got, r.want) > r.tol]
    if not fail1:
        stats = [r for r in ok_rows if r.result["stats"] is not None and r.result["stats"] > r.tol]
        if stats:
            w = max(stats, key=lambda r: r.result["stats"])
            m, zm = getattr(sample, "momentum", "?"), getattr(zoo, "momentum", "?")
            why = f" (this layer's momentum is {m}, {geo.title}'s {zm})" if m != zm else ""
            out.append(f"running statistics: every output matches, but running_mean/running_var after two training "
                       f"calls are {rp.sci(w.result['stats'])} off ({w.label()}){why}; running_var holds the "
                       f"unbiased variance, updated as (1 - momentum) * running + momentum * batch")
        elif not stateful and not errs:
            out.append("the first call matches on every input; the difference is in the second call")
        return out
    base = {id(r): _row_err(r.got, r.want) for r in ok_rows}
    remaining, explained_by = list(fail1), {id(r): base[id(r)] for r in ok_rows}
    residual_y = {id(r): _err(r.got["y"], r.want["y"]) for r in ok_rows}  # output only, for the rounding tests
    best = _best_variant(geo, ok_rows, fail1, base, bound, roles, sample)
    if best is not None:
        v, errs, covered, residual_y = best
        ms = v.mistakes(geo)
        what = " and ".join(m[0] for m in ms)
        why = "; ".join(m[1] for m in ms)
        fam = geo.title
        if len(covered) == len(fail1) and all(errs[id(r)] <= r.tol for r in ok_rows):
            out.append(f"{_heading(ms)}: matches {fam} with {what} to {_to(errs, ok_rows)}; {why}")
        else:
            e0 = _max(base[id(r)] for r in covered)
            out.append(f"{_heading(ms)}: on {len(covered)} of {len(fail1)} differing inputs ({rows_text(covered)}) "
                       f"this layer matches {fam} with {what} to {_to(errs, covered)}, where it is {rp.sci(e0)} from "
                       f"the right one; {why}")
        explained_by = errs
        ids = {id(r) for r in covered}
        remaining = [r for r in fail1 if id(r) not in ids]
    if remaining:
        for line, covered in _rounding(geo, ok_rows, remaining, residual_y):
            out.append(line)
            ids = {id(r) for r in covered}
            remaining = [r for r in remaining if id(r) not in ids]
    if remaining:
        w = max(remaining, key=lambda r: explained_by[id(r)] / r.tol)
        also = ""
        if stateful and any(r in stateful for r in remaining):
            also = "; these inputs also change between calls (state, above)"
        out.append(f"not explained by any known variant on {len(remaining)} of {len(fail1)} differing inputs "
                   f"({rows_text(remaining)}): worst {w.label()}, error {rp.sci(explained_by[id(w)])} "
                   f"(output {rp.sci(w.result['out'])}, gradients {rp.sci(w.result['grad'])}, tolerance "
                   f"{rp.sci(w.tol)}){also}")
    return out


def _to(errs: dict, rows: list[Row]) -> str:
    """The error of a match, per dtype at the smallest mean of `rows`: '1.2e-7 (float32), 2e-16 (float64)'."""
    parts = []
    for d in DTYPES:
        dr = [r for r in rows if r.dtype == d]
        if dr:
            m = min(r.mean for r in dr)
            parts.append(f"{rp.sci(_max(errs[id(r)] for r in dr if r.mean == m))} ({d}")
            parts[-1] += ")" if m == 0 else f" at mean {_mean(m)})"
    return ", ".join(parts)


def _heading(ms: list[tuple[str, str]]) -> str:
    words = []
    for what, _ in ms:
        if "unbiased" in what:
            words.append("unbiased variance")
        elif "eps added" in what:
            words.append("eps outside the sqrt")
        elif what.startswith("eps="):
            words.append("another eps")
        elif "affine per element" in what:
            words.append("per-element affine")
        elif "eval" in what:
            words.append("batch statistics in eval")
        else:
            words.append("wrong axes")
    return " + ".join(words)


def _best_variant(geo, ok_rows, fail1, base, bound, roles, sample):
    """The variant explaining the most differing inputs (fewest mistakes, then smallest error); None if none."""
    user_groups = getattr(sample, "num_groups", None)
    user_groups = user_groups if isinstance(user_groups, int) and user_groups > 0 else None
    user_eps = getattr(sample, "eps", None)
    user_eps = float(user_eps) if isinstance(user_eps, (int, float)) and not isinstance(user_eps, bool) else None
    elem_roles = {r for r, b in bound.items() if b.per_element}
    best, best_key = None, None
    for v in _variants(geo, user_groups, user_eps, bool(elem_roles), max(r.batch for r in ok_rows)):
        errs, errs_y = {}, {}
        for r in ok_rows:
            try:
                want = variant_result(geo, v, r, roles, elem_roles)
            except RuntimeError:
                errs[id(r)] = errs_y[id(r)] = math.inf
                continue
            errs_y[id(r)] = _err(r.got["y"], want["y"])
            errs[id(r)] = _row_err(r.got, want)
            errs[id(r)] = math.inf if errs[id(r)] is None or math.isnan(errs[id(r)]) else errs[id(r)]
        covered = [r for r in fail1 if errs[id(r)] <= max(r.tol, base[id(r)] / EXPLAINS)]
        passing_ok = all(errs[id(r)] <= EXPLAINS * r.tol for r in ok_rows if r not in fail1)
        if not covered or not passing_ok:
            continue
        full = len(covered) == len(fail1) and all(errs[id(r)] <= r.tol for r in ok_rows)
        score = sum(math.log10(max(errs[id(r)], 1e-300) / r.tol) for r in covered)
        key = (not full, -len(covered), v.count(geo), score)
        if best_key is None or key < best_key:
            best, best_key = (v, errs, covered, errs_y), key
    return best


def _sim(geo: Geometry, row: Row, dtype: torch.dtype, unshifted: bool) -> Tensor | None:
    """The right formula in `dtype` (two passes), or the unshifted one-pass E[x^2] - E[x]^2 in `dtype`."""
    if geo.family == "batch_norm" and not row.training:
        return None
    x = row.x.to(dtype)
    shape = tuple(x.shape)
    view, dims = _view(geo, Variant(), shape)
    xv = x.reshape(view)
    mean = xv.mean(dims, keepdim=True)
    if unshifted:
        var = ((xv * xv).mean(dims, keepdim=True) - mean * mean).clamp_min(0)
    else:
        var = ((xv - mean) ** 2).mean(dims, keepdim=True)
    y = ((xv - mean) / torch.sqrt(var + geo.eps)).reshape(shape)
    w = None if row.w is None else row.w.to(dtype)
    b = None if row.b is None else row.b.to(dtype)
    y = _apply(y, _affine_view(geo, w, shape, False), _affine_view(geo, b, shape, False))
    return y if geo.activation is None else oracle._F64_ACTIVATIONS[geo.activation](y)


def _rounding(geo, ok_rows, remaining, errs) -> list[tuple[str, list[Row]]]:
    """E[x^2] - E[x]^2 cancellation and low-precision arithmetic: error levels that match a simulation's."""
    out = []
    cands = [("cancel", None, None), ("low", "float64", torch.float32), ("low", "float64", torch.bfloat16),
             ("low", "float64", torch.float16), ("low", "float32", torch.bfloat16), ("low", "float32", torch.float16)]
    for kind, dname, sim_dtype in cands:
        rows = [r for r in ok_rows if dname is None or r.dtype == dname]
        sims = {}
        for r in rows:
            y = _sim(geo, r, sim_dtype or getattr(torch, r.dtype), unshifted=(kind == "cancel"))
            if y is not None:
                sims[id(r)] = _err(y, r.want["y"])
        failing = [r for r in rows if id(r) in sims and sims[id(r)] > r.tol]
        if not failing:
            continue
        user = {id(r): errs[id(r)] for r in rows}  # what is left after the formula variant, if one explained
        if not all(sims[id(r)] / BAND <= user[id(r)] <= sims[id(r)] * BAND for r in failing):
            continue
        covered = [r for r in remaining if r in failing]
        if not covered:
            continue
        if kind == "cancel":
            ms = sorted({r.mean for r in rows})
            prof, sprof = [], []
            for d in DTYPES:
                dr = [r for r in rows if r.dtype == d]
                if not any(r in failing for r in dr):
                    continue
                prof.append(f"{d}: " + ", ".join(f"{rp.sci(_max(user[id(r)] for r in dr if r.mean == m))} at mean "
                                                 f"{_mean(m)}" for m in ms))
                sprof.append(", ".join(rp.sci(_max(sims.get(id(r)) for r in dr if r.mean == m)) for m in ms))
            out.append((f"E[x^2] - E[x]^2 cancellation: the output error grows with the input's mean "
                        f"({'; '.join(prof)}), as the unshifted one-pass variance E[x^2] - E[x]^2 in the input's "
                        f"dtype does ({'; '.join(sprof)}); subtract the mean before squaring (two passes), or "
                        f"shift by one element of each group", covered))
        else:
            lo = str(sim_dtype).replace("torch.", "")
            out.append((f"low-precision arithmetic: on {dname} inputs the output errors "
                        f"({rp.sci(min(user[id(r)] for r in failing))} to {rp.sci(max(user[id(r)] for r in failing))})"
                        f" are at {lo}'s rounding level (the same formula computed in {lo}: "
                        f"{rp.sci(min(sims[id(r)] for r in failing))} to {rp.sci(max(sims[id(r)] for r in failing))}"
                        f"); compute and accumulate in {dname} (or wider)", covered))
        remaining = [r for r in remaining if r not in covered]
    return out
