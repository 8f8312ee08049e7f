"""Run a speed sweep (default: the embedded configs/speed.yaml) and write reports/speed.md, .json and .png.

    python scripts/write_speed_report.py [CONFIG] [--out reports/speed] [--device cpu|cuda]

Run it on a quiet machine: the report states the date, CPU, threads and allocator settings it ran with.
"""

from __future__ import annotations

import sys

from _sweep_report import generated_by, load_and_run

from normzoo.sweeps import report as rp
from normzoo.sweeps import speed

HOW_TO_READ = """\
Times are the median per call, in ms, over interleaved timing blocks (torch.utils.benchmark); `spread` is the
interquartile range of normzoo's blocks over their median. Contenders: `torch` (torch.nn eager, native kernels,
followed by the activation for fused presets), `compiled` (torch.compile of that torch.nn layer), `normzoo` (the
layer as users get it: compiled) and `copy` (the memory-traffic floor: x.clone() for the forward, plus x + dy for
the backward). `ratio zoo/t` = normzoo / torch eager (below 1: normzoo is faster); `zoo/comp` = normzoo /
torch.compile; `floor_x` = normzoo / copy. GB/s counts the minimal traffic (forward: read x, write y; backward
adds read x and dy, write dx). `compile s` is the first call of normzoo / torch.compile (Inductor compiles there;
an FX graph cache in TORCHINDUCTOR_CACHE_DIR makes repeats fast). Before timing, each contender's output (and
gradients) must agree with torch eager; one that does not is listed with no time."""


def _kernels(env: dict) -> str:
    mode = (env.get("env") or {}).get("NORMZOO_COMPILE", "sync")
    if mode == "sync":
        return "the in-memory compile's (NORMZOO_COMPILE=sync)"
    return f"the kernel store's, built before each case's first call (NORMZOO_COMPILE={mode}), as a warm process loads them"


def busy(env: dict) -> bool:
    load = env.get("load_avg")
    return bool(load) and load[0] > (env.get("cpu_count") or 1)


def main(argv=None) -> int:
    run = load_and_run("speed", speed, __doc__, argv, "path stem: writes STEM.md, STEM.json, STEM.png")
    if run is None:
        return 2
    args, sweep, stem, report, interrupted = run
    env = report["environment"]
    png = ""
    if speed.plot_available():
        speed.plot(report, str(stem.with_suffix(".png")))
        png = f"\n![normzoo / torch per case]({stem.name}.png)\n"
    text = "\n".join([
        "# normzoo speed report",
        "",
        f"{generated_by('speed', args, sweep, env)}, {env['cpu_count']} logical CPUs), threads {env['threads']}, "
        f"allocator settings {env['allocator'] or 'none'}, "
        f"load average at the start {env.get('load_avg')}"
        f"{' (above the CPU count: other work shared the cores)' if busy(env) else ''}. "
        f"normzoo's kernels: {_kernels(env)}. "
        f"The script also writes {stem.name}.json (every number, not committed).",
        "",
        "## How to read it",
        "",
        HOW_TO_READ,
        "",
        rp.render(report, "markdown", speed.COLUMNS),
        png,
    ])
    rp.write(stem.with_suffix(".md"), text)
    print(f"{rp.summary_line(report)}; wrote {stem}.md, {stem}.json" + (f", {stem}.png" if png else ""))
    return 130 if interrupted else speed.exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
