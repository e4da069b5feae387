"""Edge-of-stability thresholds against the real torch optimizers: divergence found numerically (grid scans)."""

import math

import pytest
import torch

from dynscope import ParamLayout, top_eigenvalues
from dynscope.stability import (StabilityOperator, UnsupportedOptimizer, adam_threshold, sgd_threshold,
                                stability_scaling)


def _critical_curvature(make_opt, lo, hi, steps=1500, start=1e-100, num=4001):
    """The curvature at which the real optimizer starts diverging on ``lambda/2 theta^2``.

    Every coordinate of one parameter is its own 1-D quadratic (the optimizers act elementwise), so
    one run scans a log grid of curvatures; a coordinate diverges when it still grows over the last
    half of the run (after the bias-correction transient). The grid step is 0.1% at the default size.
    """
    lam = torch.logspace(math.log10(lo), math.log10(hi), num, dtype=torch.float64)
    w = torch.nn.Parameter(torch.full((num,), start, dtype=torch.float64))
    opt = make_opt([w])
    peak_mid = peak_end = None
    peak = torch.zeros(num, dtype=torch.float64)
    for t in range(steps):
        w.grad = lam * w.detach()
        opt.step()
        peak = torch.maximum(peak, w.detach().abs())
        if steps // 2 - 50 <= t < steps // 2:
            peak_mid = w.detach().abs() if peak_mid is None else torch.maximum(peak_mid, w.detach().abs())
        if t >= steps - 50:
            peak_end = w.detach().abs() if peak_end is None else torch.maximum(peak_end, w.detach().abs())
    # growing at the end, or grown so far that Adam's bounded steps caught it (it saturates; AMSGrad's
    # remembered second moment then even damps it): far beyond any transient of the bias correction
    grows = (peak_end > peak_mid) | (peak > 1e40 * start) | ~torch.isfinite(peak_end)
    assert not bool(grows[0]) and bool(grows[-1]), "the grid does not bracket the threshold"
    first = int(torch.nonzero(grows)[0])
    assert bool(grows[first:].all()), "divergence is not monotone in the curvature"
    return float(lam[first])


def _critical_scale(make_opt, base, lo, hi, steps=600, num=2001):
    """The c at which the real optimizer starts diverging on the quadratic with Hessian ``c * base``.

    Coordinate ``i`` of the optimizer's parameters is a tensor over a log grid of ``c``: the
    optimizers act elementwise, so one run scans the whole grid (grid step 0.1% at the default size).
    """
    n = base.shape[0]
    c = torch.logspace(math.log10(lo), math.log10(hi), num, dtype=torch.float64)
    params = [torch.nn.Parameter(torch.ones(num, dtype=torch.float64)) for _ in range(n)]
    opt = make_opt(params)
    for _ in range(steps):
        theta = torch.stack([p.detach() for p in params])  # [n, num]
        grad = c * (base @ theta)
        for p, g in zip(params, grad):
            p.grad = g.clone()
        opt.step()
    size = torch.stack([p.detach().abs() for p in params]).amax(0)
    grows = ~(size <= 1e3)  # inf and nan diverged too
    assert not bool(grows[0]) and bool(grows[-1]), "the grid does not bracket the threshold"
    first = int(torch.nonzero(grows)[0])
    assert bool(grows[first:].all()), "divergence is not monotone in the scale"
    return float(c[first])


ONE = torch.ones(1, 1, dtype=torch.float64)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(momentum=0.0), 20.0),
        (dict(momentum=0.9), 38.0),
        (dict(momentum=0.9, nesterov=True), 13.5714),
        (dict(momentum=0.9, dampening=0.5), 76.0),
        (dict(momentum=0.5, dampening=0.3), 3.0 / 0.7 / 0.1),
        (dict(momentum=0.5, nesterov=True), 15.0),
        (dict(momentum=0.0, dampening=0.5), 20.0),  # torch has no buffer without momentum
    ],
)
def test_sgd_threshold_matches_bisection_with_torch_sgd(kwargs, expected):
    lr = 0.1
    found = _critical_curvature(lambda ps: torch.optim.SGD(ps, lr=lr, **kwargs), 5.0, 200.0, start=1.0)
    derived = sgd_threshold(kwargs.get("momentum", 0.0), kwargs.get("dampening", 0.0), kwargs.get("nesterov", False)) / lr
    assert found == pytest.approx(expected, rel=0.01)
    assert derived == pytest.approx(found, rel=0.01)


