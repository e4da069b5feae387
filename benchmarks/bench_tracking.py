"""Tracked curvature along a training trajectory vs cold starts (issue 14), side by side in one run.

Run: ``python benchmarks/bench_tracking.py [--quick] [--small | --cnn | --transformer] [--step-batch] [--every 20]``.

A ReLU MLP trains 200 SGD steps (momentum 0.9, batch 128; 64-256-256-10, 85k parameters, the
2k MLP 20-32-32-10 with ``--small``, or the CNN with BatchNorm of ``bench_anchors.py`` with
``--cnn``, measured in eval mode; or, with ``--transformer``, ``bench_curvature``'s transformer at
width 16, 2 heads, 2 pre-LN blocks, 16 tokens, length 8: 5,002 parameters, GELU, LayerNorm and
softmax attention, on tokens labelled as in ``bench_overhead.token_data``); every ``--every`` steps ``lambda_max`` (target 1%) and
``tr(H)`` (target 5%) are measured on a fixed measurement set (the first ``--measure`` samples, 16
by default as in ``DynScope``; ``--step-batch``: the first samples of each step's batch instead),
interleaved:

* cold: Lanczos from a random vector (``tol=1e-2``) and Hutchinson with 8 probes;
* tracked variants of :class:`dynscope.tracking.CurvatureTracker` (warm-started Lanczos; trace =
  exact head on the Krylov space / sketch + 8 trace HVPs), with and without carried probes
  (``memory`` fixed at 0.7, or ``"auto"``: chosen from the previous measurement's variances;
  DeltaShift-style); ``auto no-pair``: Lanczos always from the previous top vector alone, never
  from the previous top pair as a block (``swap_gap=0``);
* ``exact`` (what ``DynScope`` does on these ReLU networks): the tracked Lanczos alone and the trace
  exactly, ``tr(H) = tr(GGN)`` (:func:`dynscope.gauss_newton_trace`); its cost is printed next to
  the 8 HVPs of cold Hutchinson.

Exact references: ``lambda_max`` by Lanczos to ``1e-8``; ``tr(H)`` in closed form: for a ReLU
network (convolutions, max-pooling and eval-mode BatchNorm included) every scalar weight enters
the output piecewise linearly, so the diagonal of the
second-order network term vanishes and ``tr(H) = tr(GGN) = mean_s sum_c p_sc |grad CE(z_s, c)|^2``
(per-sample gradients, one per sample and class; checked against ``torch.func.hessian`` on a tiny
ReLU MLP at start-up). Also printed: the Hutchinson floor, i.e. the probes that plain Hutchinson
needs for a 5% standard error, ``(sd_1 / 0.05 tr)^2`` with ``sd_1`` the per-probe standard
deviation, and the relative Frobenius drift between measurements ``rho``.

The transformer is not piecewise linear, so the closed form and the ``exact`` variant do not apply
(skipped). Its references come from the dense float64 Hessian, built from ``n`` HVPs with unit
vectors (about 13 s per measurement): ``tr(H)`` is its diagonal's sum, ``lambda_max`` Lanczos on it
to ``1e-10``. At start-up the dense Hessian of a tiny copy (219 parameters) is checked against
torch's autograd double backward (``torch.autograd.functional.hessian``) and central differences;
``torch.func.hessian`` is no reference there: on that model it is off by 0.03 in the LayerNorm
weights' rows and not symmetric (torch 2.13; ``jacrev(jacrev)`` as well), where autograd, central
differences and dynscope agree to 1e-9.

Measured (``--transformer --replicates 4``, one thread; after the first measurement, 10
measurements x 4 replicates): ``lambda_max`` tracked in 3 HVPs (median, at most 6; cold: 13, at most
17), median error 0.11% (RMS 0.26%), 100% within 1% (the first measurement: 13 HVPs). The trace
misses 5%: with ``memory="auto"`` (DynScope's default) the median error of the 8-HVP estimate is
10.6% (RMS 22.4%, 30% of estimates within 5%); fixed memory 0.7: 14.0% (RMS 23.6%, 15%); the
4-vector sketch: 24.7% (5%); cold Hutchinson: 26.8% (RMS 35.7%, 8%). The Hutchinson floor is
324-712 probes for a 5% standard error (one probe's standard deviation is 0.9-1.3x the trace:
a flat, indefinite spectrum that the Krylov space's few vectors barely deflate), and the Hessian
moves 9-38% between measurements. Printed at the first and last measurement, from the dense
matrices: the exact floor is 298 and 560 probes; deflating the exact top 8 eigenvectors leaves 220
and 434; nor does the GGN help as a control variate (its trace exact, Hutchinson on ``H - GGN``:
268 and 538), since the second-order term carries the off-diagonal mass (``|H - GGN|_F`` 6.68
and 5.57 of ``|H|_F`` 7.07 and 5.69) although the GGN holds 77-78% of the trace.

Each estimator runs in ``--replicates`` independent copies (probe seeds), so that errors are
distributions, not single draws. Per measurement: HVPs, CPU seconds (``time.process_time``) and
median relative errors; at the end, after the first measurement, medians, RMS and the share within
1% / 5%.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_anchors import cnn_bn  # noqa: E402
from bench_curvature import SmallTransformer, mlp  # noqa: E402
from dynscope import HessianOperator, MatrixOperator, Objective, gauss_newton_trace, hessian_trace, top_eigenvalues  # noqa: E402
from dynscope.trace import rademacher  # noqa: E402
from dynscope.tracking import CurvatureTracker  # noqa: E402

VARIANTS = {  # name: CurvatureTracker arguments (8 trace HVPs each)
    "sketch4+4": dict(trace_matvecs=4, sketch=4),
    "carry8 w.7": dict(trace_matvecs=8, sketch=0, memory=0.7),
    "carry8 auto": dict(trace_matvecs=8, sketch=0, memory="auto"),  # DynScope's default where the trace is not exact
    "auto no-pair": dict(trace_matvecs=8, sketch=0, memory="auto", swap_gap=0.0),  # Lanczos from the top vector alone
    "exact": dict(trace_matvecs=8, sketch=0, memory="auto"),  # DynScope on a ReLU network: Lanczos tracked, exact trace
}


def ggn_trace(net, x, y=None) -> float:
    """``tr(GGN)`` of the mean cross-entropy, exactly: ``mean_s sum_c p_sc |grad_theta CE(z_s, c)|^2``."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    with torch.no_grad():
        p = F.softmax(net(x), -1).double()

    def loss(prm, xs, c):
        return F.cross_entropy(functional_call(net, prm, (xs[None],)), c[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))
    total = 0.0
    for c in range(p.shape[1]):
        g = per(params, x, torch.full((x.shape[0],), c))
        sq = sum(v.double().pow(2).flatten(1).sum(1) for v in g.values())
        total += float((p[:, c] * sq).sum())
    return total / x.shape[0]


