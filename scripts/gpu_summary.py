"""Summarize a scripts/gpu_check.sh run: the machine, each step's exit status and time, the CUDA tests' counts,
the equivalence verdicts and the speed targets of issue 11, read from the files the run wrote. Numbers come only
from those files; a missing file is reported as missing.

    python scripts/gpu_summary.py DIR --device cuda [--tag cuda]

Writes DIR/gpu_check_summary_TAG.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TARGETS = {"group_norm": 0.8, "layer_norm": 1.0}  # geometric mean of normzoo / torch eager, at most
FUSED_SPEEDUP = 1.3  # gn32_silu against GroupNorm then SiLU, at least


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(path: Path) -> list[str]:
    rows = ["| step | exit | seconds | limit s |", "|---|---|---|---|"]
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ["steps file missing"]
    for line in lines:
        name, rc, secs, limit = (line.split("\t") + ["", "", "", ""])[:4]
        note = {"124": " (timed out)", "130": " (interrupted at its limit)", "137": " (killed)"}.get(rc, "")
        rows.append(f"| {name} | {rc}{note} | {secs} | {limit} |")
    return rows


def _tests(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no junit file (the tests step did not finish)"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    passed = a["tests"] - a["failures"] - a["errors"] - a["skipped"]
    out = f"{passed} passed, {a['failures']} failed, {a['errors']} errors, {a['skipped']} skipped"
    if a["tests"] and a["skipped"] == a["tests"]:
        out += " (ALL skipped: nothing ran on the device; see the skip reasons in the tests log)"
    return out + "".join(f"\n  - FAILED {f}" for f in failed)


def _equivalence(report) -> list[str]:
    if report is None:
        return ["no equivalence report"]
    s = report["summary"]
    out = [f"From `{report.get('source')}`: {s['cases']} cases: {s['pass']} PASS, {s['torch_off']} TORCH-OFF, "
           f"{s['fail']} FAIL"
           + (" (interrupted: a partial run)" if any("interrupted" in n for n in report.get("notes", [])) else "")]
    for c in report["cases"]:
        if c["verdict"] == "FAIL":
            out.append(f"  - FAIL {c['layer']} {c['shape']} {c['dtype']} {c['layout']} off={c['offset']} {c['mode']} "
                       f"compiled={c['compiled']}: out {c['err_zoo']}, grad {c['grad_err_zoo']}, "
                       f"tol {c['tolerance']:.2e}{'; ' + c['note'] if c.get('note') else ''}")
    return out


def _geo(values):
    return statistics.geometric_mean(values) if values else None


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _speed(report) -> list[str]:
    if report is None:
        return ["no speed report"]
    cases = report["cases"]
    out = [f"From `{report.get('source')}`; ratios are normzoo / torch eager (below 1: normzoo faster), geometric "
           f"means over the timed cases.", "",
           "| target | pass | cases timed | geomean | target | met |", "|---|---|---|---|---|---|"]
    for family, target in TARGETS.items():
        for pass_ in ("forward", "forward_backward"):
            rs = [c["ratio"] for c in cases if c["type"] == family
                  and not c.get("activation") and c["pass"] == pass_ and c["ratio"]]
            g = _geo(rs)
            out.append(f"| {family} | {pass_} | {len(rs)} | {_fmt(g)} | <= {target} | "
                       f"{'-' if g is None else ('yes' if g <= target else 'NO')} |")
    fused = [c for c in cases if c["type"] == "group_norm" and c.get("activation") == "silu" and c["ratio"]]
    g = _geo([1 / c["ratio"] for c in fused])
    out.append(f"| fused GroupNorm + SiLU: speedup over GroupNorm then SiLU (torch / normzoo) | both | {len(fused)} | "
               f"{_fmt(g)} | >= {FUSED_SPEEDUP} | {'-' if g is None else ('yes' if g >= FUSED_SPEEDUP else 'NO')} |")
    out += ["", "| layer | shape | dtype | layout | pass | torch ms | compiled ms | normzoo ms | normzoo/torch | "
                "normzoo/compiled |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        t = c["times_ms"]
        out.append(f"| {c['layer']} | {c['shape']} | {c['dtype']} | {c['layout']} | {c['pass']} | "
                   f"{_fmt(t['torch'], 3)} | {_fmt(t['torch_compiled'], 3)} | {_fmt(t['normzoo'], 3)} | "
                   f"{_fmt(c['ratio'])} | {_fmt(c['ratio_compiled'])} |")
    untimed = [c for c in cases if c["times_ms"]["normzoo"] is None]
    if untimed:
        out.append("")
        out += [f"- not timed: {c['layer']} {c['shape']} {c['dtype']} {c['pass']}: {c.get('note')}" for c in untimed]
    if any("interrupted" in n for n in report.get("notes", [])):
        out.append("- the speed sweep was interrupted at its time limit: a partial run")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tag", help="file name suffix (default: the device)")
    args = ap.parse_args(argv)
    d, tag = Path(args.dir), args.tag or args.device
    env = _load(d / f"env_{tag}.json") or {}
    lines = [f"# normzoo GPU check: {tag}", "",
             f"Device {args.device}: {env.get('gpu') or env.get('device') or 'unknown'}; torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, triton {env.get('triton')}, python {env.get('python')}; "
             f"{env.get('date', '')}.", "",
             "## Steps", "", *_steps(d / f"steps_{tag}.tsv"), "",
             "## CUDA tests (pytest -m cuda)", "", _tests(d / f"cuda_tests_{tag}.xml"), "",
             "## Equivalence", "", *_equivalence(_load(d / f"equivalence_{tag}.json")), "",
             "## Speed and the issue 11 targets", "", *_speed(_load(d / f"speed_{tag}.json")),
             ""]
    text = "\n".join(lines)
    (d / f"gpu_check_summary_{tag}.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