def _ratio(opt, params, hessian):
    named = {f"p{i}": p for i, p in enumerate(params)}
    layout = ParamLayout.from_params({n: p.detach() for n, p in named.items()})
    scaling = stability_scaling(opt, named, layout)
    m = torch.diag(scaling.scale.sqrt()) @ hessian @ torch.diag(scaling.scale.sqrt())
    if scaling.shift is not None:
        m = m + torch.diag(scaling.shift)
    return float(torch.linalg.eigvalsh(m)[-1]), scaling


def test_param_groups_with_different_lr_and_weight_decay_give_the_ratio_of_the_scaled_operator():
    # coupled 2-D Hessian, two groups with their own lr (same momentum): exact in the scaled variables
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)

    def make(ps, wd=0.0):
        return torch.optim.SGD([{"params": [ps[0]], "lr": 0.1}, {"params": [ps[1]], "lr": 0.03}],
                               momentum=0.8, weight_decay=wd)

    for wd in (0.0, 0.5):
        c = _critical_scale(lambda ps: make(ps, wd), A, 0.5, 100.0)
        params = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)) for _ in range(2)]
        ratio, scaling = _ratio(make(params, wd), params, c * A)
        assert ratio == pytest.approx(1.0, rel=0.01), wd
        assert scaling.threshold is None and not scaling.uniform
    # one group: the ratio is lambda_max * lr / a*
    params = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)) for _ in range(2)]
    ratio, scaling = _ratio(torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True), params, A)
    assert scaling.uniform and scaling.threshold == pytest.approx(13.5714, rel=1e-4)
    assert ratio == pytest.approx(float(torch.linalg.eigvalsh(A)[-1]) / scaling.threshold, rel=1e-12)


def _adam_state_after(make_opt, hessian, steps, start=1e-100):
    params = [torch.nn.Parameter(torch.full((1,), start, dtype=torch.float64)) for _ in range(hessian.shape[0])]
    opt = make_opt(params)
    for _ in range(steps):
        grad = hessian @ torch.cat(params).detach()
        for p, g in zip(params, grad):
            p.grad = g.reshape(1).clone()
        opt.step()
    return opt, params


@pytest.mark.parametrize(
    "make",
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.1, eps=1.0), 380.0),
        (lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.5, 0.99), eps=1.0, amsgrad=True), 60.0),
        (lambda ps: torch.optim.AdamW(ps, lr=0.1, eps=1.0, weight_decay=2.0), 380.0 * 0.9),
        (lambda ps: torch.optim.Adam(ps, lr=0.1, eps=1.0, weight_decay=1.0), 379.0),
    ],
    ids=["adam", "amsgrad", "adamw", "adam-l2"],
)
def test_adam_ratio_is_one_at_the_divergence_found_by_bisection(make):
    # eps >> sqrt(v) freezes the preconditioner at ~eps, so the real Adam step is linear and can diverge
    make, expected = make
    c = _critical_curvature(make, expected / 3, expected * 3, steps=2000)
    assert c == pytest.approx(expected, rel=0.01)
    opt, params = _adam_state_after(make, c * 0.97 * ONE, steps=2000)
    ratio, scaling = _ratio(opt, params, c * 0.97 * ONE)
    assert ratio == pytest.approx(0.97, rel=0.01)
    assert scaling.kind == "adam"


def test_adam_preconditioner_is_the_one_the_update_applied_with_bias_correction_and_amsgrad():
    # P from the state must reproduce the step that torch took: delta = -lr * m / P (m without bias correction)
    torch.manual_seed(0)
    H = torch.diag(torch.tensor([3.0, 0.5, 10.0], dtype=torch.float64))
    for amsgrad in (False, True):
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.3], dtype=torch.float64))
        opt = torch.optim.Adam([w], lr=0.05, betas=(0.9, 0.95), amsgrad=amsgrad)
        layout = ParamLayout.from_params({"w": w.detach()})
        for step in range(1, 26):
            before = w.detach().clone()
            w.grad = (H @ w.detach()) * (1.0 if step % 3 else 0.2)  # shrinking gradients: amsgrad's max matters
            opt.step()
            scaling = stability_scaling(opt, {"w": w}, layout)
            m = opt.state[w]["exp_avg"]
            implied = -0.05 * m / (w.detach() - before)
            assert torch.allclose(scaling.preconditioner, implied, rtol=1e-9), (amsgrad, step)
            thr = adam_threshold(0.05, 0.9)
            assert torch.allclose(scaling.scale, 1.0 / (implied * thr), rtol=1e-9)
        if step == 1:
            pass
    # at step 1 the bias correction (1 - beta1) makes P ten times smaller than sqrt(v_hat) + eps
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    scaling = stability_scaling(opt, {"w": w}, ParamLayout.from_params({"w": w.detach()}))
    assert float(scaling.preconditioner) == pytest.approx(0.1 * (2.0 + 1e-8), rel=1e-9)


