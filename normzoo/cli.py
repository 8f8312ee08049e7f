"""The `normzoo` command: list, equivalence, speed, check, precompile."""

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
    err = grid.check_device(args.device)
    if err:
        return _fail(err)
    if kind == "speed" and args.plot and not mod.plot_available():
        return _fail("--plot needs matplotlib: pip install 'normzoo[plot]' (or pip install matplotlib)")
    try:
        sweep = grid.load(args.config, kind)
    except grid.SweepError as err:
        return _fail(str(err))

    def on_update(report: dict) -> None:  # stream: the file always holds the finished cases
        if args.output:
            rp.write(args.output, rp.render(report, args.format, mod.COLUMNS))

    report, interrupted = mod.run(sweep, on_update=on_update, device=args.device)
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


def _cmd_check(args) -> int:
    """Load the user's layer (runs its file), check it against the oracle of --like; 0 match, 1 not, 2 bad input."""
    import importlib

    from .policy import sync_by_default

    sync_by_default()
    ck = importlib.import_module("normzoo.check")  # normzoo.check is also the function's name
    from .sweeps import report as rp

    try:
        init_args, init_kwargs = ck.parse_init(args.init)
        shape = ck.parse_shape(args.shape) if args.shape else None
        like = args.like
        if like.lstrip().startswith("{"):
            like = ck.parse_init(f"_={like}")[1]["_"]  # a spec as a Python dict literal
        layer = ck.load_target(args.target)
        if not isinstance(layer, type) and (init_args or init_kwargs):
            return _fail(f"--init: {args.target} is a function, not a class; it takes no constructor arguments")
        report = ck.check(layer, like, args=init_args, kwargs=init_kwargs, shape=shape,
                          name=args.target.rpartition(":")[2] + (f"({args.init})" if args.init else ""))
    except ck.CheckError as err:
        return _fail(str(err))
    text = report.render(args.format)
    if args.output:
        rp.write(args.output, text)
        print(f"{report.verdict}: {args.format} report written to {args.output}")
    else:
        sys.stdout.write(text)
    return 0 if report.ok else 1


CHECK_HELP = """Check your own norm layer against the float64 oracle of the norm it is meant to be (--like), on a small
grid (float32/float64, input means 0, 1e2, 1e3, batch 1 and N, train and eval, the same input twice), and name the
usual mistakes that explain a difference. Exit 0: it matches; 1: it does not; 2: bad input.

TARGET is path/to/file.py:ClassName or package.module:ClassName. Loading it RUNS THAT FILE'S CODE (once, in this
process, as `python file.py` would): check only files you trust."""


def _parse_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if not size or any(v < 1 for v in size):
        raise ValueError(f"--size {text!r}: expected positive sizes joined by x, e.g. 56x56 (or 197 for a sequence)")
    return size


