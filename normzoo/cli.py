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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normzoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the layer presets")
    p.add_argument("--format", choices=["table", "markdown"], default="table")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
