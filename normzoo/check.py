"""normzoo.check: is my norm right? Your own layer against the float64 oracle of the norm it is meant to be.

`check(layer, like)` runs `layer` (an nn.Module instance, a class with its constructor arguments, or a function of
x) on a small grid: float32 and float64, input means 0, 1e2 and 1e3 (standard deviation 1), batch 1 and a larger
batch, train and eval, each point a fresh layer called twice on the same input. Each output, the input gradient
and the affine gradients (for a fixed random upstream gradient) are compared with the float64 oracle of `like`
(normzoo/sweeps/oracle.py), and the same input goes through torch.nn's layer for its error next to yours.
Before that the layer's affine parameters get non-trivial values: by name (weight/gamma/scale, bias/beta/shift;
running_mean/running_var for BatchNorm), otherwise by shape in registration order.

Where the layer is off, the diagnosis recomputes the oracle with the usual mistakes (exactly, in float64) and
names those that explain the difference, with their errors:

- unbiased variance (n - 1); eps added to the std instead of inside the sqrt; another eps;
- statistics over the wrong axes: per channel instead of per group, over the batch, one group, groups made of
  every G-th channel, another number of groups; LayerNorm([C, H, W]) (a per-element affine) instead of
  GroupNorm(1, C);
- BatchNorm: eval with the batch's statistics;

and, by measurement: state carried between calls (the same input twice gives two outputs), train and eval that
differ, an input modified in place, E[x^2] - E[x]^2 cancellation (the error grows with the mean, as the unshifted
formula's does) and low-precision arithmetic (errors at the rounding level of a narrower dtype). A layer that is
right gets PASS with its error next to torch's; a difference nothing explains is reported as such, with numbers.

Loading a user's file (`load_target`) runs its code: once per process, when asked, never on import of normzoo.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import itertools
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import registry
from .sweeps import oracle
from .sweeps import report as rp
from .sweeps.equivalence import rel_err, tolerance
from .sweeps.grid import _fix_type, default_tolerance, family_of, format_shape

DTYPES = ("float32", "float64")
MEANS = (0.0, 1e2, 1e3)
MODES = ("train", "eval")
PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"
EXPLAINS = 10.0  # a variant explains a row when it brings the error under the tolerance or 10x down
BAND = 10.0  # a rounding simulation explains an error within 10x of its own (rounding orders differ)
WEIGHT_NAMES = ("weight", "gamma", "scale", "g", "w")
BIAS_NAMES = ("bias", "beta", "shift", "b")


class CheckError(ValueError):
    """Bad input to check: a missing file or class, a constructor that raises, a layer that changes the shape."""


# ---------------------------------------------------------------------------------------------------------------
# Loading a user's layer: path/to/file.py:ClassName or package.module:ClassName


_LOADED: dict[str, Any] = {}  # resolved file path -> module: each file runs once per process


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_target(target: str, base: str | Path | None = None) -> Any:
    """The class (or function) `target` names. A relative file path is taken from `base` (default: the cwd).

    Loading a file runs its code (once per process: later calls reuse the module).
    """
    where, sep, name = target.rpartition(":")
    if not sep or not where or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
        raise CheckError(f"target {target!r}: give path/to/file.py:ClassName or package.module:ClassName")
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = Path(where).expanduser()
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        if not path.is_file():
            raise CheckError(f"{where}: no such file" + (f" (looked in {path.parent})" if base is not None else ""))
        key = str(path.resolve())
        if key not in _LOADED:
            modname = "normzoo_user." + re.sub(r"\W", "_", path.stem) + f"_{len(_LOADED)}"
            spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            sys.path.insert(0, str(path.parent))  # its own imports of sibling files, while it loads
            try:
                spec.loader.exec_module(module)
            except Exception as err:  # noqa: BLE001 - any failure of the user's file is bad input, named
                del sys.modules[modname]
                raise CheckError(f"{where}: loading it raised {_first_line(err)}") from err
            finally:
                sys.path.remove(str(path.parent))
            _LOADED[key] = module
        module = _LOADED[key]
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise CheckError(f"{where}: no module named {err.name!r} (for a file, write path/to/file.py)") from err
        except Exception as err:  # noqa: BLE001
            raise CheckError(f"{where}: importing it raised {_first_line(err)}") from err
    obj = module
    for part in name.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items()
                             if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
            near = [n for n in defined if n.lower() == part.lower()]
            hint = f"; did you mean {near[0]!r}?" if near else ""
            listed = f"; it defines the nn.Modules {', '.join(defined)}" if defined else ""
            raise CheckError(f"{where}: no class {name!r}{hint}{listed}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckError(f"{target}: {type(obj).__name__} is neither a class nor a function")
    return obj


def parse_init(text: str | None) -> tuple[tuple, dict]:
    """Constructor arguments written as Python literals, e.g. "1, 3, affine=False" -> ((1, 3), {'affine': False})."""
    if text is None or not text.strip():
        return (), {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        if not isinstance(call, ast.Call):
            raise SyntaxError("not an argument list")
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            raise ValueError("*args and **kwargs are not literals")
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise CheckError(f"--init {text!r}: not constructor arguments of Python literals ({err})") from None
    return args, kwargs


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise CheckError(f"--shape {text!r}: give at least two positive integers, e.g. 4,3,8,8")
    return shape


# ---------------------------------------------------------------------------------------------------------------
# The layer under test


@dataclass(frozen=True)
class UserLayer:
    """A user's layer as a sweep file names it: target, constructor arguments and the folder paths are taken from."""

    target: str
    args: tuple = ()
    kwargs: tuple = ()  # sorted (key, value) items, hashable
    base: str | None = None

    def factory(self) -> Callable[[], Any]:
        return _factory(load_target(self.target, self.base), self.args, dict(self.kwargs))


