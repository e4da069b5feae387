"""Tracked curvature along a training trajectory vs cold starts (issue 14), side by side in one run.

Run: ``python benchmarks/bench_tracking.py [--quick] [--fixed-batch]``.

An MLP 64-256-256-10 (85k parameters) trains 200 SGD steps (momentum 0.9, batch 128); every 20
steps ``lambda_max`` (target 1%) and ``tr(H)`` (target 5%) are measured on the step's batch (or a
fixed batch with ``--fixed-batch``), three ways, interleaved:

* cold: Lanczos from a random vector (``tol=1e-2``) and Hutchinson with 8 probes;
* tracked: :class:`dynscope.tracking.CurvatureTracker` (Lanczos from the carried sketch's top Ritz
  vector, trace = exact part on the sketch and the top Ritz vectors + 4 probes; 4 + 4 HVPs);
* the reference: Lanczos to 1e-8 and a deflated Hutchinson with 100 probes on its 60-vector Krylov
  space (its standard error is printed).

Printed per measurement: HVPs, CPU seconds (``time.process_time``) and relative errors; at the
end medians and the share of measurements within 1% / 5%. On a machine shared with other jobs the
CPU seconds are the comparable figure.
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

from bench_curvature import mlp  # noqa: E402
from dynscope import HessianOperator, Objective, hessian_trace, top_eigenvalues  # noqa: E402
from dynscope.trace import deflated_hutchinson  # noqa: E402
from dynscope.tracking import CurvatureTracker  # noqa: E402


def cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main(quick: bool = False, fixed_batch: bool = False) -> int:
    torch.manual_seed(0)
    sizes, batch, steps, every = ((16, 64, 64, 10), 64, 100, 20) if quick else ((64, 256, 256, 10), 128, 200, 20)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, sizes[0], generator=g), torch.randint(0, 10, (4096,), generator=g)
    net = mlp(sizes)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    tracker = CurvatureTracker(trace_matvecs=4, sketch=4, eigen_tol=1e-2, eigen_max_iter=30)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MLP {sizes}, batch {batch}, "
          f"{'fixed batch' if fixed_batch else 'the step batch'}, every {every} steps")
    print(f"   {'step':>4}  {'lambda':>8}  {'trace':>9}  | cold: HVPs  cpu s  err lam  err tr | tracked: HVPs(eig+tr)  cpu s  err lam  err tr")
    for step in range(1, steps + 1):
        i = (step * batch) % (x.shape[0] - batch)
        xb, yb = (x[:batch], y[:batch]) if fixed_batch else (x[i : i + batch], y[i : i + batch])
        opt.zero_grad()
        F.cross_entropy(net(x[i : i + batch]), y[i : i + batch]).backward()
        opt.step()
        if step % every and step != 1:
            continue
        net.eval()
        op = HessianOperator(Objective(net, F.cross_entropy, (xb, yb)))
        ref = top_eigenvalues(op, which="LA", tol=1e-8, max_iter=60, keep_basis=True)
        ref_trace = deflated_hutchinson(op, 100, ref.basis, ref.products, seed=10**6 + step)
        (cold_eig, cold_tr), cold_t = cpu(lambda: (top_eigenvalues(op, which="LA", tol=1e-2, max_iter=30, seed=step),
                                                    hessian_trace(op, 8, seed=step)))
        tracked, tracked_t = cpu(lambda: tracker.measure(op, seed=step))
        lam, tr = ref.value, ref_trace.value
        row = dict(
            step=step, cold_hvps=cold_eig.num_matvecs + cold_tr.num_matvecs, cold_t=cold_t,
            cold_lam=abs(cold_eig.value - lam) / lam, cold_tr=abs(cold_tr.value - tr) / abs(tr),
            eig_hvps=tracked.eigen.num_matvecs, tr_hvps=tracked.trace.num_matvecs, t=tracked_t,
            lam=abs(tracked.eigen.value - lam) / lam, tr=abs(tracked.trace.value - tr) / abs(tr),
        )
        rows.append(row)
        print(f"   {step:>4}  {lam:8.4g}  {tr:9.4g}  | {row['cold_hvps']:10d}  {cold_t:5.2f}  {row['cold_lam']:7.1%}  "
              f"{row['cold_tr']:6.1%} | {row['eig_hvps']:>12d}+{row['tr_hvps']:<8d}  {tracked_t:5.2f}  {row['lam']:7.1%}  "
              f"{row['tr']:6.1%}   (reference trace stderr {ref_trace.stderr / abs(tr):.1%})", flush=True)
        net.train()
    later = rows[1:]  # after the first measurement
    med = lambda key: statistics.median(r[key] for r in later)  # noqa: E731
    share = lambda key, bound: sum(r[key] <= bound for r in later) / len(later)  # noqa: E731
    print(f"   after the first measurement (medians): cold {med('cold_hvps'):.0f} HVPs, {med('cold_t'):.2f} s; "
          f"tracked {med('eig_hvps'):.0f} + {med('tr_hvps'):.0f} HVPs, {med('t'):.2f} s "
          f"(time ratio tracked / cold {med('t') / med('cold_t'):.2f})")
    print(f"   lambda_max within 1%: cold {share('cold_lam', 0.01):.0%}, tracked {share('lam', 0.01):.0%}; "
          f"trace within 5%: cold {share('cold_tr', 0.05):.0%}, tracked {share('tr', 0.05):.0%} "
          f"(median error cold {med('cold_tr'):.1%}, tracked {med('tr'):.1%}); "
          f"target: 1% and 5% in <= 8 HVPs each")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fixed-batch", action="store_true", help="measure on one fixed batch (the Hessian drifts slowly)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.exit(main(args.quick, args.fixed_batch))
