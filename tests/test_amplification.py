"""Variance amplification: the estimator, the probe, the rollout metrics, the EMA schedule, and the
unstable-vs-stable contrast in behaviour cloning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dynscope import Objective, amplification_probe, ema_decay, variance_amplification
from dynscope.rollouts import autoregressive_error, linear_dynamics, rollout_cost


# -- the estimator ---------------------------------------------------------------------------------

def test_scaled_metric_has_amplification_one():
    loss = np.cumsum(np.random.default_rng(0).normal(size=40)) + 100.0
    assert variance_amplification(7.0 * loss, loss) == pytest.approx(1.0, rel=1e-12)
    assert variance_amplification(-3.0 * loss, loss) == pytest.approx(1.0, rel=1e-12)


def test_offset_metric_closed_form():
    # J = L + c: same differences, so A = |mean L| / |mean L + c|
    loss = np.array([2.0, 2.5, 1.5, 3.0, 2.0, 2.4])
    c = 6.0
    assert variance_amplification(loss + c, loss) == pytest.approx(loss.mean() / (loss.mean() + c), rel=1e-12)


def test_alternating_series_closed_form():
    # J alternates by +-s around a, L by +-e around b: dJ = +-2s, dL = +-2e, so A = (s / a) / (e / b)
    n = np.arange(21)
    a, s, b, e = 50.0, 2.0, 0.3, 0.001
    J, L = a + s * (-1.0) ** n, b + e * (-1.0) ** n
    assert variance_amplification(J, L) == pytest.approx((s * L.mean() / J.mean()) / e, rel=1e-9)
    # with an odd count the means are a + s/21 and b + e/21; the window of 20 is exactly balanced
    assert variance_amplification(J, L, window=20) == pytest.approx((s / a) / (e / b), rel=1e-9)


def test_window_against_explicit_loop():
    rng = np.random.default_rng(1)
    J, L = rng.normal(10, 1, size=50), rng.normal(2, 0.1, size=50)

    def std(v):
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    def rel(v):
        return std([b - a for a, b in zip(v[:-1], v[1:])]) / abs(sum(v) / len(v))

    expected = rel(list(J[-12:])) / rel(list(L[-12:]))
    assert variance_amplification(J, L, window=12) == pytest.approx(expected, rel=1e-12)
    junk = np.concatenate([[1e6, -1e6], J])  # values before the window do not matter
    assert variance_amplification(junk, np.concatenate([[5.0, 1.0], L]), window=12) == pytest.approx(expected, rel=1e-12)


def test_zero_denominators():
    assert variance_amplification([1.0, 2.0, 4.0], [1.0, 1.0, 1.0]) == math.inf  # flat loss, moving metric
    assert math.isnan(variance_amplification([3.0, 3.0, 3.0], [1.0, 1.0, 1.0]))  # nothing moves
    assert variance_amplification([1.0, 2.0, 4.0, 3.0], [-1.0, 0.0, 2.0, -1.0]) == 0.0  # loss averages to 0
    assert variance_amplification([-1.0, 0.0, 2.0, -1.0], [1.0, 2.0, 4.0, 3.0]) == math.inf  # metric averages to 0


@pytest.mark.parametrize(
    "J, L, window, match",
    [
        ([1, 2, 3], [1, 2], None, "same length"),
        ([1, 2], [1, 2], None, "at least 3"),
        ([1, 2, 3, 4], [1, 2, 3, 4], 2, "window"),
        ([1, float("nan"), 3], [1, 2, 3], None, "non-finite"),
    ],
)
def test_estimator_errors(J, L, window, match):
    with pytest.raises(ValueError, match=match):
        variance_amplification(J, L, window=window)


# -- the probe -------------------------------------------------------------------------------------

def test_probe_against_closed_form_linear_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x, y = torch.randn(48, 3, dtype=torch.float64), torch.randn(48, 1, dtype=torch.float64)
    batches = [(x[i::4], y[i::4]) for i in range(4)]
    v, c = np.array([0.7, -1.3, 2.0]), 5.0
    metric = lambda m: c + float(m.weight.detach().numpy()[0] @ v)  # noqa: E731
    before = model.weight.detach().clone()
    lr = 0.05
    result = amplification_probe(Objective(model, nn.functional.mse_loss, (x, y)), metric, lr=lr, batches=batches)

    X, Y, w = x.numpy(), y.numpy()[:, 0], before.numpy()[0]
    loss = lambda w_: float(np.mean((X @ w_ - Y) ** 2))  # noqa: E731
    grads = [2.0 / len(b[0]) * b[0].numpy().T @ (b[0].numpy() @ w - b[1].numpy()[:, 0]) for b in batches]
    mean = sum(grads) / len(grads)
    deltas = [-lr * (g - mean) for g in grads]
    dJ = [float(d @ v) for d in deltas]
    dL = [loss(w + d) - loss(w) for d in deltas]
    J0 = c + float(w @ v)
    rms = lambda a: math.sqrt(sum(t * t for t in a) / len(a))  # noqa: E731
    assert result.metric == pytest.approx(J0, rel=1e-12)
    assert result.loss == pytest.approx(loss(w), rel=1e-12)
    assert result.metric_change == pytest.approx(rms(dJ) / abs(J0), rel=1e-9)
    assert result.loss_change == pytest.approx(rms(dL) / loss(w), rel=1e-9)
    assert result.amplification == pytest.approx((rms(dJ) / abs(J0)) / (rms(dL) / loss(w)), rel=1e-9)
    assert result.step_norm == pytest.approx(np.mean([np.linalg.norm(d) for d in deltas]), rel=1e-9)
    assert result.num_directions == 4
    assert torch.equal(model.weight, before) and model.weight.grad is None  # written back exactly


def test_probe_samples_minibatches_and_restores_modes():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    model.train()
    x, y = torch.randn(64, 2), torch.randn(64, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    metric = lambda m: float(m(torch.ones(4, 2)).sum())  # noqa: E731  deterministic only in eval mode
    a = amplification_probe(Objective(model, nn.functional.mse_loss, (x, y)), metric, lr=0.1, minibatch_size=8, seed=3)
    b = amplification_probe(Objective(model, nn.functional.mse_loss, (x, y)), metric, lr=0.1, minibatch_size=8, seed=3)
    assert a == b and a.num_directions == 8 and a.amplification > 0
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_probe_errors():
    model = nn.Linear(2, 1)
    obj = Objective(model, nn.functional.mse_loss, (torch.randn(8, 2), torch.randn(8, 1)))
    metric = lambda m: 1.0  # noqa: E731
    with pytest.raises(ValueError, match="lr"):
        amplification_probe(obj, metric, lr=0.0, minibatch_size=2)
    with pytest.raises(ValueError, match="minibatch_size"):
        amplification_probe(obj, metric, lr=0.1)
    with pytest.raises(ValueError, match="minibatch_size"):
        amplification_probe(obj, metric, lr=0.1, minibatch_size=8)
    with pytest.raises(ValueError, match="finite"):
        amplification_probe(obj, lambda m: float("inf"), lr=0.1, minibatch_size=2)


# -- rollout metrics -----------------------------------------------------------------------------

def test_rollout_cost_closed_form():
    a, b, k, H = 1.5, 1.0, -1.2, 20  # closed loop x_{t+1} = 0.3 x_t
    x0 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    rho = a + b * k
    expected = (1 + k * k) * sum(rho ** (2 * t) for t in range(H)) * float((x0 ** 2).mean())
    got = rollout_cost(lambda x: k * x, linear_dynamics(torch.tensor([[a]]), torch.tensor([[b]])), x0, H)
    assert got == pytest.approx(expected, rel=1e-12)


def test_rollout_cost_cap_on_diverging_trajectories():
    f = linear_dynamics(torch.tensor([[3.0]]), torch.tensor([[1.0]]))
    x0 = torch.tensor([[0.0], [1.0]])  # the first stays at 0 (cost 0), the second diverges
    assert rollout_cost(lambda x: 0 * x, f, x0, 500, max_cost=1e3) == pytest.approx(0.5 * 1e3)
    assert not math.isfinite(rollout_cost(lambda x: 0 * x, f, x0, 500))  # overflows without a cap
    with pytest.raises(ValueError, match="x0"):
        rollout_cost(lambda x: x, f, torch.zeros(3), 5)


def test_autoregressive_error_tokens_and_continuous():
    seq = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])

    def counter_that_fails_after(limit):
        def model(s):  # predicts s + 1, except that after token `limit` it predicts 0
            nxt = torch.where(s >= limit, torch.zeros_like(s), s + 1)
            return nn.functional.one_hot(nxt, 10).float()
        return model

    assert autoregressive_error(counter_that_fails_after(99), seq, 3, 5) == 0.0
    # prompt 0,1,2 -> 3, 4, then 0 (after 4), 1, 2 against 3,4,5,6,7: 3 of 5 wrong
    assert autoregressive_error(counter_that_fails_after(4), seq, 3, 5) == pytest.approx(3 / 5)

    p, steps = 2.0, 4
    truth = torch.tensor([p * 0.6 ** t for t in range(1 + steps)], dtype=torch.float64).reshape(1, -1, 1)
    got = autoregressive_error(lambda s: 0.5 * s, truth, 1, steps)
    expected = np.mean([(p * 0.5 ** t - p * 0.6 ** t) ** 2 for t in range(1, steps + 1)])
    assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="prompt_len"):
        autoregressive_error(lambda s: s, truth, 1, steps + 1)


# -- the EMA schedule ------------------------------------------------------------------------------

def test_ema_decay_schedules():
    for t in (1, 5, 50, 5000):
        assert ema_decay(t, 0.99, "inverse") == min(0.99, (1 + t) / (10 + t))
        assert ema_decay(t, 0.999, "polynomial", power=0.5) == min(0.999, 1 - (1 + t) ** -0.5)
        assert ema_decay(t, 0.9, "none") == 0.9
    for bad in (dict(decay=1.0), dict(warmup="cosine"), dict(power=0.0)):
        with pytest.raises(ValueError):
            ema_decay(1, **{"decay": 0.9, **bad})


# -- behaviour cloning: unstable vs stable ------------------------------------------------------------

def _bc_amplification(rho: float, steps: int = 1000, every: int = 10, window: int = 30, seed: int = 0) -> float:
    """Plain-torch BC of the demo's LQR expert with minibatch SGD; A over the last window."""
    from dynscope.cli.demo_gva import expert_data, make_module, make_system, rollout_metric

    A, B, K = make_system(rho)
    X, U = expert_data(A, B, K)
    metric = rollout_metric(A, B, horizon=50)
    policy = make_module(4, 2, 32, 0.05, seed=seed).policy
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(X), generator=g) for _ in range(steps * 32 // len(X) + 1)])
    reference = order[:256]  # the first training batches, as VarianceAmplification keeps them
    Js, Ls = [], []
    for step in range(1, steps + 1):
        idx = order[(step - 1) * 32:step * 32]  # epochs of shuffled batches (2000 = 62.5 batches: wraps)
        loss = nn.functional.mse_loss(policy(X[idx]), U[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0 and step > steps - every * window:
            with torch.no_grad():
                Ls.append(float(nn.functional.mse_loss(policy(X[reference]), U[reference])))
            Js.append(metric(policy))
    return variance_amplification(Js, Ls)


def test_unstable_system_amplifies_stable_does_not():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unstable, stable = _bc_amplification(1.2), _bc_amplification(0.5)
    finally:
        torch.set_num_threads(threads)
    # seeds 0-3 give 2.9-11.7 (unstable) and 0.64-1.0 (stable) here; the demo's longer Lightning runs about 7 and 0.9
    assert stable < 1.5
    assert unstable > 3.0
    assert unstable > 3 * stable