def _call_text(cls, args: tuple, kwargs: dict) -> str:
    inner = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return f"{getattr(cls, '__name__', 'layer')}({inner})"


def _factory(layer, args: tuple = (), kwargs: dict | None = None) -> Callable[[], Any]:
    """A callable returning a fresh layer each time (a fresh instance, a deep copy, or the function itself)."""
    kwargs = kwargs or {}
    if isinstance(layer, nn.Module):
        if args or kwargs:
            raise CheckError("constructor arguments go with a class, not with a layer instance")
        try:
            copy.deepcopy(layer)
        except Exception as err:  # noqa: BLE001
            raise CheckError(f"{type(layer).__name__} cannot be deep-copied ({_first_line(err)}): pass its class "
                             f"and constructor arguments instead") from err
        return lambda: copy.deepcopy(layer)
    if isinstance(layer, type):
        def make():
            try:
                return layer(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the user's constructor: bad input, named
                raise CheckError(f"{_call_text(layer, args, kwargs)} raised {_first_line(err)}") from err
        return make
    if callable(layer):
        if args or kwargs:
            raise CheckError("constructor arguments go with a class, not with a function")
        return lambda: layer
    raise CheckError(f"layer must be an nn.Module, a class or a function; got {type(layer).__name__}")


def _name(layer) -> str:
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__qualname__", None) or getattr(layer, "__name__", None) or type(layer).__name__


def probe(layer, shape: tuple[int, ...], name: str = "layer") -> None:
    """Run the layer once on a float32 input of `shape`; CheckError if it raises, returns a non-tensor or reshapes."""
    x = torch.randn(shape)
    try:
        with torch.no_grad():
            y = layer(x)
    except Exception as err:  # noqa: BLE001
        raise CheckError(f"{name} raised {_first_line(err)} on an input of shape {list(shape)}") from err
    if not isinstance(y, Tensor):
        raise CheckError(f"{name} returned {type(y).__name__}, not a tensor, for an input of shape {list(shape)}")
    if tuple(y.shape) != tuple(shape):
        raise CheckError(f"{name} changes the shape: input {list(shape)}, output {list(y.shape)}; a norm layer "
                         f"returns its input's shape")


# ---------------------------------------------------------------------------------------------------------------
# The family geometry and its mistakes, in float64


@dataclass(frozen=True)
class Geometry:
    """What the `like` layer computes: statistics per `groups` of channels (over the batch for BatchNorm), or over
    the last `k` dims for LayerNorm; eps; the activation after the affine."""

    family: str
    shape: tuple[int, ...]
    eps: float
    groups: int = 1
    over_batch: bool = False
    k: int = 1
    activation: str | None = None
    title: str = ""

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def affine_shape(self) -> tuple[int, ...]:
        return self.shape[-self.k:] if self.family == "layer_norm" else (self.channels,)


def _geometry(zoo: nn.Module, shape: tuple[int, ...], family: str) -> Geometry:
    kind = type(zoo).__name__
    act = getattr(zoo, "activation", None)
    if family == "group_norm":
        g = zoo.num_groups
        return Geometry(family, shape, zoo.eps, g, False, activation=act, title=f"GroupNorm({g}, {shape[1]})")
    if family == "layer_norm":
        ns = tuple(zoo.normalized_shape)
        return Geometry(family, shape, zoo.eps, k=len(ns), activation=act, title=f"LayerNorm({list(ns)})")
    if family == "instance_norm":
        return Geometry(family, shape, zoo.eps, shape[1], False, activation=act, title=f"{kind}({shape[1]})")
    return Geometry(family, shape, zoo.eps, shape[1], True, activation=act, title=f"{kind}({shape[1]})")


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


# ---------------------------------------------------------------------------------------------------------------
# Binding the user's affine parameters (and BatchNorm's running statistics) to the oracle's


@dataclass
class Bound:
    role: str  # weight, bias, running_mean, running_var
    name: str  # the user's attribute path
    shape: tuple[int, ...]
    how: str  # "by name" or "by shape"
    per_element: bool = False


def _bind(user, zoo: nn.Module, geo: Geometry) -> tuple[dict[str, Bound], list[str]]:
    """Which of the user's tensors plays which role; notes for what is left as constructed."""
    if not isinstance(user, nn.Module):
        return {}, []
    chan = math.prod(geo.affine_shape)
    elem = math.prod(geo.shape[1:]) if geo.family != "layer_norm" and len(geo.shape) > 2 else None
    params = dict(user.named_parameters())
    tensors = {**dict(user.named_buffers()), **params}
    roles = [r for r in ("weight", "bias") if getattr(zoo, r, None) is not None]
    if geo.family == "batch_norm" and getattr(zoo, "running_mean", None) is not None:
        roles += ["running_mean", "running_var"]
    aliases = {"weight": WEIGHT_NAMES, "bias": BIAS_NAMES, "running_mean": ("running_mean",),
               "running_var": ("running_var",)}
    bound: dict[str, Bound] = {}
    notes: list[str] = []
    taken: set[str] = set()
    for role in roles:
        for name, t in tensors.items():
            if name.rsplit(".", 1)[-1] in aliases[role] and name not in taken:
                if t.numel() == chan or (role in ("weight", "bias") and t.numel() == elem and elem != chan):
                    bound[role] = Bound(role, name, tuple(t.shape), "by name", t.numel() != chan)
                    taken.add(name)
                else:
                    notes.append(f"{name} {list(t.shape)} is neither per channel ({chan}) nor per element: "
                                 f"left as constructed")
                    taken.add(name)
                break
    for role in ("weight", "bias"):  # by shape: the user's remaining parameters in registration order
        if role in roles and role not in bound:
            for name, t in params.items():
                if name not in taken and (t.numel() == chan or (t.numel() == elem and elem != chan)):
                    bound[role] = Bound(role, name, tuple(t.shape), "by shape", t.numel() != chan)
                    taken.add(name)
                    break
    left = [f"{n} {list(t.shape)}" for n, t in tensors.items() if n not in taken]
    if left:
        notes.append(f"left as constructed: {', '.join(left)}")
    return bound, notes


def _get(module: nn.Module, name: str) -> Tensor:
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _prepare_zoo(zoo: nn.Module, bound: dict[str, Bound]) -> None:
    """Roles the user's layer lacks become identity (weight 1, bias 0) and are not compared."""
    with torch.no_grad():
        for role, fill in (("weight", 1.0), ("bias", 0.0)):
            p = getattr(zoo, role, None)
            if p is not None and role not in bound:
                p.fill_(fill)
                p.requires_grad_(False)


def _load_user(user, zoo: nn.Module, bound: dict[str, Bound], elem_values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy the oracle's values (per-element ones for per-element tensors) into the user's layer; its tensors."""
    out = {}
    with torch.no_grad():
        for role, b in bound.items():
            t = _get(user, b.name)
            src = elem_values[role] if b.per_element else getattr(zoo, role)
            t.copy_(src.reshape(t.shape).to(t.dtype))
            out[role] = t
    return out


def prepare_user(make: Callable[[], Any], zoo: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                 training: bool, seed: int = 0) -> tuple[Any, dict[str, Tensor], list[str]]:
    """For the equivalence sweep: a fresh user layer in `dtype` holding `zoo`'s affine values and mode.

    Neutralizes the zoo's roles the user lacks (call before building torch's counterpart and the oracle).
    Returns (layer, its tensors by role, notes).
    """
    user = make()
    geo = _geometry(zoo, shape, _family_of_layer(zoo))
    bound, notes = _bind(user, zoo, geo)
    _prepare_zoo(zoo, bound)
    elem = _element_values(bound, seed)
    if isinstance(user, nn.Module):
        user = user.to(dtype)
        user.train(training)
    return user, _load_user(user, zoo, bound, elem), notes


def _family_of_layer(zoo: nn.Module) -> str:
    from .frozen import FrozenBatchNorm2d
    from .layers import GroupNorm, LayerNorm, _BatchNorm, _InstanceNorm
    from .sync import SyncBatchNorm

    for cls, fam in ((GroupNorm, "group_norm"), (LayerNorm, "layer_norm"), (_InstanceNorm, "instance_norm"),
                     (_BatchNorm, "batch_norm"), (FrozenBatchNorm2d, "batch_norm"), (SyncBatchNorm, "batch_norm")):
        if isinstance(zoo, cls):
            return fam
    raise CheckError(f"no oracle for {type(zoo).__name__}")


def _element_values(bound: dict[str, Bound], seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed + 7)
    out = {}
    for role, b in bound.items():
        if b.per_element:
            r = torch.rand(b.shape, generator=gen, dtype=torch.float64)
            out[role] = r + 0.5 if role == "weight" else r - 0.5
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running the grid


def _err(a: Tensor | None, ref: Tensor | None) -> float | None:
    if a is None or ref is None:
        return None
    if a.numel() != ref.numel():
        return math.inf
    return rel_err(a.reshape(ref.shape), ref)


def _max(values) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


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


@dataclass(eq=False)
class _Row:
    dtype: str
    mean: float
    batch: int
    mode: str
    x: Tensor
    dy: Tensor
    tol: float
    w: Tensor | None  # the oracle's affine (float64), and the user's per-element values where it has them
    b: Tensor | None
    w_elem: Tensor | None
    b_elem: Tensor | None
    running: tuple[Tensor, Tensor] | None
    want: dict
    got: dict | None = None  # call 1
    got2: dict | None = None  # call 2
    torch_got: dict | None = None
    changed: list[str] = field(default_factory=list)
    error: str | None = None
    result: dict = field(default_factory=dict)

    @property
    def training(self) -> bool:
        return self.mode == "train"

    def label(self) -> str:
        return f"{rp.short_dtype(self.dtype)} mean {_mean(self.mean)} batch {self.batch} {self.mode}"


def _mean(v: float) -> str:
    return "0" if v == 0 else f"{v:.0e}".replace("e+0", "e").replace("e+", "e")


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


def _variant_result(geo: Geometry, v: Variant, row: _Row, roles: list[str], elem_roles: set[str]) -> dict:
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
    make = _factory(layer, tuple(args), kwargs)
    sample = make()
    label = name or (_call_text(layer, tuple(args), kwargs or {}) if isinstance(layer, type) else _name(layer))
    fam0 = family_of(spec["type"])
    shape = tuple(shape) if shape is not None else _default_shape(sample, fam0)
    spec = _fix_type(spec, len(shape))
    family = family_of(spec["type"])
    nf = shape[-1] if family == "layer_norm" else shape[1]
    zoo = _build_like(spec, nf, like)
    probe(sample, shape, label)
    geo = _geometry(zoo, shape, family)
    bound, notes = _bind(sample, zoo, geo)
    _prepare_zoo(zoo, bound)
    elem = _element_values(bound, seed)
    roles = [r for r in ("weight", "bias") if r in bound and _get(sample, bound[r].name).requires_grad]
    for r in ("weight", "bias"):
        p = getattr(zoo, r, None)
        if p is not None and r not in roles:
            p.requires_grad_(False)
    is_module = isinstance(sample, nn.Module)
    modes = MODES if is_module else ("train",)
    batches = tuple(dict.fromkeys((1, shape[0])))
    rows: list[_Row] = []
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
        raise CheckError(f"like {like!r} cannot take {nf} features: {_first_line(err)}") from None
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for role in ("weight", "bias"):
            p = getattr(zoo, role, None)
            if p is not None:
                r = torch.rand(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(r + 0.5 if role == "weight" else r - 0.5)
    return zoo


def _run_row(make, zoo0, geo, bound, elem, roles, dname, mean, batch, mode, x, dy, rm, is_module) -> _Row:
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
    row = _Row(dname, mean, batch, mode, x, dy, tolerance(default_tolerance(dname), x),
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
    tensors = _load_user(user, zoo, bound, elem) if is_module else {}
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
        row.error = _first_line(err)
    return row


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class CheckReport:
    """Rows of errors against the float64 oracle, and the diagnosis. `ok` is True when every row passes."""

    layer: str
    like: str
    title: str
    shape: tuple[int, ...]
    verdict: str
    rows: list[dict]
    diagnosis: list[str]
    notes: list[str]
    environment: dict = field(default_factory=rp.environment)

    @property
    def ok(self) -> bool:
        return self.verdict == PASS

    def to_dict(self) -> dict:
        failing = sum(r["verdict"] != PASS for r in self.rows)
        return {
            "kind": "check",
            "layer": self.layer,
            "like": self.like,
            "oracle": self.title,
            "shape": list(self.shape),
            "environment": self.environment,
            "summary": {"verdict": self.verdict, "rows": len(self.rows), "failing": failing},
            "diagnosis": self.diagnosis,
            "notes": [f"{self.layer} against the float64 oracle of {self.title} ({self.like!r}), input "
                      f"{format_shape(self.shape)} (and batch 1), std 1:"]
                     + [f"{'  ' if i else ''}{d}" for i, d in enumerate(self.diagnosis)] + self.notes,
            "tolerance": "error = max|got - oracle| / max|oracle|; tol = 16 eps(dtype) (1 + |mean(x)|/std(x))",
            "cases": self.rows,
        }

    def columns(self) -> list[rp.Column]:
        cols = [
            rp.Column("dtype", lambda c: rp.short_dtype(c["dtype"])),
            rp.Column("mean", lambda c: _mean(c["mean"]), "right"),
            rp.Column("N", lambda c: str(c["batch"]), "right"),
            rp.Column("mode", lambda c: c["mode"]),
            rp.Column("out\nlayer", lambda c: rp.sci(c["out"]), "right"),
            rp.Column("out\n2nd call", lambda c: rp.sci(c["out2"]), "right"),
            rp.Column("grad\nlayer", lambda c: rp.sci(c["grad"]), "right"),
        ]
        if any(r.get("stats") is not None for r in self.rows):
            cols.append(rp.Column("stats\nlayer", lambda c: rp.sci(c["stats"]), "right"))
        cols += [
            rp.Column("out\ntorch", lambda c: rp.sci(c["torch_out"]), "right"),
            rp.Column("grad\ntorch", lambda c: rp.sci(c["torch_grad"]), "right"),
            rp.Column("tol", lambda c: rp.sci(c["tolerance"]), "right"),
            rp.Column("verdict", lambda c: c["verdict"]),
        ]
        return cols

    def render(self, fmt: str = "table") -> str:
        return rp.render(self.to_dict(), fmt, self.columns())

    def __str__(self) -> str:
        return self.render("table")


def _rows_text(rows: list[_Row]) -> str:
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


def _report(label, like, spec, geo: Geometry, rows: list[_Row], bound, notes, roles, sample, zoo) -> CheckReport:
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
    diagnosis = _diagnose(geo, rows, bound, roles, sample, zoo, verdict)
    return CheckReport(label, like if isinstance(like, str) else str(like), geo.title, geo.shape, verdict,
                       [r.result for r in rows], diagnosis, notes)


def _diagnose(geo: Geometry, rows: list[_Row], bound, roles, sample, zoo, verdict: str) -> list[str]:
    ok_rows = [r for r in rows if r.error is None]
    out: list[str] = []
    errs = [r for r in rows if r.error is not None]
    if errs:
        out.append(f"raised on {len(errs)} of {len(rows)} inputs ({_rows_text(errs)}): {errs[0].error}")
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
            out.append(f"{_heading(ms)}: on {len(covered)} of {len(fail1)} differing inputs ({_rows_text(covered)}) "
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
                   f"({_rows_text(remaining)}): worst {w.label()}, error {rp.sci(explained_by[id(w)])} "
                   f"(output {rp.sci(w.result['out'])}, gradients {rp.sci(w.result['grad'])}, tolerance "
                   f"{rp.sci(w.tol)}){also}")
    return out


def _to(errs: dict, rows: list[_Row]) -> str:
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
                want = _variant_result(geo, v, r, roles, elem_roles)
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


def _sim(geo: Geometry, row: _Row, dtype: torch.dtype, unshifted: bool) -> Tensor | None:
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


def _rounding(geo, ok_rows, remaining, errs) -> list[tuple[str, list[_Row]]]:
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


__all__ = ["check", "CheckReport", "CheckError", "load_target", "parse_init", "parse_shape", "UserLayer",
           "Variant", "variant_forward", "prepare_user", "probe"]
