"""Trace and eigenvalue estimators against exact spectra."""

import math

import pytest
import torch
import torch.nn.functional as F

from dynscope import MatrixOperator, Objective, ScaledOperator, directional_sharpness, hessian_trace, top_eigenvalues
from dynscope.sharpness import clip_top_coordinates
from models import TinyTransformer, classification_data, mlp
from reference import exact_hessian


def _spd(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    eig = torch.linspace(10.0, 0.1, n, dtype=torch.float64)
    if rank is not None:
        eig[rank:] = 0.0
    return U @ torch.diag(eig) @ U.T


@pytest.fixture(scope="module")
def trained_mlp():
    torch.manual_seed(0)
    net = mlp((5, 12, 3))
    x, y = classification_data(64, (5,), seed=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    obj = Objective(net, F.cross_entropy, (x, y))
    return obj, exact_hessian(obj)


def test_hutchinson_is_exact_for_a_diagonal_matrix():
    # Rademacher probes: z^T D z = tr(D) for every probe, so the estimate is exact and the stderr 0.
    D = torch.diag(torch.tensor([1.0, -2.0, 5.0, 0.5]))
    result = hessian_trace(D, num_matvecs=3, seed=0)
    assert result.value == pytest.approx(4.5)
    assert result.stderr == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_hutch_plus_plus_is_exact_when_rank_fits_the_sketch(rank):
    A = _spd(40, rank=rank)
    result = hessian_trace(A, num_matvecs=3 * 7, method="hutch++", seed=1)
    assert result.value == pytest.approx(float(torch.trace(A)), rel=1e-9)


def test_hutchinson_interval_covers_the_true_trace_at_the_nominal_rate(trained_mlp):
    obj, H = trained_mlp
    truth = float(torch.trace(H))
    covered = 0
    seeds = range(60)
    for seed in seeds:
        r = hessian_trace(obj, num_matvecs=16, seed=seed)
        covered += abs(r.value - truth) <= 1.96 * r.stderr
    # nominal 95%; with 16 probes the t-interval is a bit wider than 1.96: allow 85%..100%
    assert covered / len(seeds) >= 0.85


def test_per_layer_traces_are_the_diagonal_blocks(trained_mlp):
    obj, H = trained_mlp
    result = hessian_trace(obj, num_matvecs=3 * 60, method="hutch++", seed=0)
    for name, sl in obj.layout.slices().items():
        block = float(torch.trace(H[sl, sl]))
        assert result.per_layer[name] == pytest.approx(block, abs=0.05 * abs(float(torch.trace(H))))
    assert sum(result.per_layer.values()) == pytest.approx(result.value, rel=1e-9)
    hutch = hessian_trace(obj, num_matvecs=8, seed=0)
    assert sum(hutch.per_layer.values()) == pytest.approx(hutch.value, rel=1e-9)


def test_hutch_plus_plus_beats_hutchinson_on_a_trained_network(trained_mlp):
    obj, H = trained_mlp
    truth = float(torch.trace(H))
    err = {m: [] for m in ("hutchinson", "hutch++")}
    for seed in range(10):
        for m in err:
            err[m].append(abs(hessian_trace(obj, num_matvecs=30, method=m, seed=seed).value - truth) / truth)
    assert sorted(err["hutch++"])[5] < sorted(err["hutchinson"])[5]


def test_lanczos_top_eigenvalues_match_eigvalsh(trained_mlp):
    obj, H = trained_mlp
    exact = torch.linalg.eigvalsh(H.double())
    by_magnitude = exact[exact.abs().argsort(descending=True)]
    result = top_eigenvalues(obj, k=3, tol=1e-6, max_iter=obj.layout.numel)
    assert result.converged
    for got, want in zip(result.eigenvalues, by_magnitude[:3]):
        assert got == pytest.approx(float(want), abs=1e-3)
    top = top_eigenvalues(obj, which="LA")
    assert top.value == pytest.approx(float(exact[-1]), rel=1e-3)
    assert top.num_matvecs < obj.layout.numel  # converged early, not by exhausting the space


def test_lanczos_eigenvector_and_warm_start():
    A = _spd(30, seed=2)
    first = top_eigenvalues(A, which="LA", tol=1e-8, max_iter=30, return_eigenvectors=True)
    v = first.eigenvectors[0].double()
    assert torch.allclose(A @ v, first.value * v, atol=1e-5)
    warm = top_eigenvalues(A, which="LA", tol=1e-6, start=v)
    assert warm.num_matvecs <= 2
    assert warm.value == pytest.approx(10.0, rel=1e-6)


def test_lanczos_negative_dominant_spectrum():
    A = torch.diag(torch.tensor([1.0, 2.0, -9.0, 0.5], dtype=torch.float64))
    assert top_eigenvalues(A).value == pytest.approx(-9.0)
    assert top_eigenvalues(A, which="LA").value == pytest.approx(2.0)


def test_scaled_operator_gives_preconditioned_eigenvalues():
    A = _spd(6, seed=4)
    p = torch.rand(6, dtype=torch.float64) + 0.5
    scaled = ScaledOperator(MatrixOperator(A), p.rsqrt())
    expected = torch.linalg.eigvals(torch.diag(1 / p) @ A).real.max()
    assert top_eigenvalues(scaled, which="LA", tol=1e-8).value == pytest.approx(float(expected), rel=1e-6)


def test_directional_sharpness_matches_the_quadratic_form():
    torch.manual_seed(0)
    net = TinyTransformer(dim=4, heads=2)
    obj = Objective(net, F.cross_entropy, classification_data(6, (5,), vocab=11))
    H = exact_hessian(obj)
    u = {n: torch.randn_like(p) for n, p in obj.params.items()}
    flat = obj.layout.flatten(u, batch_dims=0)
    expected = float(flat @ H @ flat / (flat @ flat))
    assert directional_sharpness(obj, u) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="zero"):
        directional_sharpness(obj, {n: torch.zeros_like(p) for n, p in obj.params.items()})
    with pytest.raises(ValueError, match="shape"):
        directional_sharpness(obj, {n: torch.zeros(2) for n in obj.params})


def test_coordinate_clipping():
    out = clip_top_coordinates({"a": torch.tensor([4.0, -0.1]), "b": torch.tensor([[-3.0, 0.2]])}, 0.5, 1.0)
    assert out["a"].tolist() == [1.0, pytest.approx(-0.1)]
    assert out["b"].tolist() == [[-1.0, pytest.approx(0.2)]]


def test_estimator_arguments_are_checked():
    A = torch.eye(3)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(A, method="exact")
    with pytest.raises(ValueError, match="at least 3"):
        hessian_trace(A, num_matvecs=2, method="hutch++")
    with pytest.raises(ValueError, match="k must"):
        top_eigenvalues(A, k=5)
    with pytest.raises(TypeError, match="Objective"):
        hessian_trace("not an operator")
    assert math.isnan(hessian_trace(A, num_matvecs=1).stderr)
