"""The record of a check: the grid it runs on, one Row per grid point (its input, the oracle's values, what the
layer returned, its result), and the CheckReport that tabulates the results with the diagnosis.

Every row's result holds the layer's errors against the float64 oracle (output, the output of a second call on the
same input, gradients, running statistics) and torch.nn's errors next to them, the tolerance, and the verdict:
PASS (every error within the tolerance), FAIL, or ERROR (the layer raised).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .sweeps import report as rp
from .sweeps.grid import format_shape

DTYPES = ("float32", "float64")
MEANS = (0.0, 1e2, 1e3)
MODES = ("train", "eval")
PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"


@dataclass(eq=False)
class Row:
    """One grid point of a check: the input and upstream gradient, the oracle's values, the layer's outputs."""

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
        return f"{rp.short_dtype(self.dtype)} mean {mean_label(self.mean)} batch {self.batch} {self.mode}"


def mean_label(v: float) -> str:
    """An input mean as the tables write it: 0, 1e2, 1e3."""
    return "0" if v == 0 else f"{v:.0e}".replace("e+0", "e").replace("e+", "e")


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
            rp.Column("mean", lambda c: mean_label(c["mean"]), "right"),
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
