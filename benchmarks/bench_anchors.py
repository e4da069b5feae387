"""dynscope against curvlinops and hessian-eigenthings (issue 14), side by side in one process.

Run: ``python benchmarks/bench_anchors.py [--repeats 5]``.

Both anchors are optional (``pip install --no-deps curvlinops-for-pytorch hessian-eigenthings``;
curvlinops also wants scipy, einops, einconv, opt-einsum and linear_operator, each installable with
``--no-deps`` next to any torch); a missing one reads "n/a". CPU seconds (``time.process_time``),
median of interleaved repeats, on:

1. the trace with 32 probes: ``dynscope.hessian_trace`` vs curvlinops' ``hutchinson_trace`` on its
   ``HessianLinearOperator`` (ratio = anchor / dynscope; target >= 1.3x);
2. ``lambda_max`` to 1%: dynscope's Lanczos (``tol=1e-2``) vs hessian-eigenthings' Lanczos with a
   fixed 8 steps (its defaults for one eigenpair), each with its relative error against a
   ``tol=1e-9`` reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_curvature import mlp  # noqa: E402
from dynscope import Objective, hessian_trace, top_eigenvalues  # noqa: E402

try:
    import curvlinops
except Exception:  # noqa: BLE001 - optional anchor
    curvlinops = None
try:
    import hessian_eigenthings as eigenthings
except Exception:  # noqa: BLE001 - optional anchor
    eigenthings = None


def cpu_medians(fns, repeats):
    times = {name: [] for name in fns}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cases():
    torch.manual_seed(0)
    return [
        ("MLP 64-256-256-10 / B128", mlp((64, 256, 256, 10)), torch.randn(128, 64), torch.randint(0, 10, (128,))),
        ("MLP 20-32-32-10 (2k) / B512", mlp((20, 32, 32, 10)), torch.randn(512, 20), torch.randint(0, 10, (512,))),
    ]


def main(repeats: int = 5) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; curvlinops "
          f"{'available' if curvlinops else 'n/a'}, hessian-eigenthings {'available' if eigenthings else 'n/a'}")
    print("1. trace, 32 probes (CPU s)            dynscope   curvlinops   ratio")
    for name, model, x, y in cases():
        model.eval()
        obj = Objective(model, F.cross_entropy, (x, y))
        fns = {"ours": lambda: hessian_trace(obj, 32, seed=0)}
        if curvlinops:
            params = [p for p in model.parameters() if p.requires_grad]
            op = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
            fns["curvlinops"] = lambda: curvlinops.hutchinson_trace(op, 32)
        t = cpu_medians(fns, repeats)
        theirs = t.get("curvlinops", float("nan"))
        print(f"   {name:<34} {t['ours']:8.3f}   {theirs:10.3f}   {theirs / t['ours']:5.2f}x")
    print("2. lambda_max to 1% (CPU s, HVPs, rel. error)   dynscope            hessian-eigenthings (8 steps)")
    for name, model, x, y in cases():
        model.eval()
        obj = Objective(model, F.cross_entropy, (x, y))
        ref = top_eigenvalues(obj, which="LA", tol=1e-9, max_iter=200).value
        ours = top_eigenvalues(obj, which="LA", tol=1e-2)
        fns = {"ours": lambda: top_eigenvalues(obj, which="LA", tol=1e-2)}
        line = f"   {name:<34} "
        if eigenthings:
            def loss_fn(module, batch):
                return F.cross_entropy(module(batch[0]), batch[1])

            op = eigenthings.HessianOperator(model, [(x, y)], loss_fn)
            theirs = eigenthings.lanczos(op, k=1, max_iter=8, which="LA", seed=0)
            fns["eigenthings"] = lambda: eigenthings.lanczos(op, k=1, max_iter=8, which="LA", seed=0)
        t = cpu_medians(fns, repeats)
        line += f"{t['ours']:6.3f} s {ours.num_matvecs:3d} HVPs {abs(ours.value - ref) / ref:7.1e}"
        if eigenthings:
            value = float(theirs.eigenvalues[0])
            line += f"   {t['eigenthings']:6.3f} s   8 HVPs {abs(value - ref) / ref:7.1e}  (ratio {t['eigenthings'] / t['ours']:.2f}x)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.exit(main(args.repeats))
