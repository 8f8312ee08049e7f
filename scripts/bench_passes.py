"""Passes over memory per kernel: normzoo's compiled forward and backward next to ATen's kernels and the copy floor.

For each case it compiles normzoo's engine functions (the graphs normzoo's kernels are made of, with static shapes),
reads the generated C++ and counts, per parallel loop nest, the full-size inputs it reads (x; x and dy for a
backward): each is a pass over that tensor in memory unless an earlier nest left it in cache. Nests that walk under
half as many elements as x has (the shift: the first 16 elements of each set) are left out. Then it times, in
this process and alternated, normzoo's in-memory kernel called directly (what a layer runs under
NORMZOO_COMPILE=sync, no autograd), ATen's kernel (torch.ops.aten.native_*), and the copy floor: a clone of x for a
forward (read one tensor, write one), x + dy for a backward (read two, write one).

    python scripts/bench_passes.py [--threads 1] [--repeat 5] [--cases ln768,gn32] [--output passes.md]

Prints a markdown table (times in ms, the median of --repeat rounds of each round's fastest of 10 calls) with the
CPU model and thread count. A study, not a test: the numbers move with the machine and its load.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from normzoo import compiling, engine  # noqa: E402
from normzoo.sweeps.report import environment  # noqa: E402

# name -> (label, spec, input shape, memory format)
CASES = {
    "ln768": ("LayerNorm(768) 8x197x768", engine.NormSpec(groups=None, eps=1e-5, dims=(-1,)), (8, 197, 768), None),
    "ln1024": ("LayerNorm(1024) 4x1024x1024", engine.NormSpec(groups=None, eps=1e-5, dims=(-1,)), (4, 1024, 1024),
               None),
    "ln2dcl": ("LayerNorm2d(96) 8x96x56x56 channels_last", engine.NormSpec(groups=None, eps=1e-6, dims=(1,)),
               (8, 96, 56, 56), torch.channels_last),
    "gn32": ("GroupNorm(32) 8x64x56x56", engine.NormSpec(groups=32, eps=1e-5), (8, 64, 56, 56), None),
    "gn32cl": ("GroupNorm(32) 8x256x28x28 channels_last", engine.NormSpec(groups=32, eps=1e-5), (8, 256, 28, 28),
               torch.channels_last),
    "bn": ("BatchNorm2d train 8x256x28x28", engine.NormSpec(groups=256, eps=1e-5, batch=True), (8, 256, 28, 28),
           None),
    "bncl": ("BatchNorm2d train 8x256x28x28 channels_last", engine.NormSpec(groups=256, eps=1e-5, batch=True),
             (8, 256, 28, 28), torch.channels_last),
    "in": ("InstanceNorm2d 1x64x128x128", engine.NormSpec(groups=64, eps=1e-5), (1, 64, 128, 128), None),
}


def full_size_reads(codes: list[str], shape: tuple[int, ...]) -> list[int]:
    """Per parallel loop nest, over every generated kernel in order, how many of the graph's inputs of the full
    `shape` (x, dy) it reads. The inputs are told apart by the wrapper's assert_size_stride(argN_1, shape, ...); each
    kernel's in_ptr bound to them at its call site; a nest reads one if its body names that pointer."""
    reads = []
    size = "(" + ", ".join(str(n) for n in shape) + ")"
    for code in codes:
        full = set(re.findall(rf"assert_size_stride\((arg\d+_1), {re.escape(size)}", code))
        calls = list(re.finditer(r"\n\s*(cpp_fused\w*)\(([^)]*)\)", code))
        if calls and not full:  # a count of 0 must mean no reads, not code this parser does not understand
            raise RuntimeError(f"no input of shape {size} found in the generated code (its format changed?)")
        for match in calls:
            name, call_args = match.group(1), [a.strip() for a in match.group(2).split(",")]
            body = re.search(rf"{name} = async_compile\.cpp_pybinding\((.*?)'''\)", code, re.S)
            if body is None:
                raise RuntimeError(f"kernel {name} is called but its C++ was not found in the generated code")
            signature, kernel = body.group(1).split("kernel(", 1)[1].split(")", 1)
            params = [p.split()[-1].strip("*") for p in signature.split(",")]
            pointers = [p for p, a in zip(params, call_args) if a in full]
            if pointers and "#pragma omp for" not in kernel:  # serial loops: their nests are not told apart here
                raise RuntimeError(f"kernel {name} reads a full-size input outside any parallel loop nest")
            for part in kernel.split("#pragma omp for")[1:]:
                if _elements(part) * 2 < math.prod(shape):  # a few elements of each set: the shift's, not a pass
                    continue
                reads.append(sum(bool(re.search(rf"\b{p}\b", part)) for p in pointers))
    return reads


def _elements(nest: str) -> float:
    """How many elements a loop nest walks: the product, over its loop variables, of each one's largest bound (an
    expression that is not a number counts as unbounded)."""
    bounds: dict[str, float] = {}
    for var, bound in re.findall(r"for\(int64_t (x\d+)=[^;]*; \1<static_cast<int64_t>\(([^;]*)\); ", nest):
        value = float(bound[:-1]) if re.fullmatch(r"\d+L", bound) else float("inf")
        bounds[var] = max(bounds.get(var, 0.0), value)
    return math.prod(bounds.values())


