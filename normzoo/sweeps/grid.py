"""Sweep files: YAML -> validated grids -> cases. One loader and validator for both sweeps.

A sweep file has a top-level `grids:` list. Each grid names `layers` (preset names or dict specs) and `shapes`,
and optional lists that multiply out into cases:

    key         equivalence            speed                       default
    dtypes      yes                    yes                         [float32]
    layouts     yes                    yes                         [contiguous]
    modes       yes                    yes (BatchNorm eval)        [train]
    offsets     yes                    -                           [0]
    compiled    yes                    -                           [true]
    passes      -                      yes                         [forward, forward_backward]
    tolerances  yes (per dtype)        yes (output check)          16 * eps(dtype)
    sequence    -                      yes (true/false)            false
    second_order yes (true/false)      -                           false

`second_order: true` (equivalence) also checks a second derivative: the Hessian-vector product
d/dx <d<y, dy>/dx, dy> (what double backward, gradient penalties and create_graph=True compute), as `d2x`.

`sequence: true` (speed) makes the grid's `shapes` list ONE case per layer/dtype/layout/mode/pass: one module
instance is fed every shape in order (the shapes must agree on dimensionality and features), and one timed call
runs the whole sequence: the "changing shapes" scenario (compiles bounded, no cliff, no eager fallback).

A layer may also be the user's own (equivalence only), checked against the oracle of the preset it is meant to be:

    layers: [gn1, {name: mine, class: "my_norms.py:MyGroupNorm", init: {num_groups: 1, num_channels: 3}, like: gn1}]

`class` is path/to/file.py:ClassName (relative to the sweep file's folder) or package.module:ClassName; loading it
runs the file's code, once. `init` is the constructor's keyword arguments (a mapping) or positional ones (a list).

Top level: `grids` (both), `threads` and `blocks` (speed). Every problem is found before anything runs and raised as
SweepError naming the file, the key and the bad value; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import registry
from ..accuracy import DTYPES, default_tolerance
from ..families import family_of, fix_type as _fix_type
from ..user_layer import CheckError, UserLayer, probe

LAYOUTS = ("contiguous", "channels_last")
MODES = ("train", "eval")
PASSES = ("forward", "forward_backward")

# grid key -> which sweeps take it
GRID_KEYS = {
    "name": ("equivalence", "speed"),
    "layers": ("equivalence", "speed"),
    "shapes": ("equivalence", "speed"),
    "dtypes": ("equivalence", "speed"),
    "layouts": ("equivalence", "speed"),
    "modes": ("equivalence", "speed"),
    "tolerances": ("equivalence", "speed"),
    "offsets": ("equivalence",),
    "compiled": ("equivalence",),
    "passes": ("speed",),
    "sequence": ("speed",),
    "second_order": ("equivalence",),
}
TOP_KEYS = {"grids": ("equivalence", "speed"), "threads": ("speed",), "blocks": ("speed",)}
DEFAULT_CONFIG = {"equivalence": "equivalence.yaml", "speed": "speed.yaml"}


class SweepError(ValueError):
    """A bad sweep file; the message names the file, the key and the value."""


DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str | None:
    """Why the sweeps cannot run on `device` (cpu or cuda), as a message naming it; None when they can."""
    if device not in DEVICES:
        return f"--device {device}: unknown device; choose from {', '.join(DEVICES)}"
    if device == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU on this machine")
        return f"--device cuda: CUDA is not available: {why}; run with --device cpu, or on a machine with a GPU"
    return None


@dataclass(frozen=True)
class Case:
    """One point of a grid. `spec` is the resolved layer spec (its type fixed to the shape's dimensionality)."""

    grid: int
    layer: str  # the name as written in the file (or a short form of a dict spec)
    spec: tuple  # sorted (key, value) items of the resolved spec, hashable
    shape: tuple[int, ...]
    dtype: str
    layout: str
    mode: str
    tolerance: float  # base tolerance for the dtype (before the input magnitude factor)
    offset: float = 0.0
    compiled: bool = True
    pass_: str = "forward"  # speed only
    sequence: tuple = ()  # speed only: the shapes fed in order, one case (`shape` is the first of them)
    second_order: bool = False  # equivalence only: also the second derivative (double backward)
    user: Any = None  # equivalence only: a user's layer (normzoo.user_layer.UserLayer) measured in place of the zoo's

    @property
    def spec_dict(self) -> dict[str, Any]:
        return dict(self.spec)

    @property
    def family(self) -> str:
        return family_of(self.spec_dict["type"])

    @property
    def num_features(self) -> int:
        return self.shape[registry.features_axis(self.spec_dict["type"])]

    def build(self, device: str | torch.device = "cpu", compile: bool | None = None) -> torch.nn.Module:
        """The normzoo layer for this case, in float32 (the caller converts)."""
        spec = self.spec_dict
        return registry.build(spec, self.num_features, device=device,
                              compile=self.compiled if compile is None else compile)


@dataclass
class Sweep:
    kind: str  # equivalence or speed
    source: str  # the file, for messages and reports
    cases: list[Case]
    notes: list[str] = field(default_factory=list)  # skipped combinations, one line each
    threads: list[int] = field(default_factory=list)  # speed
    blocks: int = 7  # speed: timing blocks per contender


def format_shape(shape) -> str:
    if isinstance(shape, str):  # a sequence row's label, e.g. "seq of 6"
        return shape
    return "x".join(str(s) for s in shape)


def layer_label(layer) -> str:
    if isinstance(layer, str):
        return layer
    args = ",".join(f"{k}={v}" for k, v in layer.items() if k not in ("type", "description"))
    return f"{layer.get('type')}({args})"


def memory_format(layout: str, ndim: int):
    """The torch memory format for a layout, or None where the shape has no channels_last form."""
    if layout == "contiguous":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


def _as_list(value, where: str, what: str) -> list:
    if value is None:
        raise SweepError(f"{where}: empty value; give a list of {what}")
    return list(value) if isinstance(value, list) else [value]


def _check_choices(values, choices, where: str, what: str) -> list:
    for v in values:
        if not isinstance(v, str) or v not in choices:
            raise SweepError(f"{where}: unknown {what} {v!r}; choose from {', '.join(choices)}")
    return values


def _number(v, where: str) -> float:
    if isinstance(v, bool):
        raise SweepError(f"{where}: {v!r} is not a number")
    try:  # a str from a dict given in Python (files read 1e3 as a float: registry.load_yaml)
        out = float(v)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: {v!r} is not a number") from None
    if not math.isfinite(out):
        raise SweepError(f"{where}: {v!r} is not a finite number")
    return out


def _check_layer_shape(spec: dict, shape: tuple, where: str, label: str) -> None:
    """Build the layer on the meta device and run it once: any mismatch is a SweepError, before real work."""
    cls, _ = registry.LAYER_TYPES[spec["type"]]
    dims = getattr(cls, "input_dims", None)
    if dims is not None and (len(shape) not in dims or len(shape) == getattr(cls, "unbatched_dims", None)):
        raise SweepError(f"{where}: layer {label!r} ({spec['type']}) cannot take the {len(shape)}-D shape "
                         f"{list(shape)}")
    nf = shape[registry.features_axis(spec["type"])]
    try:
        layer = registry.build(spec, nf, device="meta", compile=False)
        layer(torch.empty(shape, device="meta"))
    except Exception as err:  # noqa: BLE001 - any refusal by the layer is a bad sweep, reported as such
        raise SweepError(f"{where}: layer {label!r} cannot take shape {list(shape)}: {err}") from None


USER_KEYS = ("name", "class", "init", "like")


def _user_layer(layer: dict, where: str, kind: str, src: str):
    """A user's layer entry -> (label, like spec, UserLayer); loads its file (runs it) and builds it once."""
    label = str(layer.get("name", layer["class"]))
    here = f"{where}: layer {label!r}"
    if kind != "equivalence":
        raise SweepError(f"{here}: user layers (class:) go in equivalence sweeps, not {kind}")
    for key in layer:
        if key not in USER_KEYS:
            raise SweepError(f"{here}: unknown key {key!r}; a user layer takes {', '.join(USER_KEYS)}")
    target = layer["class"]
    if not isinstance(target, str):
        raise SweepError(f"{here}: class: {target!r} is not a string like \"my_norms.py:MyGroupNorm\"")
    if "like" not in layer:
        raise SweepError(f"{here}: missing key 'like' (the preset it is meant to be, e.g. gn1)")
    try:
        like = registry.resolve_spec(layer["like"])
    except registry.PresetError as err:
        raise SweepError(f"{here}: like: {err}") from None
    init = layer.get("init", {})
    if init is None:
        init = {}
    if isinstance(init, dict):
        args, kwargs = (), init
    elif isinstance(init, list):
        args, kwargs = tuple(init), {}
    else:
        raise SweepError(f"{here}: init: {init!r} is neither a mapping of keyword arguments nor a list")
    base = str(Path(src).parent) if Path(src).is_file() else None
    user = UserLayer(target, args, tuple(sorted(kwargs.items())), base)
    try:
        user.factory()()
    except CheckError as err:
        raise SweepError(f"{here}: {err}") from None
    return label, like, user


def _check_user_shape(user, shape: tuple, where: str, label: str) -> None:
    try:
        probe(user.factory()(), shape, label)
    except CheckError as err:
        raise SweepError(f"{where}: {err}") from None


def _load_yaml(path: str | Path | None, kind: str) -> tuple[Any, str]:
    if path is None:
        name = DEFAULT_CONFIG[kind]
        text = resources.files("normzoo.configs").joinpath(name).read_text()
        return registry.load_yaml(text), f"normzoo/configs/{name}"
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SweepError(f"{path}: cannot read sweep file ({err.strerror})") from None
    try:
        return registry.load_yaml(text), str(path)  # 1e-5 is a float (YAML 1.2)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise SweepError(f"{path}:{line} not valid YAML: {getattr(err, 'problem', err)}") from None


def load(path: str | Path | None, kind: str) -> Sweep:
    """Load and validate a sweep file (None: the embedded default for `kind`) and expand it into cases."""
    data, src = _load_yaml(path, kind)
    return parse(data, kind, src)


def _check_keys(mapping: dict, table: dict, kind: str, what: str) -> None:
    """Every key must be one the table allows for this kind of sweep; the error names it and lists the allowed."""
    for key in mapping:
        if key not in table or kind not in table[key]:
            allowed = [k for k, v in table.items() if kind in v]
            raise SweepError(f"{what} {key!r} for a {kind} sweep; allowed: {', '.join(allowed)}")


def parse(data: Any, kind: str, src: str = "<sweep>") -> Sweep:
    if not isinstance(data, dict):
        raise SweepError(f"{src}: a sweep file is a mapping with a top-level 'grids' list, got {type(data).__name__}")
    _check_keys(data, TOP_KEYS, kind, f"{src}: unknown top-level key")
    grids = data.get("grids")
    if not isinstance(grids, list) or not grids:
        raise SweepError(f"{src}: 'grids' must be a non-empty list of grids, got {grids!r}")
    sweep = Sweep(kind, src, [])
    if kind == "speed":
        threads = _as_list(data.get("threads", torch.get_num_threads()), f"{src}: threads", "thread counts")
        for t in threads:
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise SweepError(f"{src}: threads: {t!r} is not a positive integer")
        sweep.threads = threads
        blocks = data.get("blocks", sweep.blocks)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise SweepError(f"{src}: blocks: {blocks!r} is not a positive integer")
        sweep.blocks = blocks
    seen_notes: set[str] = set()
    for gi, grid in enumerate(grids):
        for case_or_note in _expand_grid(grid, gi, kind, src):
            if isinstance(case_or_note, Case):
                sweep.cases.append(case_or_note)
            elif case_or_note not in seen_notes:
                seen_notes.add(case_or_note)
                sweep.notes.append(case_or_note)
    if not sweep.cases:
        raise SweepError(f"{src}: the grids expand to no runnable case ({'; '.join(sweep.notes)})")
    return sweep


def _expand_grid(grid, gi: int, kind: str, src: str):
    here = f"{src}: grids[{gi}]"
    if not isinstance(grid, dict):
        raise SweepError(f"{here}: a grid is a mapping with 'layers' and 'shapes', got {grid!r}")
    _check_keys(grid, GRID_KEYS, kind, f"{here}: unknown key")
    for key in ("layers", "shapes"):
        if key not in grid:
            raise SweepError(f"{here}: missing key {key!r}")

    layers = _as_list(grid["layers"], f"{here}.layers", "preset names or specs")
    resolved = []
    for layer in layers:
        if isinstance(layer, dict) and "class" in layer:
            resolved.append(_user_layer(layer, f"{here}.layers", kind, src))
            continue
        try:
            if isinstance(layer, dict) and "name" in layer:  # a dict spec may carry its table label
                layer = dict(layer)
                label = str(layer.pop("name"))
            else:
                label = layer_label(layer)
            resolved.append((label, registry.resolve_spec(layer), None))
        except registry.PresetError as err:
            raise SweepError(f"{here}.layers: bad layer {layer!r}: {err}") from None

    shapes = grid["shapes"]
    if not isinstance(shapes, list) or not shapes:
        raise SweepError(f"{here}.shapes: give a list of shapes, e.g. [[2, 64, 8, 8]], got {shapes!r}")
    if all(isinstance(s, int) for s in shapes):
        raise SweepError(f"{here}.shapes: {shapes!r} is one shape; give a list of shapes: [{shapes!r}]")
    for s in shapes:
        if (not isinstance(s, list) or len(s) < 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)):
            raise SweepError(f"{here}.shapes: bad shape {s!r}; a shape is a list of at least 2 positive integers")

    dtypes = _check_choices(_as_list(grid.get("dtypes", ["float32"]), f"{here}.dtypes", "dtypes"),
                            DTYPES, f"{here}.dtypes", "dtype")
    layouts = _check_choices(_as_list(grid.get("layouts", ["contiguous"]), f"{here}.layouts", "layouts"),
                             LAYOUTS, f"{here}.layouts", "layout")
    modes = _check_choices(_as_list(grid.get("modes", ["train"]), f"{here}.modes", "modes"),
                           MODES, f"{here}.modes", "mode")
    offsets = [_number(v, f"{here}.offsets") for v in _as_list(grid.get("offsets", [0]), f"{here}.offsets", "numbers")]
    compiled = _as_list(grid.get("compiled", [True]), f"{here}.compiled", "booleans")
    for c in compiled:
        if not isinstance(c, bool):
            raise SweepError(f"{here}.compiled: {c!r} is not true or false")
    passes = _check_choices(_as_list(grid.get("passes", list(PASSES)), f"{here}.passes", "passes"),
                            PASSES, f"{here}.passes", "pass")
    tolerances = grid.get("tolerances", {}) or {}
    if not isinstance(tolerances, dict):
        raise SweepError(f"{here}.tolerances: a mapping dtype -> tolerance, got {tolerances!r}")
    for dt, tol in tolerances.items():
        _check_choices([dt], DTYPES, f"{here}.tolerances", "dtype")
        if _number(tol, f"{here}.tolerances.{dt}") <= 0:
            raise SweepError(f"{here}.tolerances.{dt}: {tol!r} is not a positive number")
    sequence = grid.get("sequence", False)
    if not isinstance(sequence, bool):
        raise SweepError(f"{here}.sequence: {sequence!r} is not true or false")
    second_order = grid.get("second_order", False)
    if not isinstance(second_order, bool):
        raise SweepError(f"{here}.second_order: {second_order!r} is not true or false")
    if kind == "speed":
        offsets, compiled = [0.0], [True]
    else:
        passes = ["forward_backward"]

    groups = [[tuple(s) for s in shapes]] if sequence else [[tuple(s)] for s in shapes]
    for (label, spec0, user), group in itertools.product(resolved, groups):
        shape = group[0]
        spec = _fix_type(spec0, len(shape))
        fam = family_of(spec["type"])
        feat = registry.features_axis(spec["type"])
        for s in group:
            _check_layer_shape(spec, s, f"{here}", label if user is None else f"{label}'s like")
            if user is not None:
                _check_user_shape(user, s, here, label)
            if len(s) != len(shape) or s[feat] != shape[feat]:
                raise SweepError(f"{here}.shapes: with sequence: true one {label!r} layer takes every shape, so "
                                 f"they must agree on dimensionality and features; {list(s)} does not match "
                                 f"{list(shape)}")
        for dtype, layout, mode, offset, comp, pass_ in itertools.product(
                dtypes, layouts, modes, offsets, compiled, passes):
            if memory_format(layout, len(shape)) is None:
                yield f"channels_last skipped for {len(shape)}-D shapes (it needs a 4-D or 5-D shape)"
                continue
            if mode == "eval" and fam != "batch_norm":
                yield f"eval skipped for {fam}: without running statistics it computes what train does"
                continue
            if mode == "eval" and (spec.get("track_running_stats") is False or spec["type"] == "frozen_batch_norm"):
                yield f"eval skipped for {label}: it computes what train does"
                continue
            if user is not None and comp != compiled[0]:
                continue  # a user's layer runs as written: `compiled` does not multiply it
            if user is not None:
                comp = False
            yield Case(grid=gi, layer=label, spec=tuple(sorted(spec.items())), shape=shape, dtype=dtype,
                       layout=layout, mode=mode, offset=offset, compiled=comp, pass_=pass_,
                       sequence=tuple(group) if sequence else (), user=user, second_order=second_order,
                       tolerance=_number(tolerances.get(dtype, default_tolerance(dtype)), "tolerance"))
