"""Curvature benchmarks (issue 2): dynscope vs PyHessian vs a plain per-probe loop, side by side.

Run: ``python benchmarks/bench_curvature.py [--quick]`` or ``dynscope bench curvature``.

1. Hessian trace with 32 probes: dynscope (batched HVPs) vs PyHessian ``trace(maxIter=32)``
   vs a loop of single autograd HVPs. Target: >= 1.3x faster than PyHessian on CPU. Met on the
   MLPs (PyHessian also pays per probe for drawing and masking parameter-sized probes). On the
   transformer, whose parameters are few and activations many, both are bound by the double
   backward itself: six matrix products per linear layer against a training step's three, so about
   two training steps per probe (section 4 measures 2.0 for dynscope, PyHessian ~2.3); the
   second-order rules of ``dynscope.second_order`` remove most of the rest, which leaves ~1.1x
   (they took one HVP on this transformer from about 40 ms to about 30 ms).
2. Accuracy per cost: the median relative error (over 20 seeds) and the median seconds per call
   at each matvec budget, and the budget (and seconds) at which it reaches 5% and 1%, Hutchinson vs
   Hutch++ and XTrace, on a trained MLP whose exact Hessian and spectrum are computed. Target:
   Hutch++ needs at most half. The spectrum decides: a low-rank-plus-correction estimator spends
   part of its budget on a sketch, which pays only once the sketch's rank (m/3 for Hutch++) holds
   most of ||H||_F^2. On this network (10 classes) 9 outliers hold ~40% of the trace and the rest
   decays smoothly (effective rank tr(H)^2/||H||_F^2 ~ 47), so Hutchinson reaches 5% within ~8
   matvecs, before the ~18 from which Hutch++ can beat it: at 5% Hutch++ needs two to three times
   Hutchinson's matvecs (the target is not met), at 1% about a third (met). XTrace, the
   leave-one-out refinement of Hutch++, does not change that at 5% either. "Reaches" means the
   smallest budget from which the median stays at or below the target (20-seed medians are noisy).
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
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dynscope import HessianOperator, Objective, hessian_trace, top_eigenvalues

from anchors import PyHessian, pyhessian_lambda_max
from anchors import pyhessian_trace as _pyhessian_trace


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


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds of each function, timed round-robin so that a drift in machine speed hits all alike."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    with sdpa_kernel([SDPBackend.MATH]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
    value = _pyhessian_trace(model, x, y, num_probes)
    model.train()
    return value


def bench_trace(cases, repeats):
    print("\n1. Hessian trace, 32 probes (median seconds; ratio = baseline / dynscope)")
    rows = []
    for name, model, x, y in cases:
        model.eval()
        obj = Objective(model, F.cross_entropy, (x, y))
        methods = {"ours": lambda: hessian_trace(obj, 32, seed=0), "loop": lambda: loop_trace(model, x, y, 32)}
        if PyHessian:
            methods["pyh"] = lambda: pyhessian_trace(model, x, y, 32)
        times = interleaved_medians(methods, repeats)
        ours, loop, pyh = times["ours"], times["loop"], times.get("pyh", float("nan"))
        rows.append((name, ours, pyh, loop, pyh / ours, loop / ours, obj._hvp_method))
    _table(["model", "dynscope s", "PyHessian s", "loop s", "vs PyHessian", "vs loop", "kernel"], rows,
           ["{}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.2f}x", "{:.2f}x", "{}"])
    return rows


def trained_mlp(quick: bool):
    """An MLP trained to 100% training accuracy and near-zero loss on a linear-teacher task.

    300 full-batch Adam steps reach a loss of about 4e-3 (the full size; printed by
    :func:`bench_accuracy`). This is trained, and the accuracy comparison does not depend on
    training longer: at 3000 steps (loss 3e-5) the Hessian is ~70x smaller but has the same shape
    (the same share of the trace in its top eigenvalues, the same effective rank), and relative
    errors are scale-free.
    """
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


# Fine at the small end, where Hutchinson already reaches 5%. Every estimator spends exactly the
# budget where it runs (XTrace only runs on even budgets >= 4, Hutch++ on budgets >= 3).
BUDGETS = (2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384)
ESTIMATORS = (("hutchinson", "Hutchinson", 1), ("hutch++", "Hutch++", 3), ("xtrace", "XTrace", 4))


def _spectrum_report(H: torch.Tensor, classes: int) -> None:
    """What decides who wins: how much of tr(H) and of ||H||_F^2 the top eigenvalues hold."""
    ev = torch.linalg.eigvalsh(H).flip(0)
    tr, fro2, diag2 = float(ev.sum()), float((ev * ev).sum()), float((torch.diagonal(H) ** 2).sum())
    rel_std = (2 * (fro2 - diag2)) ** 0.5 / abs(tr)  # Hutchinson (Rademacher), one probe
    top = ", ".join(f"{v:.3g}" for v in ev[: classes + 2].tolist())
    print(f"   eigenvalues: {top}, ...; smallest {float(ev[-1]):.2g}")
    print(f"   top {classes - 1} (classes - 1) hold {float(ev[: classes - 1].sum()) / tr:.0%} of the trace, the top 100 "
          f"{float(ev[:100].sum()) / tr:.0%}; effective rank tr(H)^2 / ||H||_F^2 = {tr * tr / fro2:.1f}")
    # Hutchinson's median relative error is ~0.674 rel_std / sqrt(m) (a normal's median |z|).
    print(f"   Hutchinson: relative std of one probe sqrt(2(||H||_F^2 - sum H_ii^2)) / tr(H) = {rel_std:.3f}, "
          f"so ~{(0.674 * rel_std / 0.05) ** 2:.0f} matvecs for a 5% median error, ~{(0.674 * rel_std / 0.01) ** 2:.0f} for 1%")
    # Hutch++ spends m/3 probes on H minus its best rank-m/3 part: its variance is below
    # Hutchinson's only once 3 ||H - H_k||_F^2 < ||H||_F^2 with k = m/3.
    sq = (ev * ev).sort(descending=True).values  # best rank-k approximation: largest |eigenvalues|
    tail = (1 - torch.cumsum(sq, 0) / fro2).clamp_min(0).tolist()
    tail = [1.0] + tail  # tail[k] = ||H - H_k||_F^2 / ||H||_F^2
    even = next((k for k, t in enumerate(tail) if 3 * t < 1), len(ev))
    shares = ", ".join(f"k={k}: {tail[k]:.2f}" for k in (1, 2, 4, 8, 16, 32) if k < len(ev))
    print(f"   ||H - H_k||_F^2 / ||H||_F^2: {shares}; below 1/3 from k = {even}, so Hutch++ "
          f"(k = m/3) can beat Hutchinson only from about m = {3 * even} matvecs")


def bench_accuracy(quick: bool, seeds: int):
    """Median relative error and seconds per call at each budget; matvecs to 5% and 1%; ratios."""
    print(f"\n2. Trace accuracy per cost on a trained MLP: median relative error over {seeds} seeds")
    model, x, y = trained_mlp(quick)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    loss, acc = float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
    classes = logits.shape[1]
    op = HessianOperator(Objective(model, F.cross_entropy, (x, y)))
    n = op.size
    eye = torch.eye(n)
    H = torch.cat([op.matmat(eye[i : i + 256]) for i in range(0, n, 256)]).double()
    exact = float(torch.trace(H))
    print(f"   parameters: {n}, training loss {loss:.2e}, training accuracy {acc:.0%}; exact trace {exact:.4f} "
          f"(from {n} HVPs with the unit vectors)")
    _spectrum_report((H + H.T) / 2, classes)
    errors = {m: {} for m in BUDGETS}
    seconds = {m: {} for m in BUDGETS}
    for m in BUDGETS:
        for method, _, least in ESTIMATORS:
            if m < least or (method == "xtrace" and m % 2):
                continue
            rel, times = [], []
            for s in range(seeds):
                start = time.perf_counter()
                result = hessian_trace(op, m, method=method, seed=s)
                times.append(time.perf_counter() - start)
                assert result.num_matvecs == m, (method, m, result.num_matvecs)
                rel.append(abs(result.value - exact) / abs(exact))
            errors[m][method] = statistics.median(rel)
            seconds[m][method] = statistics.median(times)
    nan = float("nan")
    rows = [(m, *[v for meth, _, _ in ESTIMATORS for v in (errors[m].get(meth, nan), seconds[m].get(meth, nan) * 1e3)])
            for m in BUDGETS]
    header = ["matvecs"] + [h for _, label, _ in ESTIMATORS for h in (label, "ms")]
    _table(header, rows, ["{}"] + ["{:.2%}", "{:.1f}"] * len(ESTIMATORS))
    ratios = {}
    for target in (0.05, 0.01):
        need = {}
        for method, label, _ in ESTIMATORS:
            # the smallest budget from which the median error stays <= target (a single lucky
            # budget followed by worse ones does not count)
            ran = [m for m in BUDGETS if method in errors[m]]
            m = next((m for i, m in enumerate(ran) if all(errors[b][method] <= target for b in ran[i:])), None)
            need[method] = (m, seconds[m][method]) if m is not None else (float("inf"), float("inf"))
        base_m, base_s = need["hutchinson"]
        parts = [f"Hutchinson {base_m} ({base_s:.3f} s)"]
        for method, label, _ in ESTIMATORS[1:]:
            m, sec = need[method]
            ratios[(target, method)] = m / base_m
            parts.append(f"{label} {m} ({sec:.3f} s): ratio {m / base_m:.2f} matvecs, {sec / base_s:.2f} seconds")
        print(f"   matvecs (seconds per call) to a median error <= {target:.0%} from there on: " + "; ".join(parts) + " (target <= 0.5)")
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
            value = []
            t = median_time(lambda: value.append(pyhessian_lambda_max(model, x, y, tol)), repeats)
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