def check_reference() -> None:
    from torch.func import hessian

    torch.manual_seed(1)
    net = mlp((5, 7, 6, 3)).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    params = {k: v.detach() for k, v in net.named_parameters()}
    h = hessian(lambda prm: F.cross_entropy(functional_call(net, prm, (x,)), y))(params)
    exact = sum(float(torch.diagonal(h[k][k].reshape(v.numel(), v.numel())).sum()) for k, v in params.items())
    assert abs(ggn_trace(net, x) - exact) <= 1e-9 * abs(exact), (ggn_trace(net, x), exact)


def transformer(quick: bool = False) -> SmallTransformer:
    """``bench_curvature``'s transformer, small enough for a dense Hessian: 5k parameters (1.2k with ``quick``)."""
    return SmallTransformer(vocab=16, dim=8 if quick else 16, heads=2, seq=8, classes=10, depth=1 if quick else 2)


def token_data(n: int = 4096, generator=None):
    """``bench_overhead.token_data`` on the small transformer's vocabulary and length."""
    tokens = torch.randint(0, 16, (n, 8), generator=generator)
    return tokens, tokens[:, :4].sum(1) % 10  # a learnable label


def dense_hessian(net, x, y, chunk: int = 256) -> torch.Tensor:
    """The Hessian of the mean cross-entropy in float64, column block by column block (HVPs with unit vectors)."""
    op = HessianOperator(Objective(copy.deepcopy(net).double(), F.cross_entropy, (x, y)))
    n, blocks = op.size, []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        unit = torch.zeros(len(rows), n, dtype=torch.float64)
        unit[torch.arange(len(rows)), rows] = 1.0
        blocks.append(op.matmat(unit).double())
    h = torch.cat(blocks)
    return (h + h.T) / 2


