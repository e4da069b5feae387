"""The deflated trace keeps its probes in the operator's dtype (issue 14, item 7): the value is the
estimator's float64 value up to float32 rounding, computed here by hand from the same probes."""

from collections import OrderedDict

import pytest
import torch

from dynscope import MatrixOperator
from dynscope.params import ParamLayout
from dynscope.trace import RademacherProbes, deflated_hutchinson, orthonormalize
from dynscope.tracking import CurvatureTracker


def _problem(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, dtype=torch.float64, generator=g)
    h = (a + a.T) / 2 + torch.diag(torch.linspace(0.0, 30.0, n, dtype=torch.float64))
    layout = ParamLayout.from_params(OrderedDict([("w", torch.zeros(10, 5)), ("b", torch.zeros(10))]))
    basis = torch.randn(3, n, dtype=torch.float64, generator=g)
    return h, layout, basis


def _by_hand(h, basis, num, seed):
    """tr(U H U^T) + mean_i z_i'^T H z_i' and its per-block parts, all in float64."""
    u, _ = orthonormalize(basis)
    p = u.T @ u
    z = RademacherProbes(num, h.shape[0], seed).rows(0, num).double()
    zp = z - z @ p
    rows = zp * (zp @ h)
    head = torch.diag(p @ h + h @ p - p @ h @ p)
    return float(torch.trace(u @ h @ u.T) + rows.sum(1).mean()), head + rows.mean(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deflated_trace_in_the_operators_dtype_matches_the_float64_estimate(dtype):
    h, layout, basis = _problem()
    value, contributions = _by_hand(h, basis, 6, seed=3)
    op = MatrixOperator(h.to(dtype), layout=layout)
    got = deflated_hutchinson(op, 6, basis=basis, products=basis @ h, seed=3)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    scale = float(torch.linalg.matrix_norm(h)) * 6
    assert got.value == pytest.approx(value, abs=tol * scale)
    assert got.per_layer["w"] == pytest.approx(float(contributions[:50].sum()), abs=tol * scale)
    assert got.per_layer["b"] == pytest.approx(float(contributions[50:].sum()), abs=tol * scale)


def test_tracked_trace_float32_matches_float64():
    """The same tracker run on the float32 and float64 versions of one matrix sequence: the values
    differ by rounding only (the probes, carried sets and memory weights are the same)."""
    h, layout, _ = _problem()
    g = torch.Generator().manual_seed(1)
    drift = torch.randn(60, 60, dtype=torch.float64, generator=g)
    values = {}
    for dtype in (torch.float64, torch.float32):
        tracker = CurvatureTracker(trace_matvecs=6, sketch=0, eigen_tol=1e-3, eigen_max_iter=20, memory="auto")
        values[dtype] = []
        for step in range(4):
            m = h + 0.05 * step * (drift + drift.T)
            got = tracker.measure(MatrixOperator(m.to(dtype), layout=layout), seed=step)
            values[dtype].append((got.trace.value, got.trace.per_layer["w"]))
    scale = float(torch.linalg.matrix_norm(h)) * 6
    for (v64, w64), (v32, w32) in zip(values[torch.float64], values[torch.float32]):
        assert v32 == pytest.approx(v64, abs=1e-4 * scale)
        assert w32 == pytest.approx(w64, abs=1e-4 * scale)
