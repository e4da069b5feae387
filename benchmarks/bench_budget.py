"""What ``DynScope(budget=0.05)`` measures, and what it costs, over short runs (issue 14, item 7).

Run: ``python benchmarks/bench_budget.py [--steps 300 1000] [--repeats 3] [--models mlp cnn] [--fresh] [--timeline]``.

For each model and run length, Lightning trains without and with ``DynScope(loss_fn=F.cross_entropy,
budget=0.05)``, alternating (interleaved pairs, the same seed and data), ``--repeats`` times, on one
thread with ``OMP_WAIT_POLICY=PASSIVE`` (the machine is shared: read the medians). Printed per model
and length: the median of the paired ratios of wall time (``time.perf_counter``) and of CPU time
(``time.process_time``), DynScope's own account of its overhead, the measurements each diagnostic
made (median over the repeats, and the smallest), each one's cost per measurement in training steps
(the controller's learnt cost over the training time per step), and the line
:meth:`DynScope.unmeasured` gives for a diagnostic that made none.
Targets: every applicable diagnostic at least 3 times in 1,000 steps, at least once in 300 (or a
line saying why not), wall-time ratio <= 1.05. ``--timeline`` prints, for each fit with DynScope,
when each measurement ran, what it cost in training steps (and what it was expected to cost), and
the overhead so far: the budget's arithmetic, measurement by measurement. ``--fresh`` runs each fit
in a new process: a user's run is the first fit of its process, whose first calls of everything
(a pilot's included) pay what later fits in the same process do not.

Models: ``mlp`` (64-256-256-10, batch 128, 64 features), ``cnn`` (2 conv + 2 linear on 3x32x32,
batch 64), ``digits`` (the README test's 64-32-10 MLP on scikit-learn's digits, or data of their
shape when scikit-learn is not installed, batch 32; not used to tune the defaults), ``transformer`` (a small encoder on token sequences, batch 64:
GELU, so no linear regions).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


from bench_curvature import SmallTransformer, mlp  # noqa: E402
import bench_overhead  # noqa: E402
from bench_overhead import image_data, small_cnn, token_data, vector_data  # noqa: E402
from dynscope.callbacks import DynScope  # noqa: E402


def digits_data() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 8x8 images, 10 classes) when it is installed, else data of that shape:
    10 class means plus noise."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1797,), generator=g)
        return torch.randn(10, 64, generator=g)[y] + torch.randn(1797, 64, generator=g), y
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable, int, float]] = {
    "mlp": (lambda: mlp((64, 256, 256, 10)), vector_data, 128, 0.05),
    "cnn": (small_cnn, image_data, 64, 0.02),
    "digits": (lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), digits_data, 32, 0.1),
    "transformer": (SmallTransformer, token_data, 64, 0.02),
}


def fit(name: str, steps: int, scope: Optional[DynScope]) -> Tuple[float, float]:
    """Wall and CPU seconds of one fit of this benchmark's model ``name``."""
    return bench_overhead.fit(name, steps, scope, models=MODELS)


def timeline(scope: DynScope) -> List[str]:
    """Record each measurement DynScope's controller learns of: when (in training steps), what it cost
    (in steps), and the overhead so far; returns the list the lines are appended to."""
    lines: List[str] = []
    controller = scope.controller
    learn = controller.measured

    def measured(name, seconds, metrics, expected_steps=None):
        per_step = controller.step_seconds or float("nan")
        # what the controller expected when it admitted the measurement (before it learns from it)
        expected = controller.expected(name, scope.callbacks[name], steps=expected_steps) / per_step
        lines.append(f"{name:>10} at step ~{controller.elapsed() / per_step:5.0f}: {seconds / per_step:5.1f} steps "
                     f"(expected {expected:.1f}), overhead so far {controller.overhead():.3f}")
        return learn(name, seconds, metrics, expected_steps=expected_steps)

    controller.measured = measured
    return lines


def one_fit(name: str, steps: int, budget: Optional[float]) -> Dict:
    """One fit of ``name``: plain (``budget=None``), or with ``DynScope(budget=budget)`` and what it did."""
    if budget is None:
        wall, cpu = fit(name, steps, None)
        return {"wall": wall, "cpu": cpu}
    scope = DynScope(loss_fn=F.cross_entropy, budget=budget)
    events = timeline(scope)
    wall, cpu = fit(name, steps, scope)
    per_step = scope.controller.step_seconds
    return {
        "wall": wall, "cpu": cpu, "account": scope.overhead(), "timeline": events, "unmeasured": scope.unmeasured(),
        "counts": {d: c.num_measurements for d, c in scope.callbacks.items()},
        "costs": {d: scope.costs[d] / per_step for d in scope.callbacks if d in scope.costs and per_step > 0},
    }


def fresh_fit(name: str, steps: int, budget: Optional[float]) -> Dict:
    """:func:`one_fit` in a new Python process (what a user's run is: the first fit of its process)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", name, str(steps), "none" if budget is None else str(budget)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(name: str, steps: int, repeats: int, budget: float, show_timeline: bool = False, fresh: bool = False) -> None:
    walls: List[float] = []
    cpus: List[float] = []
    counts: Dict[str, List[int]] = {}
    costs: Dict[str, List[float]] = {}
    accounts: List[float] = []
    lines: List[str] = []
    once = fresh_fit if fresh else one_fit
    for _ in range(repeats):
        plain = once(name, steps, None)
        scoped = once(name, steps, budget)
        if show_timeline:
            print("\n".join(f"{'':>13}{line}" for line in scoped["timeline"]), flush=True)
        walls.append(scoped["wall"] / plain["wall"])
        cpus.append(scoped["cpu"] / plain["cpu"])
        accounts.append(scoped["account"])
        for diagnostic, count in scoped["counts"].items():
            counts.setdefault(diagnostic, []).append(count)
        for diagnostic, cost in scoped["costs"].items():
            costs.setdefault(diagnostic, []).append(cost)
        lines = scoped["unmeasured"] or lines
    measured = ", ".join(
        f"{d} {statistics.median(c):g} (min {min(c)}; "
        f"{statistics.median(costs[d]) if d in costs else float('nan'):.1f} steps each)"
        for d, c in counts.items()
    )
    print(
        f"{name:>11} {steps:5d} steps: wall ratio {statistics.median(walls):.3f} (pairs {', '.join(f'{w:.3f}' for w in walls)}), "
        f"CPU ratio {statistics.median(cpus):.3f}, DynScope's account {statistics.median(accounts):.3f}; "
        f"measurements: {measured}",
        flush=True,
    )
    for line in lines:
        print(f"{'':>13}{line}", flush=True)


def main(quick: bool = False, argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="*", default=[100] if quick else [300, 1000])
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--models", nargs="*", default=["mlp"] if quick else ["mlp", "cnn"], choices=list(MODELS))
    parser.add_argument("--timeline", action="store_true", help="print when each measurement ran and what it cost")
    parser.add_argument("--fresh", action="store_true",
                        help="each fit in a new process (as a user's run is: the first fit of its process)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "STEPS", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for logger in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    if args.child:  # (one fit for --fresh: its results as the last line, JSON)
        name, steps, budget = args.child
        print(json.dumps(one_fit(name, int(steps), None if budget == "none" else float(budget))))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, budget={args.budget}, {args.repeats} interleaved pairs"
          f"{', each fit in a new process' if args.fresh else ''}; medians")
    for name in args.models:
        for steps in args.steps:
            run(name, steps, args.repeats, args.budget, args.timeline, args.fresh)
    torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