def dense_ggn(net, x) -> torch.Tensor:
    """The generalised Gauss-Newton matrix of the mean cross-entropy in float64, ``J^T H_z J / B``, from the
    output Jacobian (``torch.func.jacrev``; its first derivatives are checked against autograd's gradient)."""
    model = copy.deepcopy(net).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    with sdpa_kernel([SDPBackend.MATH]):
        jac = jacrev(lambda prm: functional_call(model, prm, (x,)))(params)
        out = model(x)
    b, k = out.shape
    j = torch.cat([jac[name].reshape(b * k, -1) for name in params], 1)  # [B K, n]
    p = F.softmax(out.detach(), -1)
    hz = torch.block_diag(*[torch.diag(p[s]) - torch.outer(p[s], p[s]) for s in range(b)]) / b
    probe = torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(F.cross_entropy(model(x), probe), list(model.parameters()))
    residual = (p - F.one_hot(probe, k).double()).reshape(-1) / b
    assert torch.allclose(j.T @ residual, torch.cat([v.reshape(-1) for v in grads]), rtol=1e-8, atol=1e-12)
    g = j.T @ hz @ j
    return (g + g.T) / 2


def hutchinson_floor(a: torch.Tensor, trace: float) -> float:
    """Rademacher probes for a 5% standard error of ``tr(a)``, exactly: ``Var = 2 sum_{i != j} a_ij^2``."""
    off = float(a.pow(2).sum() - a.diagonal().pow(2).sum())
    return 2 * off / (0.05 * trace) ** 2


def transformer_floors(h: torch.Tensor, net, x, top: int = 8) -> str:
    """Why 8 probes miss 5% on the transformer: the floor of plain Hutchinson, after deflating the exact top
    ``top`` eigenvectors (by magnitude), and of ``H - GGN`` (the GGN's trace known exactly, Hutchinson on
    the rest)."""
    tr = float(h.diagonal().sum())
    g = dense_ggn(net, x)
    values, vectors = torch.linalg.eigh(h)
    u = vectors[:, values.abs().argsort(descending=True)[:top]]
    deflated = h - u @ (u.T @ h) - (h @ u) @ u.T + u @ (u.T @ h @ u) @ u.T
    return (f"floor {hutchinson_floor(h, tr):.0f}, with its top {top} eigenvectors deflated exactly "
            f"{hutchinson_floor(deflated, tr):.0f}; H - GGN (tr(GGN) = {float(g.diagonal().sum()):.4g} of {tr:.4g} "
            f"exactly, Hutchinson on the rest) {hutchinson_floor(h - g, tr):.0f}; |H|_F {float(h.norm()):.3g}, "
            f"|GGN|_F {float(g.norm()):.3g}, |H - GGN|_F {float((h - g).norm()):.3g}")


