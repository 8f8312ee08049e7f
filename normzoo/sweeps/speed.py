"""The speed sweep: normzoo against torch.nn eager, torch.compile of torch.nn, and the copy floor.

normzoo's kernels are the in-memory compile's (NORMZOO_COMPILE=sync, what the sweep sets unless told otherwise) or,
with NORMZOO_COMPILE=1 set explicitly, the kernel store's, built before each case's first call (`store_build_s`).

Per case and thread count:
  1. build the four contenders; the first call of each is timed apart (`compile_s`: Inductor compiles there);
  2. check each norm's output (and gradients, for forward_backward) against torch eager, within twice the
     equivalence tolerance times log2(numel) (long float32 sums), or where torch eager is off, against the
     float64 oracle: a contender that disagrees is reported with no time (a wrong-but-fast kernel must not show
     up as a win);
  3. time with torch.utils.benchmark (it synchronizes CUDA), contenders interleaved and rotated, `blocks` blocks
     each of about BLOCK_S seconds; report the median per call and the spread (interquartile range / median).

Throughput is the minimal memory traffic over the median time: forward reads x and writes y (2 tensors);
forward_backward adds reading x and dy and writing dx (5 in all). `copy` moves exactly that traffic: x.clone()
for the forward, plus x + dy for the backward. ratio = normzoo / torch; floor_x = normzoo / copy.

A `sequence` case (the "changing shapes" scenario) feeds one module per contender every shape of the sequence in
order; one call runs the whole sequence, so times, traffic and compile_s (the first pass: every compile) are per
sequence, and the agreement check covers the outputs of every shape. It adds `compiles`: per compiled contender,
the graphs compiled in the first pass and in a second (warm) pass, and for normzoo the compile seconds from
normzoo.compiling.cache_info(). `no_eager_fallback` holds when normzoo compiled at most one kernel per distinct
shape (fewer where an earlier case compiled it), nothing in the warm pass, evicted nothing and kept compilation on. torch.compile runs here as users call it
(dynamic=None): dynamo recompiles on a new shape and, from the second shape on, marks the changing sizes dynamic.
"""

from __future__ import annotations

import math
import statistics
import types

from torch._dynamo.utils import counters as dynamo_counters

import torch
from torch import Tensor
from torch.utils import benchmark

from . import report as rp
from . import equivalence
from .. import compiling, policy
from ..accuracy import rel_err
from .grid import DTYPES, Case, Sweep, check_device, format_shape, memory_format  # noqa: F401 (check_device)
from .oracle import Reference, norm_of, torch_counterpart

CONTENDERS = ("torch", "torch_compiled", "normzoo", "copy")
BLOCK_S = 0.05  # seconds per timing block per contender
TRAFFIC = {"forward": 2, "forward_backward": 5}  # tensors of x's size read or written, at the least


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _compiled(module: torch.nn.Module, tag: int, dynamic: bool | None = False):
    """torch.compile of a call to `module`, through a fresh code object: dynamo keeps its compiled-code cache
    per code object and falls back to eager after 8 entries, so cases must not share one."""
    def call(x):
        return module(x)

    code = call.__code__.replace(co_name=f"torch_compiled_case_{tag}")
    fresh = types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)
    return torch.compile(fresh, dynamic=dynamic)


def _params(norm: torch.nn.Module) -> list[Tensor]:
    return [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None))
            if isinstance(p, Tensor) and p.requires_grad]


def _step_fn(layer, params: list[Tensor], x: Tensor, dy: Tensor, pass_: str):
    """One call as users make it: forward under no_grad, or forward + backward to the input and parameters."""
    if pass_ == "forward":
        def fwd():
            with torch.no_grad():
                return (layer(x),)
        return fwd

    xg = x.detach().requires_grad_(True)

    def fwd_bwd():
        y = layer(xg)
        return (y.detach(),) + torch.autograd.grad(y, [xg] + params, dy)
    return fwd_bwd


def _chain(fns: list):
    """One call running every function in order (a sequence case), returning all their outputs in one tuple."""
    if len(fns) == 1:
        return fns[0]
    return lambda: tuple(out for fn in fns for out in fn())


def _copy_fn(x: Tensor, dy: Tensor, pass_: str):
    if pass_ == "forward":
        return lambda: (x.clone(),)
    return lambda: (x.clone(), torch.add(x, dy))


def _oracle_outputs(ref: Reference, x: Tensor, dy: Tensor, training: bool, pass_: str) -> list[Tensor]:
    """The oracle's values in the order a contender returns them: y, then dx, dweight, dbias."""
    out = equivalence._oracle(ref, [], x, dy, training)
    keys = ["y"] + ([k for k in ("dx", "dweight", "dbias") if k in out] if pass_ == "forward_backward" else [])
    return [out[k] for k in keys]


