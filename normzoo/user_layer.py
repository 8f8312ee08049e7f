"""A user's own layer, as `normzoo check` and the equivalence sweep take it: the file and class a target names
(path/to/file.py:ClassName or package.module:ClassName), its constructor arguments, fresh instances of it, and a
first call that shows it takes and returns the shape of its input.

Loading a user's file (`load_target`) runs its code: once per process, when asked, never on import of normzoo.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class CheckError(ValueError):
    """Bad input to check: a missing file or class, a constructor that raises, a layer that changes the shape."""


# ---------------------------------------------------------------------------------------------------------------
# Loading a user's layer: path/to/file.py:ClassName or package.module:ClassName


_LOADED: dict[str, Any] = {}  # resolved file path -> module: each file runs once per process


def first_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
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
                raise CheckError(f"{where}: loading it raised {first_line(err)}") from err
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
            raise CheckError(f"{where}: importing it raised {first_line(err)}") from err
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
# Fresh instances, and a first call


@dataclass(frozen=True)
class UserLayer:
    """A user's layer as a sweep file names it: target, constructor arguments and the folder paths are taken from."""

    target: str
    args: tuple = ()
    kwargs: tuple = ()  # sorted (key, value) items, hashable
    base: str | None = None

    def factory(self) -> Callable[[], Any]:
        return layer_factory(load_target(self.target, self.base), self.args, dict(self.kwargs))


def call_text(cls, args: tuple, kwargs: dict) -> str:
    """The constructor call as Python: 'MyNorm(1, 3, affine=False)'."""
    inner = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return f"{getattr(cls, '__name__', 'layer')}({inner})"


def layer_factory(layer, args: tuple = (), kwargs: dict | None = None) -> Callable[[], Any]:
    """A callable returning a fresh layer each time (a fresh instance, a deep copy, or the function itself)."""
    kwargs = kwargs or {}
    if isinstance(layer, nn.Module):
        if args or kwargs:
            raise CheckError("constructor arguments go with a class, not with a layer instance")
        try:
            copy.deepcopy(layer)
        except Exception as err:  # noqa: BLE001
            raise CheckError(f"{type(layer).__name__} cannot be deep-copied ({first_line(err)}): pass its class "
                             f"and constructor arguments instead") from err
        return lambda: copy.deepcopy(layer)
    if isinstance(layer, type):
        def make():
            try:
                return layer(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the user's constructor: bad input, named
                raise CheckError(f"{call_text(layer, args, kwargs)} raised {first_line(err)}") from err
        return make
    if callable(layer):
        if args or kwargs:
            raise CheckError("constructor arguments go with a class, not with a function")
        return lambda: layer
    raise CheckError(f"layer must be an nn.Module, a class or a function; got {type(layer).__name__}")


def layer_name(layer) -> str:
    """A layer's name for the report: its class for an instance, its (qualified) name for a class or function."""
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
        raise CheckError(f"{name} raised {first_line(err)} on an input of shape {list(shape)}") from err
    if not isinstance(y, Tensor):
        raise CheckError(f"{name} returned {type(y).__name__}, not a tensor, for an input of shape {list(shape)}")
    if tuple(y.shape) != tuple(shape):
        raise CheckError(f"{name} changes the shape: input {list(shape)}, output {list(y.shape)}; a norm layer "
                         f"returns its input's shape")
