"""Binding a user's layer to the oracle's: which of its tensors plays weight, bias, running_mean and running_var,
and the oracle's values copied into them, so that both compute with the same numbers.

By name first (weight/gamma/scale/g/w, bias/beta/shift/b; running_mean/running_var for BatchNorm), then by shape:
the user's remaining parameters in registration order. A tensor may be per channel (the oracle's shape) or per
element of (C, *spatial) (it then gets values of its own, and the diagnosis can test a per-element affine). Roles
the user's layer lacks become identity on the oracle's side (weight 1, bias 0) and are not compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .families import Geometry, family_of_layer, geometry
from .user_layer import CheckError

WEIGHT_NAMES = ("weight", "gamma", "scale", "g", "w")
BIAS_NAMES = ("bias", "beta", "shift", "b")


@dataclass
class Bound:
    """One of the user's tensors and the oracle's role it plays."""

    role: str  # weight, bias, running_mean, running_var
    name: str  # the user's attribute path
    shape: tuple[int, ...]
    how: str  # "by name" or "by shape"
    per_element: bool = False


def bind(user, zoo: nn.Module, geo: Geometry) -> tuple[dict[str, Bound], list[str]]:
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


def tensor_at(module: nn.Module, name: str) -> Tensor:
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def prepare_zoo(zoo: nn.Module, bound: dict[str, Bound]) -> None:
    """Roles the user's layer lacks become identity (weight 1, bias 0) and are not compared."""
    with torch.no_grad():
        for role, fill in (("weight", 1.0), ("bias", 0.0)):
            p = getattr(zoo, role, None)
            if p is not None and role not in bound:
                p.fill_(fill)
                p.requires_grad_(False)


def load_user(user, zoo: nn.Module, bound: dict[str, Bound], elem_values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy the oracle's values (per-element ones for per-element tensors) into the user's layer; its tensors."""
    out = {}
    with torch.no_grad():
        for role, b in bound.items():
            t = tensor_at(user, b.name)
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
    family = family_of_layer(zoo)
    if family is None:
        raise CheckError(f"no oracle for {type(zoo).__name__}")
    geo = geometry(zoo, shape, family)
    bound, notes = bind(user, zoo, geo)
    prepare_zoo(zoo, bound)
    elem = element_values(bound, seed)
    if isinstance(user, nn.Module):
        user = user.to(dtype)
        user.train(training)
    return user, load_user(user, zoo, bound, elem), notes


def element_values(bound: dict[str, Bound], seed: int) -> dict[str, Tensor]:
    """Values of their own for the per-element tensors (weight near 1, bias near 0), from `seed`."""
    gen = torch.Generator().manual_seed(seed + 7)
    out = {}
    for role, b in bound.items():
        if b.per_element:
            r = torch.rand(b.shape, generator=gen, dtype=torch.float64)
            out[role] = r + 0.5 if role == "weight" else r - 0.5
    return out
