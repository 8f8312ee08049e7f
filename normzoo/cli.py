"""The `normzoo` command: list, equivalence, speed."""

from __future__ import annotations

import argparse
import sys

from tabulate import tabulate


def _cmd_list(args) -> int:
    from . import registry

    rows = registry.describe()
    print(tabulate(rows, headers="keys", tablefmt="github" if args.format == "markdown" else "simple"))
    return 0


def _fail(message: str) -> int:
    print(f"normzoo: error: {message}", file=sys.stderr)
    return 2


def _sweep(args, kind: str) -> int:
    """Shared by `equivalence` and `speed`: load (exit 2 on a bad file), run, stream the report, exit status."""
    from .sweeps import grid
    from .sweeps import report as rp

    if kind == "speed":
        from .sweeps import speed as mod
    else:
        from .sweeps import equivalence as mod
    extra = {}
    if kind == "speed":
        err = mod.check_device(args.device)
        if err:
            return _fail(err)
        if args.plot and not mod.plot_available():
            return _fail("--plot needs matplotlib: pip install 'normzoo[plot]' (or pip install matplotlib)")
        extra["device"] = args.device
    try:
        sweep = grid.load(args.config, kind)
    except grid.SweepError as err:
        return _fail(str(err))

    def on_update(report: dict) -> None:  # stream: the file always holds the finished cases
        if args.output:
            rp.write(args.output, rp.render(report, args.format, mod.COLUMNS))

    report, interrupted = mod.run(sweep, on_update=on_update, **extra)
    if args.output:
        print(f"{rp.summary_line(report)}; {args.format} report written to {args.output}")
    else:
        sys.stdout.write(rp.render(report, args.format, mod.COLUMNS))
    if kind == "speed" and args.plot:
        mod.plot(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if interrupted:
        print("normzoo: interrupted; the report holds the finished cases", file=sys.stderr)
        return 130
    return mod.exit_status(report)


def build_parser() -> argparse.ArgumentParser:
    from .sweeps.report import FORMATS

    parser = argparse.ArgumentParser(prog="normzoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the layer presets")
    p.add_argument("--format", choices=["table", "markdown"], default="table")
    p.set_defaults(func=_cmd_list)

    helps = {
        "equivalence": "the zoo and torch.nn against a float64 oracle (exit 0: no FAIL, 1: a FAIL, 2: bad input)",
        "speed": "time normzoo against torch.nn eager, torch.compile and the copy floor",
    }
    for kind, text in helps.items():
        p = sub.add_parser(kind, help=text, description=text)
        p.add_argument("config", nargs="?", default=None,
                       help=f"sweep YAML file (default: the embedded configs/{kind}.yaml)")
        p.add_argument("--format", choices=FORMATS, default="table")
        p.add_argument("--output", metavar="PATH", help="write the report here, rewritten after each case")
        if kind == "speed":
            p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
            p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios (needs matplotlib)")
        p.set_defaults(func=lambda args, kind=kind: _sweep(args, kind))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
