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
        path = write_report(args.logdir, args.output, progress=not args.quiet, force=args.force)
    except ReportError as error:
        raise UserError(str(error)) from error
    except Exception as error:  # noqa: BLE001 - the command promises one-line errors
        raise UserError(f"could not render the report of {args.logdir}: {type(error).__name__}: {error}") from error
    print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from dynscope.cli.bench import run_benchmarks

    return run_benchmarks(args.names, quick=args.quick)


def build_parser(demos: bool = True) -> argparse.ArgumentParser:
    """The command line. ``demos=False`` leaves out the demos' own options (importing a demo
    imports torch and Lightning, which ``dynscope --help`` and ``dynscope report`` do not need)."""
    parser = argparse.ArgumentParser(prog="dynscope", description="Training-dynamics diagnostics for PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,report,bench}")
    sub.required = True

    demo = sub.add_parser("demo", help="train a small model with dynscope and print what it measured",
                          description=f"Train a small model with dynscope and print what it measured. Without a "
                                      f"name: the {DEFAULT_DEMO} demo.")
    demo_sub = demo.add_subparsers(dest="variant", metavar="{" + ",".join(DEMOS) + "}")
    for name, (module_name, description) in DEMOS.items():
        # argparse %-formats help strings (not descriptions): "5%" would crash --help
        variant = demo_sub.add_parser(name, help=description.replace("%", "%%"), description=description)
        if demos:
            importlib.import_module(module_name).add_arguments(variant)
        variant.set_defaults(func=_demo, variant=name)
    if demos:
        importlib.import_module(DEMOS[DEFAULT_DEMO][0]).add_arguments(demo)
    demo.set_defaults(func=_demo, variant=DEFAULT_DEMO)

    report = sub.add_parser("report", help="render a self-contained HTML report from TensorBoard logs",
                            description="Render a self-contained HTML report from TensorBoard logs.")
    report.add_argument("logdir", help="directory with TensorBoard event files (searched recursively)")
    report.add_argument("-o", "--output", default="report.html",
                        help="output HTML file (default: report.html); an existing file is replaced only if it is an "
                             "HTML file outside the log directory, unless --force")
    report.add_argument("-f", "--force", action="store_true", help="replace the output file whatever it is")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    report.set_defaults(func=_report)

    from dynscope.cli.bench import available

    bench = sub.add_parser("bench", help="run the benchmarks in benchmarks/ and print their ratio tables",
                           description="Run the benchmarks in benchmarks/ side by side and print their ratio tables.",
                           epilog=available(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("names", nargs="*", help="benchmark names (default: all; listed below)")
    bench.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    bench.set_defaults(func=_bench)
    return parser


def _wants_demo(argv: List[str]) -> bool:
    """Whether the command line is a ``demo`` command (the first word that is not an option)."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] == "demo"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(demos=_wants_demo(argv))
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
