"""Curvature benchmarks (issue 2): dynscope vs PyHessian vs a plain per-probe loop, side by side.

Run: ``python benchmarks/bench_curvature.py [--quick]`` or ``dynscope bench curvature``.

1. Hessian trace with 32 probes: dynscope (batched HVPs) vs PyHessian ``trace(maxIter=32, tol=0)``
   vs a loop of single autograd HVPs. Target: >= 1.3x faster than PyHessian on CPU.
2. Accuracy per cost: the median relative error (over 20 seeds) at each matvec budget, and the
   budget at which it reaches 5% and 1%, Hutchinson vs Hutch++, on a trained MLP whose exact trace
   is computed. Target: Hutch++ needs at most half.
3. lambda_max to 1% relative error: dynscope's Lanczos vs PyHessian's power iteration
   ``eigenvalues()``. Target: <= 0.5x PyHessian's time.
4. One HVP in units of one training step (forward + backward + SGD step).

PyHessian is optional (``pip install --no-deps pyhessian``); without it its columns read "n/a".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dynscope import HessianOperator, Objective, hessian_trace, top_eigenvalues

try:
    from pyhessian import hessian as PyHessian
except ImportError:  # pragma: no cover - optional baseline
    PyHessian = None


def mlp(sizes) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class SmallTransformer(nn.Module):
    """Embedding, two pre-LN blocks (attention + GELU MLP), mean-pool classifier."""

    def __init__(self, vocab=64, dim=64, heads=4, seq=32, classes=10, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        layer = lambda: nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu",  # noqa: E731
                                                   batch_first=True, norm_first=True)
        self.blocks = nn.ModuleList([layer() for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


def median_time(fn: Callable[[], object], repeats: int) -> float:
    # Every method runs attention with the math kernel: the fused CPU kernel has no double backward.
    with sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyHessian's backward(create_graph=True) warns every call
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_time(model, x, y, repeats):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: time the step, keep the weights

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    t = median_time(step, repeats)
    opt.zero_grad(set_to_none=True)
    return t


def loop_trace(model, x, y, num_probes, seed=0):
    """The textbook baseline: one autograd HVP per Rademacher probe on a retained graph."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(num_probes):
        vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        total += float(sum((h * v).sum() for h, v in zip(hv, vs)))
    return total / num_probes


def pyhessian_trace(model, x, y, num_probes):
    model.zero_grad(set_to_none=True)
    h = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    values = h.trace(maxIter=num_probes, tol=0)
    model.zero_grad(set_to_none=True)
    model.train()
    return sum(values) / len(values)


def bench_trace(cases, repeats):
    print("\n1. Hessian trace, 32 probes (median seconds; ratio = baseline / dynscope)")
    rows = []
    for name, model, x, y in cases:
        model.eval()
        obj = Objective(model, F.cross_entropy, (x, y))
        ours = median_time(lambda: hessian_trace(obj, 32, seed=0), repeats)
        loop = median_time(lambda: loop_trace(model, x, y, 32), repeats)
        pyh = median_time(lambda: pyhessian_trace(model, x, y, 32), repeats) if PyHessian else float("nan")
        rows.append((name, ours, pyh, loop, pyh / ours, loop / ours, obj._hvp_method))
    _table(["model", "dynscope s", "PyHessian s", "loop s", "vs PyHessian", "vs loop", "kernel"], rows,
           ["{}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.2f}x", "{:.2f}x", "{}"])
    return rows


def trained_mlp(quick: bool):
    """An MLP trained to near-zero loss on a linear-teacher classification task."""
    torch.manual_seed(0)
    sizes = (20, 32, 32, 10) if not quick else (10, 16, 16, 5)
    model = mlp(sizes)
    x = torch.randn(512, sizes[0])
    y = (x @ torch.randn(sizes[0], sizes[-1])).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


BUDGETS = (6, 12, 24, 48, 96, 192, 384)