def generated_code(fn, *args) -> list[str]:
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    engine.load_ops()
    # as normzoo compiles (dynamic threads: the omp pragmas are emitted), and with the graph caches off: a graph
    # loaded from them would come without its code
    with inductor_config.patch({**engine.INDUCTOR_CONFIGS, "fx_graph_cache": False}), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _, codes = run_and_get_code(torch.compile(fn, dynamic=False, fullgraph=True), *args)
    return codes


def best_of(fn, calls: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def aten_calls(spec: engine.NormSpec, x, w, b, dy):
    """ATen's forward and backward kernels for the case, as zero-argument callables."""
    if spec.groups is None and spec.dims == (1,):  # LayerNorm2d: ATen's over the channels moved last (permute)
        xp, dyp = x.permute(0, 2, 3, 1), dy.permute(0, 2, 3, 1)  # views; contiguous where x is channels_last
        return aten_calls(engine.NormSpec(groups=None, eps=spec.eps, dims=(-1,)), xp, w, b, dyp)
    if spec.groups is None:
        n = x.shape[-1]
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], w, b, spec.eps)
        return (lambda: torch.ops.aten.native_layer_norm(x, [n], w, b, spec.eps),
                lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b, [True] * 3))
    N, C = x.shape[:2]
    HxW = x[0, 0].numel()
    if spec.batch:
        rm, rv = torch.zeros(C), torch.ones(C)
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.0, spec.eps)
        return (lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.0, spec.eps),
                lambda: torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, save_mean, save_invstd, True,
                                                                  spec.eps, [True] * 3))
    G = spec.groups
    _, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, N, C, HxW, G, spec.eps)
    return (lambda: torch.ops.aten.native_group_norm(x, w, b, N, C, HxW, G, spec.eps),
            lambda: torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, w, N, C, HxW, G, [True] * 3))


def run_case(label, spec, shape, memory_format, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(shape)
    dy = torch.randn(shape)
    if memory_format is not None:
        x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    affine = (shape[spec.dims[0]],) if spec.groups is None else (shape[1],)
    w, b = torch.randn(affine), torch.randn(affine)
    needs = (True, True, True)

    fwd_codes = generated_code(lambda x, w, b: engine.forward_inference(spec, x, w, b), x, w, b)
    shift, mean_d, rstd = engine.forward_inference(spec, x, w, b)[1:]
    bwd_codes = generated_code(lambda x, w, b, shift, mean_d, rstd, dy: engine.backward(
        spec, needs, x, w, b, shift, mean_d, rstd, dy), x, w, b, shift, mean_d, rstd, dy)

    tensors = (x, w, b, None, None, None)
    kernel = compiling.kernel_of(spec, tensors)
    if kernel is None:
        raise SystemExit("compilation is off (NORMZOO_COMPILE=0, or no C++ compiler): nothing to measure")
    stats = kernel.forward(tensors)[1:]
    bwd_args = (x, w, b) + tuple(stats) + (dy,)
    aten_fwd, aten_bwd = aten_calls(spec, x, w, b, dy)
    timed = {
        "forward": (lambda: kernel.forward(tensors), aten_fwd, lambda: x.clone()),
        "backward": (lambda: kernel.backward(needs, bwd_args), aten_bwd, lambda: torch.add(x, dy)),
    }
    rows = []
    for role, (zoo, aten, floor) in timed.items():
        times: dict[str, list[float]] = {"zoo": [], "aten": [], "floor": []}
        for _ in range(repeat):
            for name, fn in (("zoo", zoo), ("aten", aten), ("floor", floor)):
                times[name].append(best_of(fn))
        codes = fwd_codes if role == "forward" else bwd_codes
        rows.append({
            "case": label, "kernel": role,
            "reads": full_size_reads(codes, tuple(shape)),
            **{name: statistics.median(v) for name, v in times.items()},
        })
    return rows


def markdown(rows: list[dict], threads: int) -> str:
    env = environment(threads=threads)
    out = [f"{env['cpu']}, {env['isa']}, {threads} thread(s), torch {env['torch']}, {env['date']}; ms, median of "
           "rounds' best.",
           "",
           "| case | kernel | full-size reads per loop nest | normzoo | ATen | copy floor | normzoo / ATen |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        reads = " + ".join(str(n) for n in r["reads"] if n) or "0"
        out.append(f"| {r['case']} | {r['kernel']} | {reads} | {r['zoo']:.3f} | {r['aten']:.3f} | "
                   f"{r['floor']:.3f} | {r['zoo'] / r['aten']:.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.threads < 1 or args.repeat < 1:
        parser.error("--threads and --repeat must be at least 1")
    torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for name in args.cases.split(","):
            rows += run_case(*CASES[name], repeat=args.repeat)
            print(f"done: {CASES[name][0]}", file=sys.stderr, flush=True)
    table = markdown(rows, args.threads)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