def test_unused_and_never_updated_parameters_are_excluded_not_fatal():
    used = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    idle = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    zero = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = torch.optim.Adam([used, idle, zero], lr=0.01)
    used.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    zero.grad = torch.zeros(1, dtype=torch.float64)  # state exists, v == 0: never a gradient
    opt.step()
    named = {"used": used, "idle": idle, "zero": zero}
    scaling = stability_scaling(opt, named, ParamLayout.from_params({n: p.detach() for n, p in named.items()}))
    assert scaling.excluded == ["idle", "zero"]
    assert bool((scaling.scale[:2] > 0).all()) and bool((scaling.scale[2:] == 0).all())


@pytest.mark.parametrize("cls", [torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax, torch.optim.RMSprop,
                                 torch.optim.Adagrad])
def test_unsupported_optimizers_say_so(cls):
    w = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UnsupportedOptimizer, match=cls.__name__):
        stability_scaling(cls([w]), {"w": w}, ParamLayout.from_params({"w": w.detach()}))


def test_stability_operator_matches_the_dense_matrix():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A = a @ a.T
    s = torch.rand(5, generator=g, dtype=torch.float64)
    d = torch.rand(5, generator=g, dtype=torch.float64)
    from dynscope import MatrixOperator

    op = StabilityOperator(MatrixOperator(A), s, d)
    dense = torch.diag(s.sqrt()) @ A @ torch.diag(s.sqrt()) + torch.diag(d)
    assert torch.allclose(op.matmat(torch.eye(5, dtype=torch.float64)), dense)
    assert top_eigenvalues(op, which="LA", tol=1e-8).value == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]))


# -- the batch-size-aware linear stability ratio -------------------------------------------------------------


def _mean_square_boundary(X, B):
    """The largest lr at which SGD (batch B, with replacement) is mean-square stable on the interpolating
    least-squares problem with per-sample Hessians x_i x_i^T: spectral radius of E[A_B (x) A_B] = 1."""
    N, d = X.shape
    Hs = torch.einsum("ni,nj->nij", X, X)
    H = Hs.mean(0)
    EHH = torch.einsum("nij,nkl->ikjl", Hs, Hs).reshape(d * d, d * d) / N
    HH = torch.kron(H, H)
    eye = torch.eye(d, dtype=torch.float64)

    def rho(lr):
        A = eye - lr * H
        return float(torch.linalg.eigvals(torch.kron(A, A) + lr**2 / B * (EHH - HH)).abs().max())

    lo, hi = 1e-4, 10.0
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if rho(mid) > 1 else (mid, hi)
    return lo, H


@pytest.mark.parametrize("equal_norms", [True, False])
def test_linear_stability_ratio_at_the_exact_mean_square_boundary(equal_norms):
    from dynscope.stability import linear_stability_ratio

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    if equal_norms:
        X = X / X.norm(dim=1, keepdim=True) * math.sqrt(6)
    for B in (1, 4, 32, 10_000):
        lr, H = _mean_square_boundary(X, B)
        ev = torch.linalg.eigvalsh(H)
        ratio = linear_stability_ratio(lr, float(ev[-1]), float(ev.sum()), B)
        trace_ratio = lr * float(ev.sum()) / 2
        if equal_norms and B in (1, 10_000):
            assert ratio == pytest.approx(1.0, abs=3e-3), B  # Wu and Su's bound at B = 1, the EoS at full batch
        assert (0.95 if equal_norms else 0.4) <= ratio <= 1.15, (B, ratio)  # stable runs: ratio <= 1.15
        if B >= 32:
            assert trace_ratio > 1.4  # the single-sample bound misreads a stable batch-32 run