def bench_accuracy(quick: bool, seeds: int):
    print(f"\n2. Trace accuracy per cost on a trained MLP: median relative error over {seeds} seeds")
    model, x, y = trained_mlp(quick)
    op = HessianOperator(Objective(model.eval(), F.cross_entropy, (x, y)))
    n = op.size
    exact = sum(float(torch.diagonal(op.matmat(torch.eye(n)[i : i + 256]), offset=i).sum()) for i in range(0, n, 256))
    print(f"   parameters: {n}, exact trace {exact:.4f} (from {n} HVPs with the unit vectors)")
    errors = {m: {} for m in BUDGETS}
    for m in BUDGETS:
        for method in ("hutchinson", "hutch++"):
            rel = [abs(hessian_trace(op, m, method=method, seed=s).value - exact) / abs(exact) for s in range(seeds)]
            errors[m][method] = statistics.median(rel)
    _table(["matvecs", "Hutchinson", "Hutch++"], [(m, errors[m]["hutchinson"], errors[m]["hutch++"]) for m in BUDGETS],
           ["{}", "{:.2%}", "{:.2%}"])
    ratios = {}
    for target in (0.05, 0.01):
        need = {meth: next((m for m in BUDGETS if errors[m][meth] <= target), float("inf")) for meth in ("hutchinson", "hutch++")}
        ratios[target] = need["hutch++"] / need["hutchinson"]
        print(f"   matvecs to a median error <= {target:.0%}: Hutchinson {need['hutchinson']}, Hutch++ {need['hutch++']}"
              f" -> ratio {ratios[target]:.2f} (target <= 0.5)")
    return ratios


def bench_eigen(model, x, y, repeats):
    print("\n3. lambda_max to 1% relative error (MLP 64-256-256-10, batch 128)")
    model.eval()
    obj = Objective(model, F.cross_entropy, (x, y))
    reference = top_eigenvalues(obj, tol=1e-9, max_iter=300).value
    rows = []
    for tol in (1e-1, 1e-2):
        res = top_eigenvalues(obj, tol=tol)
        t = median_time(lambda: top_eigenvalues(obj, tol=tol), repeats)
        rows.append((f"dynscope Lanczos tol={tol:g}", res.num_matvecs, abs(res.value - reference) / abs(reference), t))
    if PyHessian:
        for tol in (1e-2, 1e-3):
            def power():
                model.zero_grad(set_to_none=True)
                return PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(top_n=1, tol=tol)

            value = []
            t = median_time(lambda: value.append(power()[0][0]), repeats)
            value = value[-1]
            rows.append((f"PyHessian power tol={tol:g}", "~", abs(value - reference) / abs(reference), t))
        model.zero_grad(set_to_none=True)
    _table(["method", "matvecs", "rel. error", "seconds"], rows, ["{}", "{}", "{:.2e}", "{:.3f}"])
    ours = min(r[3] for r in rows if r[0].startswith("dynscope") and r[2] <= 0.01)
    theirs = [r[3] for r in rows if r[0].startswith("PyHessian") and r[2] <= 0.01]
    if theirs:
        print(f"   dynscope / PyHessian time at <= 1% error: {ours / min(theirs):.2f} (target <= 0.5)")
    return rows


def bench_hvp_cost(cases, repeats):
    print("\n4. One HVP in units of one training step")
    rows = []
    for name, model, x, y in cases:
        step = train_step_time(model.train(), x, y, repeats)
        model.eval()
        obj = Objective(model, F.cross_entropy, (x, y))
        v32 = torch.randn(32, obj.layout.numel)
        batched = median_time(lambda: HessianOperator(obj).matmat(v32), repeats) / 32
        single = median_time(lambda: HessianOperator(obj).matmat(v32[:1]), repeats)
        rows.append((name, step * 1e3, single / step, batched / step))
    _table(["model", "train step ms", "1 HVP (alone)", "1 HVP (in a batch of 32)"], rows,
           ["{}", "{:.2f}", "{:.1f} steps", "{:.1f} steps"])


def _table(header, rows, formats):
    cells = [header] + [[f.format(v) if not (isinstance(v, float) and v != v) else "n/a" for f, v in zip(formats, r)]
                        for r in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("   " + "  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("   " + "  ".join("-" * w for w in widths))


def cases(quick: bool):
    torch.manual_seed(0)
    out = [("MLP 64-256-256-10 / B128", mlp((64, 256, 256, 10)), torch.randn(128, 64), torch.randint(0, 10, (128,)))]
    if not quick:
        out.append(("MLP 256-1024-1024-10 / B256", mlp((256, 1024, 1024, 10)), torch.randn(256, 256),
                    torch.randint(0, 10, (256,))))
    out.append(("transformer d64 L2 T32 / B64", SmallTransformer(), torch.randint(0, 64, (64, 32)),
                torch.randint(0, 10, (64,))))
    return out


def main(quick: bool = False) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, PyHessian "
          f"{'available' if PyHessian else 'not installed (pip install --no-deps pyhessian)'}")
    repeats = 2 if quick else 5
    all_cases = cases(quick)
    bench_trace(all_cases, repeats)
    bench_accuracy(quick, seeds=5 if quick else 20)
    bench_eigen(*all_cases[0][1:], repeats)
    bench_hvp_cost(all_cases, repeats)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.exit(main(args.quick))
