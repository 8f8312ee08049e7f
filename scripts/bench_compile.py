"""What compiling costs a user: first steps, new batch sizes, new resolutions, many sequence lengths.

    python scripts/bench_compile.py [--threads 2] [--workloads resnet18_gn,ln_lengths,user_compile]
                                    [--format table|markdown|json] [--output PATH] [--quick]

Each workload runs in a fresh process, twice: on cold caches (a new, empty TORCHINDUCTOR_CACHE_DIR and
NORMZOO_KERNEL_DIR) and then warm (the same directories, a second process). normzoo runs with its default policy
(NORMZOO_COMPILE=1: the kernel store, the eager engine while a background builder fills it; a cold process then waits
at its end until the builder is done, reported as "store ready s") and, for resnet18_gn, with NORMZOO_COMPILE=sync
(the blocking in-memory compile). Workloads, each for torch.nn and for normzoo layers:

- resnet18_gn: a ResNet-18-like net (scripts/bench_models.py) with GroupNorm(32), SGD training steps on
  8x3x128x128: the first step, the median steady step, then one step at batch 6 (a new batch size) and one at
  96x96 (a new resolution); "extra" is a step's time minus the steady step.
  Also a GroupNorm(32, 160), a channel count the net does not have: its first forward + backward minus its second.
- resnet18_gn again, warm, in a process with another thread count (1 for 2, else 2): the cache must still hit.
- ln_lengths: LayerNorm(384) forward + backward on 4 x L x 384 for 100 distinct L (7..106), timed as a whole, and
  a steady pass over the same lengths.
- user_compile: the same ResNet-18-like GroupNorm(32) net inside the user's own torch.compile (the whole training
  step's forward and backward), first step and steady step.

Reported with the kernels compiled (normzoo.compiling.cache_info()) and the CPU model, ISA and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(workload: str, lib: str, threads: int, quick: bool) -> dict:
    """Runs in the fresh process: one workload with one library's layers."""
    import statistics

    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    import bench_models as bm  # noqa: E402  (the model stand-ins)
    import normzoo

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    out: dict = {"workload": workload, "lib": lib}
    os.environ.pop("NORMZOO_COMPILE", None)  # this benchmark measures the default policy (or sync, below)
    if lib == "normzoo-sync":
        os.environ["NORMZOO_COMPILE"] = "sync"
    if workload in ("resnet18_gn", "user_compile"):
        size, batch = (64, 4) if quick else (128, 8)
        norm = (lambda c: nn.GroupNorm(32, c)) if lib == "torch" else (lambda c: normzoo.GroupNorm(32, c))
        width = 32 if quick else 64
        model = bm.ResNet(bm.BasicBlock, [1, 1, 1, 1] if quick else [2, 2, 2, 2], norm, base_width=width)
        run_model = torch.compile(model) if workload == "user_compile" else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(n, s):
            x, y = torch.randn(n, 3, s, s), torch.randint(0, 100, (n,))
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(run_model(x), y).backward()
            opt.step()
            return time.perf_counter() - start

        out["first_s"] = step(batch, size)
        out["steady_s"] = statistics.median(step(batch, size) for _ in range(3 if quick else 5))
    if workload == "resnet18_gn":
        out["new_batch_s"] = step(batch - 2, size)
        out["new_resolution_s"] = step(batch, size * 3 // 4)
        extra = nn.GroupNorm(32, 160) if lib == "torch" else normzoo.GroupNorm(32, 160)
        xc = torch.randn(batch, 160, size // 4, size // 4, requires_grad=True)
        calls = []
        for _ in range(2):
            start = time.perf_counter()
            extra(xc).sum().backward()
            calls.append(time.perf_counter() - start)
        out["new_channels_extra_s"] = calls[0] - calls[1]
    elif workload == "ln_lengths":
        d = 64 if quick else 384
        layer = nn.LayerNorm(d) if lib == "torch" else normzoo.LayerNorm(d)
        lengths = range(7, 17 if quick else 107)

        def sweep():
            start = time.perf_counter()
            for L in lengths:
                x = torch.randn(4, L, d, requires_grad=True)
                layer(x).square().sum().backward()
            return time.perf_counter() - start

        out["lengths"] = len(lengths)
        out["first_s"] = sweep()
        out["steady_s"] = sweep()
    if lib != "torch":
        info = normzoo.cache_info()
        out["compiles"], out["compile_s"] = info["compiles"], info["compile_seconds"]
        out["store_loaded"], out["eager_calls"] = info["store_loaded"], info["eager_interim_calls"]
        if info["store_requested"]:  # wait for the background builder: the store is then ready for the next process
            while normzoo.cache_info()["background"]["pending"] and time.perf_counter() - started < 1800:
                time.sleep(0.5)
            out["store_ready_s"] = time.perf_counter() - started
            out["store_failed"] = len(normzoo.cache_info()["background"]["failed"])
    return out


WORKLOADS = ("resnet18_gn", "ln_lengths", "user_compile")


def run(threads: int, quick: bool, workloads=WORKLOADS) -> dict:
    import torch

    sys.path.insert(0, str(HERE.parent))
    from normzoo.sweeps import report as rp

    env = rp.environment("cpu", threads)
    env["isa"] = torch.backends.cpu.get_cpu_capability()
    rows = []
    other = 1 if threads != 1 else 2
    for workload in workloads:
        for lib in ("torch", "normzoo") + (("normzoo-sync",) if workload == "resnet18_gn" else ()):
            with tempfile.TemporaryDirectory(prefix="normzoo-cache-") as cache:
                states = [("cold", threads), ("warm", threads)]
                if workload == "resnet18_gn":
                    states.append((f"warm, {other} thread{'s' if other > 1 else ''}", other))
                for cache_state, n_threads in states:
                    cmd = [sys.executable, __file__, "--child", workload, lib, str(n_threads)] + (["--quick"] if quick else [])
                    child_env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache,
                                     NORMZOO_KERNEL_DIR=os.path.join(cache, "normzoo-kernels"))
                    child_env.pop("NORMZOO_COMPILE", None)
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{workload}/{lib}/{cache_state} failed:\n{proc.stderr[-3000:]}")
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                    row["cache"] = cache_state
                    rows.append(row)
                    print(f"{workload} {lib} {cache_state}: {row}", file=sys.stderr, flush=True)
    return {"environment": env, "rows": rows}


def render(report: dict, fmt: str) -> str:
    from tabulate import tabulate

    if fmt == "json":
        return json.dumps(report, indent=2)
    env = report["environment"]
    head = (f"{env.get('cpu')} ({env.get('isa')}), {env.get('threads')} threads, torch {env.get('torch')}, "
            f"{env.get('date')}")
    table = []
    for r in report["rows"]:
        extra = lambda k: None if k not in r else round(r[k] - r["steady_s"], 2)  # noqa: E731
        table.append([r["workload"], r["lib"], r["cache"], round(r["first_s"], 2), round(r["steady_s"], 3),
                      extra("first_s"), extra("new_batch_s"), extra("new_resolution_s"),
                      None if "new_channels_extra_s" not in r else round(r["new_channels_extra_s"], 2),
                      r.get("compiles", ""), r.get("store_loaded", ""),
                      None if "store_ready_s" not in r else round(r["store_ready_s"], 1)])
    cols = ["workload", "layers", "cache", "first s", "steady s", "first extra s", "new batch extra s",
            "new resolution extra s", "new channel count extra s", "graphs compiled in memory",
            "kernels loaded from the store", "store ready s"]
    return head + "\n\n" + tabulate(table, cols, tablefmt="github" if fmt == "markdown" else "simple")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    ap.add_argument("--output")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of " + ", ".join(WORKLOADS))
    ap.add_argument("--child", nargs=3, metavar=("WORKLOAD", "LIB", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], int(args.child[2]), args.quick)))
        return 0
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or not workloads:
        ap.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    text = render(run(args.threads, args.quick, workloads), args.format)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
