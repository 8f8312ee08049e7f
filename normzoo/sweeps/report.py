"""Reports for both sweeps: table, markdown, csv and json from one report dict; streaming to a file; progress.

A report is {"kind", "environment", "summary", "notes", "cases"}; each sweep passes the columns of its table.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tabulate as _tabulate
import torch
from tabulate import tabulate

from .._version import __version__

_tabulate.MIN_PADDING = 0  # headers no wider than their text: the tables must fit 120 columns
# "simple" with one space between columns; headers may have two lines ("out\nzoo")
_TERMINAL = _tabulate.TableFormat(
    lineabove=None, linebelowheader=_tabulate.Line("", "-", " ", ""), linebetweenrows=None, linebelow=None,
    headerrow=_tabulate.DataRow("", " ", ""), datarow=_tabulate.DataRow("", " ", ""), padding=0,
    with_header_hide=None)
_tabulate._table_formats["normzoo"] = _TERMINAL  # registered by name so tabulate renders multiline headers
_tabulate.multiline_formats["normzoo"] = "normzoo"

FORMATS = ("table", "markdown", "csv", "json")


@dataclass(frozen=True)
class Column:
    header: str
    get: Callable[[dict], object]
    align: str = "left"


def sci(v) -> str:
    """Short scientific notation: 1.2e-7, 3e+3; '-' for None, 'inf'/'nan' as such."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf"
    if v == 0:
        return "0"
    mant, exp = f"{v:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def short_dtype(d: str) -> str:
    return {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}.get(d, d)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu", threads: int | list[int] | None = None) -> dict:
    """What the numbers depend on: versions, device, CPU, threads, allocator and compile settings, date."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name()})",
        "cpu": _cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),  # the vector ISA ATen and Inductor use: AVX2, AVX512, ...
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        # other work on the machine when the sweep started: a load above the core count means shared cores
        "load_avg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        # allocator settings: glibc malloc tunables, a preloaded allocator, the CUDA caching allocator
        "allocator": {k: v for k, v in sorted(os.environ.items())
                      if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF")},
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "NORMZOO_COMPILE", "TORCHINDUCTOR_CACHE_DIR")
                if k in os.environ},
    }
    env["normzoo"] = __version__
    return env


def _plain(v):
    """JSON-safe: non-finite floats become the strings 'inf' / 'nan' (strict JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf"
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            out[prefix + k] = "x".join(map(str, v)) if k == "shape" else json.dumps(_plain(v))
        else:
            out[prefix + k] = _plain(v)
    return out


def summary_line(report: dict) -> str:
    s = report.get("summary", {})
    return ", ".join(f"{k.replace('_', '-')}: {v}" for k, v in s.items())


def render(report: dict, fmt: str, columns: list[Column], preamble: bool = True) -> str:
    """The report as text. preamble=False: markdown without its summary and environment lines (for embedding)."""
    if fmt == "json":
        return json.dumps(_plain(report), indent=1) + "\n"
    cases = report["cases"]
    if fmt == "csv":
        rows = [_flatten(c) for c in cases]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    rows = [[col.get(c) for col in columns] for c in cases]
    headers = [col.header if fmt == "table" else col.header.replace("\n", " ") for col in columns]
    align = [col.align for col in columns]
    env = report.get("environment", {})
    env_line = (f"{env.get('date', '')}, torch {env.get('torch', '')}, {env.get('device', '')}, "
                f"{env.get('cpu', '')}, threads {env.get('threads', '')}, load average {env.get('load_avg')}")
    if fmt == "markdown":
        lines = [f"**{summary_line(report)}**", "", f"Environment: {env_line}.", ""] if preamble else []
        if env.get("allocator") and preamble:
            lines += [f"Allocator settings: {env['allocator']}.", ""]
        lines.append(tabulate(rows, headers, tablefmt="github", colalign=align, disable_numparse=True))
        lines += [""] + [f"- {n}" for n in report.get("notes", [])]
        return "\n".join(lines).rstrip() + "\n"
    table = tabulate(rows, headers, tablefmt="normzoo", colalign=align, disable_numparse=True)
    tail = [f"{n}" for n in report.get("notes", [])]
    return "\n".join([table, "", summary_line(report), *tail, env_line]) + "\n"


def write(path: str | Path, text: str) -> None:
    """Replace the file whole (write, then rename): a reader or an interrupt never sees half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool | None = None, stream=None) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        width = 24
        filled = width * self.done // max(self.total, 1)
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        self.stream.write(line[:118].ljust(118))
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 118 + "\r")
            self.stream.flush()


def drive(cases: list, run_one: Callable, build: Callable[[list, bool], dict], on_update: Callable[[dict], None],
          label: Callable = str, progress: Progress | None = None) -> tuple[dict, bool]:
    """Run the cases in order, rebuilding the report after each (`on_update` streams it out).

    Ctrl-C stops the sweep but keeps the finished cases: returns (report, interrupted).
    """
    results: list = []
    progress = progress or Progress(len(cases))
    interrupted = False
    try:
        for case in cases:
            progress.step(label(case))
            results.append(run_one(case))
            on_update(build(results, False))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
    report = build(results, interrupted)
    if interrupted:
        report.setdefault("notes", []).append(f"interrupted: {len(results)} of {len(cases)} cases finished")
    on_update(report)
    return report, interrupted
