"""Run an equivalence sweep (default: the embedded configs/equivalence.yaml) and write reports/equivalence.md
(and .json), the evidence the README links to.

    python scripts/write_equivalence_report.py [CONFIG] [--out reports/equivalence] [--device cpu|cuda]

Exit status as `normzoo equivalence`: 0 no FAIL, 1 a FAIL, 2 a bad sweep file.
"""

from __future__ import annotations

import sys

from _sweep_report import generated_by, load_and_run

from normzoo.sweeps import equivalence
from normzoo.sweeps import report as rp

HOW_TO_READ = """\
Each row is one case: a layer, an input shape, dtype, layout (c: contiguous, cl: channels_last), offset (added to a
standard-normal input; 1e2 and 1e3 probe cancellation), mode, and whether normzoo ran its compiled kernels (comp).
`out`, `grad` and `stats` are errors against a float64 oracle (the same math in float64, two-pass, written apart
from normzoo's engine): the output, the worst of the input and parameter gradients for a fixed random upstream
gradient, and (BatchNorm in train mode) the worst running statistic after 3 steps; each is
max|got - oracle| / max|oracle|, for normzoo (zoo) and for torch.nn (torch).

`tol` = base(dtype) * (1 + eps(compute)/eps(dtype) * |mean(x)|/std(x)), base = 16 * eps(dtype), compute = float32
for float16/bfloat16 (torch's CPU and CUDA kernels and normzoo do their arithmetic there): rounding to the dtype, plus
the unavoidable cost of x - mean in the compute precision.

Verdicts: PASS, normzoo within `tol`; TORCH-OFF, normzoo within and torch outside (a finding about torch, not a
failure); FAIL, normzoo outside (or it raised)."""


def main(argv=None) -> int:
    run = load_and_run("equivalence", equivalence, __doc__, argv, "path stem: writes STEM.md and STEM.json",
                       "where the layers run; the float64 oracle runs on the CPU from the same inputs")
    if run is None:
        return 2
    args, sweep, stem, report, interrupted = run
    env = report["environment"]
    off = dict(report, cases=[c for c in report["cases"] if c["verdict"] != "PASS"], notes=[])
    text = "\n".join([
        "# normzoo equivalence report",
        "",
        f"{generated_by('equivalence', args, sweep, env)}), {env['threads']} threads. The script also writes "
        f"{stem.name}.json (every number, not committed).",
        "",
        f"**{rp.summary_line(report)}**",
        "",
        "## How to read it",
        "",
        HOW_TO_READ,
        "",
        "## Cases that are not a plain PASS",
        "",
        rp.render(off, "markdown", equivalence.COLUMNS, preamble=False) if off["cases"] else "None.\n",
        "## All cases",
        "",
        rp.render(report, "markdown", equivalence.COLUMNS),
    ])
    rp.write(stem.with_suffix(".md"), text)
    print(f"{rp.summary_line(report)}; wrote {stem}.md and {stem}.json")
    return 130 if interrupted else equivalence.exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