def _compile_counts(name: str, fn, graphs: int, zoo_before: dict) -> dict:
    """Compiles of a sequence case's first pass (just run), then of a second, warm pass (run here): dynamo graphs
    for torch_compiled; normzoo's kernel cache deltas (a warm pass that compiles again is a cliff)."""
    def delta(before):
        if name == "torch_compiled":
            return {"graphs": dynamo_counters["stats"]["unique_graphs"] - before}
        now = compiling.cache_info()
        return {"graphs": now["compiles"] - before["compiles"], "evictions": now["evictions"] - before["evictions"],
                "seconds": round(now["compile_seconds"] - before["compile_seconds"], 3),
                "compile_disabled_reason": now["compile_disabled_reason"]}

    first = delta(graphs if name == "torch_compiled" else zoo_before)
    mid = dynamo_counters["stats"]["unique_graphs"] if name == "torch_compiled" else compiling.cache_info()
    fn()
    warm = delta(mid)
    out = {"first_pass": first.pop("graphs"), "warm_pass": warm["graphs"]}
    if name == "torch_compiled":
        out["recompile_limit"] = torch._dynamo.config.recompile_limit
    if name == "normzoo":
        out.update(compile_seconds=first["seconds"], evictions=first["evictions"] + warm["evictions"],
                   compile_disabled_reason=warm["compile_disabled_reason"])
    return out


def _fill_store(zoo, inputs, pass_: str) -> float:
    """NORMZOO_COMPILE=1 (the default policy, set explicitly for a sweep): build the case's kernels into the store
    before the first call, so that the sweep times the store's kernels as a warm process gets them (not the eager
    engine that serves calls while a build is under way). Returns the seconds the builds took (0 when the store held
    them)."""
    import time

    from ..precompile import build_jobs, jobs_for  # (the package's `precompile` is the function)

    start = time.perf_counter()
    for x, _ in inputs:
        example = x.detach().requires_grad_(pass_ == "forward_backward")
        failed = build_jobs(jobs_for(zoo, example, grad=pass_ == "forward_backward"), progress=False)["failed"]
        if failed:
            raise RuntimeError(f"building the store's kernels failed: {next(iter(failed.values()))}")
    return round(time.perf_counter() - start, 1)


def _time_first(fn, device: str):
    import time

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


_tag = 0


