"""Lanczos's own dense work (issue 14, item 7): float32 basis vs float64 basis, side by side in one process.

Run: ``OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_lanczos.py [--repeats 7]``.

Both variants run the same code; the float64 one raises ``dynscope.eigen._FLOAT32_TOL`` so that a
float32 operator keeps a float64 basis (what :func:`dynscope.eigen.lanczos` did before). CPU time
(``time.process_time``, one thread), medians of interleaved repeats:

1. Lanczos with a free matvec (an 85k diagonal operator, evenly spaced spectrum so that every run
   takes exactly the steps asked for) for 5, 10 and 20 steps at ``tol=1e-4``, with the relative
   difference of the two top Ritz values;
2. one cold tracked curvature measurement at the suite's defaults (``num_matvecs=8``,
   ``eigen_max_iter=20``, 16 samples) on the benchmark MLP (64-256-256-10, 85k parameters), in
   training steps (batch 128, SGD), and the next, warm-started one after one training step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dynscope.eigen as eigen  # noqa: E402
from bench_curvature import mlp  # noqa: E402
from dynscope import Objective  # noqa: E402
from dynscope.curvature import measure_curvature  # noqa: E402
from dynscope.operators import HessianOperator, Operator  # noqa: E402
from dynscope.tracking import CurvatureTracker  # noqa: E402


class Diagonal(Operator):
    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.size, self.dtype, self.device = d, d.numel(), d.dtype, d.device
        self.num_matvecs = 0

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors * self.d


def main(quick: bool = False, argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2 if quick else 7)
    args = parser.parse_args([] if argv is None else argv)
    torch.set_num_threads(1)
    float32_tol = eigen._FLOAT32_TOL
    variants = {"float64": float("inf"), "float32": float32_tol}
    op = Diagonal(torch.linspace(0.0, 10.0, 85002))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = mlp((64, 256, 256, 10))
    x, y = torch.randn(128, 64, generator=g), torch.randint(0, 10, (128,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)

    def step() -> float:
        t = time.process_time()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        return time.process_time() - t

    times: dict = {}
    values: dict = {}
    try:
        for _ in range(args.repeats):
            for name, threshold in variants.items():
                eigen._FLOAT32_TOL = threshold
                for steps in (5, 10, 20):
                    t = time.process_time()
                    res = eigen.lanczos(op, 1, tol=1e-4, max_iter=steps)
                    times.setdefault((name, steps), []).append(time.process_time() - t)
                    assert res.num_matvecs == steps
                    values[(name, steps)] = res.value
                tracker = CurvatureTracker(trace_matvecs=8, sketch=0, eigen_tol=1e-2, eigen_max_iter=20, seed=0,
                                           memory="auto")
                operator = HessianOperator(Objective(net, F.cross_entropy, (x[:16], y[:16])))
                t = time.process_time()
                measure_curvature(operator, num_matvecs=8, method="tracked", seed=0, probe_seed=0, tracker=tracker,
                                  eigen=True, eigen_tol=1e-2, eigen_max_iter=20)
                times.setdefault((name, "measure"), []).append(time.process_time() - t)
                state = {k: v.clone() for k, v in net.state_dict().items()}
                step()  # the next measurement is warm-started from this one
                operator = HessianOperator(Objective(net, F.cross_entropy, (x[:16], y[:16])))
                t = time.process_time()
                measure_curvature(operator, num_matvecs=8, method="tracked", seed=0, probe_seed=1, tracker=tracker,
                                  eigen=True, eigen_tol=1e-2, eigen_max_iter=20)
                times.setdefault((name, "warm"), []).append(time.process_time() - t)
                net.load_state_dict(state)
            times.setdefault("step", []).append(statistics.median(step() for _ in range(10)))
    finally:
        eigen._FLOAT32_TOL = float32_tol
    ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    print(f"training step (batch 128): {ms['step']:.2f} ms")
    for steps in (5, 10, 20):
        a, b = ms[("float64", steps)], ms[("float32", steps)]
        diff = abs(values[("float64", steps)] - values[("float32", steps)]) / abs(values[("float64", steps)])
        print(f"Lanczos, free matvec, {steps:2d} steps: float64 basis {a:6.2f} ms, float32 basis {b:6.2f} ms, "
              f"ratio {a / b:.2f}; top Ritz values differ by {diff:.1e} (relative)")
    a, b = ms[("float64", "measure")], ms[("float32", "measure")]
    print(f"cold tracked measurement, suite defaults: float64 basis {a:.1f} ms = {a / ms['step']:.1f} steps, "
          f"float32 basis {b:.1f} ms = {b / ms['step']:.1f} steps, ratio {a / b:.2f}")
    a, b = ms[("float64", "warm")], ms[("float32", "warm")]
    print(f"next (warm) measurement after one step: float64 basis {a:.1f} ms = {a / ms['step']:.1f} steps, "
          f"float32 basis {b:.1f} ms = {b / ms['step']:.1f} steps, ratio {a / b:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(argv=sys.argv[1:]))