def _cmd_precompile(args) -> int:
    import torch

    from . import registry, store
    from .precompile import build_jobs, jobs_for

    try:
        sizes = [_parse_size(s) for s in args.size]
        dtypes = []
        for name in args.dtype:
            dtype = getattr(torch, name, None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(f"--dtype {name!r}: expected a floating-point dtype such as float32, bfloat16")
            dtypes.append(dtype)
        if args.batch < 2:
            raise ValueError(f"--batch {args.batch}: give 2 or more (one kernel then serves every batch size >= 2; "
                             "batch 1 has kernels of its own: --batch 1 is refused to keep that explicit)")
        if any(c < 1 for c in args.channels):
            raise ValueError(f"--channels {args.channels}: channel counts must be positive")
        layers = [(p, c, registry.build(p, c)) for p in args.presets for c in args.channels]
    except (ValueError, registry.PresetError) as err:
        return _fail(str(err))
    if not store.writable():
        return _fail(f"the kernel store {store.kernel_dir()} is not writable; set {store.ENV_KERNEL_DIR}")
    jobs: dict[str, dict] = {}
    for preset, channels, layer in layers:
        features_last = registry.features_axis(registry.resolve_spec(preset)["type"]) == -1
        for size in sizes:
            for dtype in dtypes:
                for layout in args.layout:
                    shape = (args.batch, *size, channels) if features_last else (args.batch, channels, *size)
                    if layout == "channels_last" and len(shape) != 4:
                        continue  # channels_last names 4-d inputs only
                    x = torch.zeros(shape, dtype=dtype, requires_grad=args.grad)
                    if layout == "channels_last":
                        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(args.grad)
                    try:
                        for job in jobs_for(layer.to(dtype), x, grad=args.grad):
                            jobs.setdefault(job["key"], job)
                    except (ValueError, RuntimeError) as err:
                        return _fail(f"{preset} with {channels} channels on input {tuple(shape)}: {err}")
    print(f"normzoo precompile: {len(jobs)} kernels for {len(layers)} layers into {store.kernel_dir()}",
          file=sys.stderr)
    summary = build_jobs(list(jobs.values()), progress=not args.quiet)
    print(f"{summary['built']} built, {summary['stored']} already stored, {summary['busy']} being built by another "
          f"process, {len(summary['failed'])} failed, {summary['seconds']} s")
    for what in summary["failed"].values():
        print(f"  failed: {what}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    from .sweeps.grid import DEVICES
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
        p.add_argument("--device", choices=list(DEVICES), default="cpu",
                       help="where the layers run (cuda: exit 2 if no GPU is visible)"
                       + ("; the float64 oracle runs on the CPU from the same inputs" if kind == "equivalence" else ""))
        if kind == "speed":
            p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios (needs matplotlib)")
        p.set_defaults(func=lambda args, kind=kind: _sweep(args, kind))

    p = sub.add_parser("check", help="is my norm right? your layer against the oracle, with a diagnosis "
                       "(loads and runs TARGET's file)", description=CHECK_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET", help="path/to/file.py:ClassName or package.module:ClassName "
                   "(loading a file runs its code)")
    p.add_argument("--like", required=True, metavar="PRESET",
                   help="the norm it is meant to be: a preset name (normzoo list), e.g. gn32, gn1, ln, bn")
    p.add_argument("--init", metavar="ARGS", help="constructor arguments as Python literals, e.g. '1, 3, affine=False'")
    p.add_argument("--shape", metavar="N,C,H,W", help="input shape (default: N=4, C from the layer, 8x8)")
    p.add_argument("--format", choices=["table", "markdown", "json"], default="table")
    p.add_argument("--output", metavar="PATH", help="write the report here")
    p.set_defaults(func=_cmd_check)

    text = ("build the kernels of presets x channel counts x sizes x dtypes into the kernel store "
            "(NORMZOO_KERNEL_DIR), so that later processes load them instead of compiling; from Python, "
            "normzoo.precompile(model, example_input) does it for a whole model")
    p = sub.add_parser("precompile", help=text, description=text)
    p.add_argument("presets", nargs="+", metavar="PRESET", help="preset names (normzoo list), e.g. gn32 ln bn")
    p.add_argument("--channels", nargs="+", type=int, required=True, metavar="C",
                   help="channel counts (the normalized size for layer norms)")
    p.add_argument("--size", nargs="+", default=["32x32"], metavar="HxW",
                   help="spatial sizes of channel-first inputs (a sequence length for layer norms); default 32x32")
    p.add_argument("--batch", type=int, default=8, help="example batch size (kernels serve every size >= 2)")
    p.add_argument("--dtype", nargs="+", default=["float32"], help="dtypes, e.g. float32 bfloat16")
    p.add_argument("--layout", nargs="+", choices=["contiguous", "channels_last"], default=["contiguous"])
    p.add_argument("--no-grad", dest="grad", action="store_false",
                   help="inference kernels only (y alone: for calls without gradients)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_precompile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