def check_transformer_reference() -> None:
    """The dense Hessian from HVPs (dynscope's second-order rules for GELU, LayerNorm, attention) against
    torch's autograd (``torch.autograd.functional.hessian``, generic double-backward formulas) and central
    differences of the gradient, on a tiny transformer in float64.

    Not ``torch.func.hessian``: on this model it is wrong (torch 2.13: off by 0.03 in the LayerNorm weights'
    rows, and not symmetric; its ``jacrev(jacrev)`` too), where autograd and finite differences agree to 1e-9.
    """
    from torch.autograd.functional import hessian

    torch.manual_seed(1)
    net = SmallTransformer(vocab=5, dim=4, heads=2, seq=3, classes=3, depth=1).double().eval()
    x, y = torch.randint(0, 5, (6, 3)), torch.randint(0, 3, (6,))
    names = [k for k, _ in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(flat):
        params, offset = {}, 0
        for k, p in net.named_parameters():
            params[k] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    with sdpa_kernel([SDPBackend.MATH]):
        exact = hessian(loss, theta)
        step, unit = 1e-6, torch.eye(len(theta), dtype=torch.float64)
        gradient = lambda t: torch.autograd.functional.jacobian(loss, t)  # noqa: E731
        central = torch.stack([(gradient(theta + step * e) - gradient(theta - step * e)) / (2 * step) for e in unit])
    scale = float(exact.abs().max())
    assert len(names) and float((central - exact).abs().max()) <= 1e-6 * scale, float((central - exact).abs().max())
    dense = dense_hessian(net, x, y, chunk=7)
    assert float((dense - exact).abs().max()) <= 1e-10 * scale, float((dense - exact).abs().max())


def cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main(quick: bool = False, step_batch: bool = False, every: int = 20, measure: int = 16, small: bool = False,
         replicates: int = 8, cnn: bool = False, transformer_model: bool = False) -> int:
    check_reference()
    if transformer_model:
        check_transformer_reference()
    torch.manual_seed(0)
    sizes = (20, 32, 32, 10) if small else ((16, 64, 64, 10) if quick else (64, 256, 256, 10))
    batch, steps = (64, 100) if quick else (128, 200)
    g = torch.Generator().manual_seed(0)
    if transformer_model:
        x, y = token_data(4096, g)
        net = transformer(quick)
        model = f"small transformer (GELU, LayerNorm, softmax attention{', 1 block, width 8' if quick else ''})"
    else:
        shape = (3, 16, 16) if cnn else (sizes[0],)
        x, y = torch.randn(4096, *shape, generator=g), torch.randint(0, 10, (4096,), generator=g)
        net = cnn_bn() if cnn else mlp(sizes)
        model = "CNN+BN (eval mode)" if cnn else f"MLP {sizes}"
    n = sum(p.numel() for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    # the exact trace tr(H) = tr(GGN) holds for piecewise-linear networks only
    variants = {name: kw for name, kw in VARIANTS.items() if not (transformer_model and name == "exact")}
    names = ["cold", *variants]
    trackers = [{name: CurvatureTracker(eigen_tol=1e-2, eigen_max_iter=30, **kw) for name, kw in variants.items()}
                for _ in range(replicates)]
    rows = []
    probes = rademacher(32, n, seed=123)
    previous = None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {model} ({n} parameters), batch {batch}; "
          f"measured every {every} steps on {'the first %d samples of the step batch' % measure if step_batch else 'a fixed set of %d samples' % measure}; "
          f"{replicates} independent replicates of each estimator (probe seeds)")
    if transformer_model:
        print("   references from the dense float64 Hessian (n HVPs with unit vectors): tr(H) its diagonal, lambda_max "
              "by Lanczos on it to 1e-10; the 'exact' variant does not apply (GELU, LayerNorm and softmax curve the "
              "output along single weights: tr(H) != tr(GGN)) and is skipped")
    print("   floor: probes plain Hutchinson needs for a 5% standard error; rho: |H_t - H_prev|_F / |H_t|_F; "
          "per estimator: HVPs lambda+trace, CPU s, median |error| of lambda_max and of tr(H) over the replicates")
    print(f"   {'step':>4} {'lambda':>8} {'tr(H)':>8} {'floor':>6} {'rho':>5} | "
          + " | ".join(f"{name:<11}: HVPs  cpu s  e_lam  e_tr" for name in names))
    for step in range(1, steps + 1):
        i = (step * batch) % (x.shape[0] - batch)
        opt.zero_grad()
        F.cross_entropy(net(x[i : i + batch]), y[i : i + batch]).backward()
        opt.step()
        if step % every and step != 1:
            continue
        xb, yb = (x[i : i + measure], y[i : i + measure]) if step_batch else (x[:measure], y[:measure])
        net.eval()
        op = HessianOperator(Objective(net, F.cross_entropy, (xb, yb)))
        if transformer_model:
            h = dense_hessian(net, xb, yb)
            ref = top_eigenvalues(MatrixOperator(h), which="LA", tol=1e-10, max_iter=300)
            assert ref.converged, ref
            lam, tr = ref.value, float(h.diagonal().sum())
            hz = probes.double() @ h
        else:
            lam = top_eigenvalues(op, which="LA", tol=1e-8, max_iter=80).value
            tr = ggn_trace(net, xb)
            hz = op.matmat(probes).double()
        sd1 = float((probes.double() * hz).sum(1).std())
        rho = float((hz - previous).norm() / hz.norm()) if previous is not None else float("nan")
        previous = hz
        row = {name: [] for name in names}
        for r in range(replicates):
            seed = 1000 * r + step
            order = names if (step // every + r) % 2 == 0 else names[::-1]  # interleaved
            for name in order:
                if name == "cold":
                    eig, t = cpu(lambda: top_eigenvalues(op, which="LA", tol=1e-2, max_iter=30, seed=seed))
                    trace, t_trace = cpu(lambda: hessian_trace(op, 8, seed=seed))
                elif name == "exact":  # tracked Lanczos alone; tr(H) = tr(GGN) of the ReLU network, no probes
                    res, t = cpu(lambda: trackers[r][name].measure(op, seed=seed, trace=False))
                    eig = res.eigen
                    trace, t_trace = cpu(lambda: gauss_newton_trace(op.objective))
                else:
                    res, t = cpu(lambda: trackers[r][name].measure(op, seed=seed))
                    eig, trace, t_trace = res.eigen, res.trace, math.nan
                row[name].append((eig.num_matvecs, trace.num_matvecs, t + (0.0 if math.isnan(t_trace) else t_trace),
                                  abs(eig.value - lam) / lam, abs(trace.value - tr) / abs(tr), t_trace))
        rows.append(row)
        med = {name: [statistics.median(v[j] for v in row[name]) for j in range(5)] for name in names}
        cells = " | ".join(f"{m[0]:>5.1f}+{m[1]:<3.0f} {m[2]:5.3f} {m[3]:6.2%} {m[4]:5.1%}" for m in (med[k] for k in names))
        print(f"   {step:>4} {lam:8.4g} {tr:8.4g} {(sd1 / (0.05 * tr)) ** 2:6.0f} {rho:5.2f} | {cells}", flush=True)
        if transformer_model and (step == 1 or step + every > steps):
            print(f"          step {step}: {transformer_floors(h, net, xb)}", flush=True)
        net.train()
    later = rows[1:]
    print("   after the first measurement, over measurements x replicates (HVPs and CPU s: medians; errors: median and RMS; "
          "shares within 1% / 5%):")
    for name in names:
        col = [v for r in later for v in r[name]]
        med = [statistics.median(c[j] for c in col) for j in range(5)]
        rms = [statistics.mean(c[j] ** 2 for c in col) ** 0.5 for j in (3, 4)]
        print(f"   {name:<12} HVPs {med[0]:.0f} (lambda, max {max(c[0] for c in col)}) + {med[1]:.0f} (trace), cpu {med[2]:.3f} s; "
              f"lambda err median {med[3]:.2%} rms {rms[0]:.2%} ({sum(c[3] <= 0.01 for c in col) / len(col):.0%} within 1%); "
              f"trace err median {med[4]:.1%} rms {rms[1]:.1%} ({sum(c[4] <= 0.05 for c in col) / len(col):.0%} within 5%)")
    if "exact" in names:
        exact = [v[5] for r in later for v in r["exact"]]
        hutch = [v[5] for r in later for v in r["cold"]]
        print(f"   the exact trace costs {statistics.median(exact) * 1e3:.1f} ms, cold Hutchinson's 8 HVPs "
              f"{statistics.median(hutch) * 1e3:.1f} ms: {statistics.median(exact) / statistics.median(hutch):.2f}x (medians)")
    print("   target: lambda_max to 1% and tr(H) to 5% in <= 8 HVPs each")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--small", action="store_true", help="the 2k MLP 20-32-32-10")
    parser.add_argument("--cnn", action="store_true", help="the CNN with BatchNorm of bench_anchors (measured in eval mode)")
    parser.add_argument("--transformer", action="store_true",
                        help="a 5k-parameter transformer (GELU, LayerNorm, attention) on token sequences; exact references from its dense Hessian")
    parser.add_argument("--step-batch", action="store_true", help="measure on each step's batch (not a fixed set)")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--measure", type=int, default=16, help="samples in the measurement set")
    parser.add_argument("--replicates", type=int, default=8, help="independent probe seeds per estimator")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.exit(main(args.quick, args.step_batch, args.every, args.measure, args.small, args.replicates, args.cnn, args.transformer))
