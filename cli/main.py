"""The ``dynscope`` command: ``demo``, ``report`` and ``bench``.

User errors (a missing log directory, an unknown demo) end with a one-line message and a non-zero
exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit code 2."""


# name -> (module, one-line description). Each module has `add_arguments(parser)` and `run(args)`.
DEMOS = {
    "grokking": ("dynscope.cli.demo_grokking", "softmax collapse in modular addition, with and without AutoStableMax"),
    "curvature": ("dynscope.cli.demo_curvature", "curvature of a small MLP on synthetic data"),
    "gva": ("dynscope.cli.demo_gva", "variance amplification in behaviour cloning, damped by AutoEMA"),
    "suite": ("dynscope.cli.demo_suite", "every diagnostic at once on a small CNN, under a 5% overhead budget"),
    "transformer": ("dynscope.cli.demo_transformer", "output-logit divergence of a small LM at a high learning rate, stopped by AutoZLoss"),
}
DEFAULT_DEMO = "grokking"


def _demo(args: argparse.Namespace) -> int:
    module = importlib.import_module(DEMOS[args.variant][0])
    return module.run(args) or 0


def _report(args: argparse.Namespace) -> int:
    from dynscope.dashboards.report import ReportError, write_report

    try:
        path = write_report(args.logdir, args.output, progress=not args.quiet)
    except ReportError as error:
        raise UserError(str(error)) from error
    print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dynscope.cli.bench import run_benchmarks

    return run_benchmarks(args.names, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynscope", description="Training-dynamics diagnostics for PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,report,bench}")
    sub.required = True

    demo = sub.add_parser("demo", help="train a small model with dynscope and print what it measured")
    demo_sub = demo.add_subparsers(dest="variant", metavar="{" + ",".join(DEMOS) + "}")
    for name, (module_name, description) in DEMOS.items():
        variant = demo_sub.add_parser(name, help=description, description=description)
        importlib.import_module(module_name).add_arguments(variant)
        variant.set_defaults(func=_demo, variant=name)
    importlib.import_module(DEMOS[DEFAULT_DEMO][0]).add_arguments(demo)
    demo.set_defaults(func=_demo, variant=DEFAULT_DEMO)

    report = sub.add_parser("report", help="render a self-contained HTML report from TensorBoard logs")
    report.add_argument("logdir", help="directory with TensorBoard event files (searched recursively)")
    report.add_argument("-o", "--output", default="report.html", help="output HTML file (default: report.html)")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    report.set_defaults(func=_report)

    bench = sub.add_parser("bench", help="run the benchmarks in benchmarks/ and print their ratio tables")
    bench.add_argument("names", nargs="*", help="benchmark names (default: all)")
    bench.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"dynscope: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