def run_case(case: Case, threads: int, blocks: int = 5, device: str = "cpu") -> dict:
    global _tag
    _tag += 1
    torch.set_num_threads(threads)
    dtype = DTYPES[case.dtype]
    fmt = memory_format(case.layout, len(case.shape))
    gen = torch.Generator().manual_seed(0)
    shapes = case.sequence or (case.shape,)
    inputs = [tuple(torch.randn(shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
                    for _ in range(2)) for shape in shapes]  # (x, dy) per shape
    training = case.mode == "train"

    zoo = case.build(device, compile=True).to(dtype).train(training)
    ref = Reference(zoo, dtype)  # the float64 oracle, from the state every contender starts with
    eager = torch_counterpart(zoo, len(case.shape)).train(training)
    compiled_module = torch_counterpart(zoo, len(case.shape)).train(training)
    # a sequence is compiled as users compile a model fed changing shapes: torch.compile's default dynamic=None
    torch_compiled = _compiled(compiled_module, _tag, **({"dynamic": None} if case.sequence else {}))
    layers = {"torch": (eager, norm_of(eager)), "torch_compiled": (torch_compiled, norm_of(compiled_module)),
              "normzoo": (zoo, zoo)}
    fns = {name: _chain([_step_fn(layer, _params(norm), x, dy, case.pass_) for x, dy in inputs])
           for name, (layer, norm) in layers.items()}
    fns["copy"] = _chain([_copy_fn(x, dy, case.pass_) for x, dy in inputs])

    first, compile_s, compiles = {}, {}, {}
    notes = []
    store_build_s = _fill_store(zoo, inputs, case.pass_) if policy.mode() == "background" and device == "cpu" else None
    for name, fn in fns.items():
        graphs, zoo_before = dynamo_counters["stats"]["unique_graphs"], compiling.cache_info()
        try:
            first[name], seconds = _time_first(fn, device)
        except Exception as err:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
            notes.append(f"{name} raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        if name in ("torch_compiled", "normzoo"):
            compile_s[name] = round(seconds, 3)
            if case.sequence:
                compiles[name] = _compile_counts(name, fn, graphs, zoo_before)

    # every norm must agree with torch eager before it is timed: within twice the tolerance (both round), or,
    # where torch eager itself is off, within the tolerance of the float64 oracle. The tolerance grows with
    # log2(numel): the gradient sums here run over up to millions of terms (equivalence sweeps use small shapes)
    tol = case.tolerance * max(1.0, math.log2(max(x.numel() for x, _ in inputs)))
    agree, oracle = {}, None
    for name in ("torch_compiled", "normzoo"):
        if name in first and "torch" in first:
            agree[name] = max(rel_err(a, b) for a, b in zip(first[name], first["torch"]))
            if agree[name] <= 2 * tol:
                continue
            if oracle is None:
                oracle = [o for x, dy in inputs for o in _oracle_outputs(ref, x, dy, training, case.pass_)]
            off = max(rel_err(a, b) for a, b in zip(first[name], oracle))
            if off <= tol:
                notes.append(f"torch eager is off (by {rp.sci(agree[name])}); {name} is within {rp.sci(tol)} "
                             f"of the float64 oracle")
            else:
                notes.append(f"{name} disagrees with torch (error {rp.sci(agree[name])} > {rp.sci(2 * tol)}) and "
                             f"with the float64 oracle ({rp.sci(off)}): not timed")
                del first[name]
    timed = [n for n in CONTENDERS if n in first]

    timers = {n: benchmark.Timer(stmt="fn()", globals={"fn": fns[n]}, num_threads=threads) for n in timed}
    number = {}
    for n in timed:  # calibrate: calls per block of about BLOCK_S (the faster of two calls: noise only slows)
        t = min(timers[n].timeit(1).median for _ in range(2))
        number[n] = max(1, int(BLOCK_S / max(t, 1e-7)))
    samples: dict[str, list[float]] = {n: [] for n in timed}
    for b in range(blocks):  # interleaved, and rotated so no contender always runs first
        for n in timed[b % len(timed):] + timed[:b % len(timed)]:
            samples[n].append(timers[n].timeit(number[n]).median)

    def quartiles(v):
        return statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3

    times_ms = {n: None for n in CONTENDERS}
    spread, blocks_ms = {}, {}
    for n in timed:
        q1, med, q3 = quartiles(samples[n])
        times_ms[n] = med * 1e3
        spread[n] = (q3 - q1) / med if med > 0 else 0.0
        blocks_ms[n] = [s * 1e3 for s in samples[n]]
    nbytes = sum(TRAFFIC[case.pass_] * x.numel() * x.element_size() for x, _ in inputs)
    gbps = {n: (nbytes / (t * 1e-3) / 1e9 if t else None) for n, t in times_ms.items()}

    def div(a, b):
        return times_ms[a] / times_ms[b] if times_ms[a] and times_ms[b] else None

    seq = {}
    if case.sequence:
        zc = compiles.get("normzoo", {})
        distinct = len(set(shapes))
        seq = {"shapes": [list(s) for s in shapes], "compiles": compiles,
               "no_eager_fallback": bool(zc) and compiling.compile_enabled() and zc["first_pass"] <= distinct
               and zc["warm_pass"] == 0 and zc["evictions"] == 0}
        tc = compiles.get("torch_compiled")
        if tc:
            notes.append(f"torch.compile (dynamic=None) compiled {tc['first_pass']} graphs for {distinct} shapes "
                         f"and {tc['warm_pass']} on a second pass (dynamo recompiles when a size changes, marking "
                         f"it dynamic; past {tc['recompile_limit']} graphs per code object it runs eager)")
        if not seq["no_eager_fallback"]:
            notes.append(f"normzoo compiles {zc}: not one kernel per shape, or an eager fallback")
    return {
        "layer": case.layer,
        "family": case.family,
        "type": case.spec_dict["type"],
        "activation": case.spec_dict.get("activation"),
        "shape": f"seq of {len(shapes)}" if case.sequence else list(case.shape),
        **seq,
        "dtype": case.dtype,
        "layout": case.layout,
        "mode": case.mode,
        "pass": case.pass_,
        "threads": threads,
        "device": device,
        "times_ms": times_ms,
        "spread": spread,
        "gbps": gbps,
        "ratio": div("normzoo", "torch"),
        "ratio_compiled": div("normzoo", "torch_compiled"),
        "floor_x": div("normzoo", "copy"),
        "compile_s": compile_s,
        "store_build_s": store_build_s,
        "agreement": agree,
        "bytes": nbytes,
        "blocks_ms": blocks_ms,
        "calls_per_block": number,
        "note": "; ".join(notes) or None,
    }


def build_report(sweep: Sweep, results: list[dict], interrupted: bool, device: str, env: dict | None = None) -> dict:
    ratios = [r["ratio"] for r in results if r["ratio"]]
    geo = statistics.geometric_mean(ratios) if ratios else None
    return {
        "kind": "speed",
        "source": sweep.source,
        "environment": env or rp.environment(device, sweep.threads),
        "summary": {"cases": len(results), "blocks": sweep.blocks,
                    "ratio_geomean": round(geo, 3) if geo else None,
                    "faster": sum(1 for r in ratios if r < 1), "slower": sum(1 for r in ratios if r >= 1),
                    "not_timed": sum(1 for r in results if r["times_ms"]["normzoo"] is None)},
        "method": "median ms per call over blocks (torch.utils.benchmark, contenders interleaved); ratio = normzoo / "
                  "torch eager; floor_x = normzoo / copy; GB/s of the minimal traffic (forward: read x, write y; "
                  "backward adds read x, dy, write dx); compile_s = first call",
        "notes": list(sweep.notes) + [f"{r['layer']} {format_shape(r['shape'])} {r['dtype']} {r['pass']}: {r['note']}"
                                      for r in results if r.get("note")],
        "cases": results,
    }


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


PASS_SHORT = {"forward": "fwd", "forward_backward": "fwd+bwd"}
COLUMNS = [
    rp.Column("layer", lambda c: c["layer"][:12]),
    rp.Column("shape", lambda c: format_shape(c["shape"])),
    rp.Column("dtype", lambda c: rp.short_dtype(c["dtype"])),
    rp.Column("lay", lambda c: "cl" if c["layout"] == "channels_last" else "c"),
    rp.Column("pass", lambda c: PASS_SHORT[c["pass"]] + (" ev" if c["mode"] == "eval" else "")),
    rp.Column("thr", lambda c: str(c["threads"]), "right"),
    rp.Column("torch\nms", lambda c: _ms(c["times_ms"]["torch"]), "right"),
    rp.Column("compiled\nms", lambda c: _ms(c["times_ms"]["torch_compiled"]), "right"),
    rp.Column("normzoo\nms", lambda c: _ms(c["times_ms"]["normzoo"]), "right"),
    rp.Column("copy\nms", lambda c: _ms(c["times_ms"]["copy"]), "right"),
    rp.Column("spread\nzoo", lambda c: f"{100 * c['spread']['normzoo']:.0f}%" if "normzoo" in c["spread"] else "-",
              "right"),
    rp.Column("ratio\nzoo/t", lambda c: _x(c["ratio"]), "right"),
    rp.Column("ratio\nzoo/comp", lambda c: _x(c["ratio_compiled"]), "right"),
    rp.Column("floor_x\nzoo/copy", lambda c: _x(c["floor_x"]), "right"),
    rp.Column("zoo\nGB/s", lambda c: _x(c["gbps"]["normzoo"]) if c["gbps"]["normzoo"] else "-", "right"),
    rp.Column("compile s\nzoo/comp", lambda c: "/".join(f"{c['compile_s'].get(k, 0):.1f}"
                                                         for k in ("normzoo", "torch_compiled")), "right"),
]


def label(item) -> str:
    case, threads = item
    return f"{case.layer} {format_shape(case.shape)} {case.dtype} {case.layout} {case.pass_} {case.mode} t{threads}"


def run(sweep: Sweep, on_update=lambda report: None, progress: rp.Progress | None = None,
        device: str = "cpu") -> tuple[dict, bool]:
    """Run every (case, thread count); returns (report, interrupted). Restores torch's thread count."""
    policy.sync_by_default()
    before = torch.get_num_threads()
    items = [(c, t) for t in sweep.threads for c in sweep.cases]
    env = rp.environment(device, sweep.threads)  # once, at the start: the date and load the sweep began with
    try:
        return rp.drive(items, lambda item: run_case(item[0], item[1], sweep.blocks, device),
                        lambda res, intr: build_report(sweep, res, intr, device, env), on_update,
                        label=label, progress=progress)
    finally:
        torch.set_num_threads(before)


def exit_status(report: dict) -> int:
    """1 if a contender disagreed with torch (it was not timed), else 0."""
    return 1 if any("disagrees" in (c.get("note") or "") for c in report["cases"]) else 0


def plot(report: dict, path: str) -> None:
    """A PNG bar chart of normzoo / torch per case (log scale; 1 = parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cases = [c for c in report["cases"] if c["ratio"]]
    names = [f"{c['layer']} {format_shape(c['shape'])} {rp.short_dtype(c['dtype'])} "
             f"{'cl' if c['layout'] == 'channels_last' else 'c'} {PASS_SHORT[c['pass']]}"
             f"{' eval' if c['mode'] == 'eval' else ''} t{c['threads']}" for c in cases]
    ratios = [c["ratio"] for c in cases]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(cases) + 1.5))
    # bars grow from parity (1) to the ratio, left for faster, right for slower
    ax.barh(range(len(cases)), [r - 1 for r in ratios], left=1,
            color=["tab:green" if r < 1 else "tab:red" for r in ratios])
    ax.set_yticks(range(len(cases)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("time normzoo / torch eager (lower is better; < 1: normzoo faster)")
    env = report["environment"]
    ax.set_title(f"normzoo speed, {env['date']}, torch {env['torch']}, {env['device']}, threads {env['threads']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
