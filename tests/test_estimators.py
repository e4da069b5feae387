"""Trace and eigenvalue estimators against exact spectra."""

import math

import pytest
import torch
import torch.nn.functional as F

from dynscope import MatrixOperator, Objective, ScaledOperator, directional_sharpness, hessian_trace, top_eigenvalues
from dynscope.gauss_newton import NotExact
from dynscope.sharpness import clip_top_coordinates
from dynscope.trace import xtrace
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


class _Recording(MatrixOperator):
    """A matrix operator that keeps the vectors it is given."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.inputs = []

    def matmat(self, vectors):
        self.inputs.append(vectors.clone())
        return super().matmat(vectors)


def _leave_one_out_reference(A, W):
    """XTrace from its definition: for each i an explicit QR of A W_{-i} and the normalised probe w_i."""
    k, n = W.shape
    samples = []
    for i in range(k):
        Q = torch.linalg.qr(A @ torch.cat([W[:i], W[i + 1 :]]).T).Q
        u = W[i] - Q @ (Q.T @ W[i])
        samples.append(torch.trace(Q.T @ A @ Q) + (n - k + 1) / (u @ u) * (u @ A @ u))
    samples = torch.stack(samples)
    return float(samples.mean()), float(samples.std() / math.sqrt(k))


@pytest.mark.parametrize("n,m", [(12, 8), (30, 10), (50, 21)])
def test_xtrace_matches_its_leave_one_out_definition(n, m):
    g = torch.Generator().manual_seed(n)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = B + B.T  # symmetric, indefinite
    op = _Recording(A)
    result = xtrace(op, m, seed=3)
    assert result.num_matvecs == 2 * (m // 2) == op.num_matvecs
    value, stderr = _leave_one_out_reference(A, op.inputs[0])
    assert result.value == pytest.approx(value, rel=1e-10, abs=1e-10)
    assert result.stderr == pytest.approx(stderr, rel=1e-10)


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_xtrace_is_exact_when_rank_is_below_half_the_budget(rank):
    A = _spd(40, rank=rank)
    result = hessian_trace(A, num_matvecs=2 * 8, method="xtrace", seed=1)
    assert result.value == pytest.approx(float(torch.trace(A)), rel=1e-9)
    assert result.stderr == pytest.approx(0.0, abs=1e-9 * float(torch.trace(A)))


def test_xtrace_exact_cases_with_a_singular_sketch_and_a_small_matrix():
    # rank 3 < k = 4 with exactly zero rows: H W is exactly singular (the null-direction path)
    D = torch.diag(torch.tensor([1.0, -2.0, 5.0] + [0.0] * 9, dtype=torch.float64))
    assert hessian_trace(D, num_matvecs=8, method="xtrace", seed=0).value == pytest.approx(4.0, rel=1e-12)
    # m / 2 >= n: the exact trace from n unit vectors, and the matvecs actually spent
    A = _spd(5, seed=3)
    small = hessian_trace(MatrixOperator(A), num_matvecs=12, method="xtrace", seed=0)
    assert small.value == pytest.approx(float(torch.trace(A)), rel=1e-12)
    assert small.num_matvecs == 5 and small.stderr == 0.0


def test_xtrace_is_unbiased_on_an_indefinite_matrix():
    g = torch.Generator().manual_seed(7)
    B = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = (B + B.T) / 2 + torch.diag(torch.linspace(0.0, 5.0, 30, dtype=torch.float64))
    truth = float(torch.trace(A))
    values = torch.tensor([hessian_trace(A, num_matvecs=8, method="xtrace", seed=s).value for s in range(400)])
    # the mean of 400 independent unbiased estimates is within 4 of its standard errors of the truth
    assert abs(float(values.mean()) - truth) < 4 * float(values.std()) / math.sqrt(len(values))


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


@pytest.mark.parametrize("method, num_matvecs", [("hutch++", 12), ("hutch++", 48), ("xtrace", 12), ("xtrace", 48)])
def test_sketching_estimators_report_an_honest_standard_error(trained_mlp, method, num_matvecs):
    # over many seeds: the reported stderr matches the estimates' actual spread and +-2 stderr covers the trace
    _, H = trained_mlp
    H = H.double()
    truth = float(torch.trace(H))
    results = [hessian_trace(H, num_matvecs=num_matvecs, method=method, seed=seed) for seed in range(200)]
    values = torch.tensor([r.value for r in results], dtype=torch.float64)
    stderrs = torch.tensor([r.stderr for r in results], dtype=torch.float64)
    assert bool(torch.isfinite(stderrs).all())
    spread = float(((values - truth) ** 2).mean().sqrt())
    assert 0.7 <= float(stderrs.mean()) / spread <= 1.4
    # 95% intervals with Student's t quantile for the stderr's degrees of freedom
    quantile = {3: 3.182, 5: 2.571, 15: 2.131, 23: 2.069}[results[0].dof]
    coverage = float(((values - truth).abs() <= quantile * stderrs).double().mean())
    # XTrace's leave-one-out estimates share their sketch: its error estimate runs ~15% low (documented)
    assert coverage >= (0.88 if method == "hutch++" else 0.84)


def test_per_layer_traces_are_the_diagonal_blocks(trained_mlp):
    obj, H = trained_mlp
    result = hessian_trace(obj, num_matvecs=3 * 60, method="hutch++", seed=0)
    for name, sl in obj.layout.slices().items():
        block = float(torch.trace(H[sl, sl]))
        assert result.per_layer[name] == pytest.approx(block, abs=0.05 * abs(float(torch.trace(H))))
    assert sum(result.per_layer.values()) == pytest.approx(result.value, rel=1e-9)
    hutch = hessian_trace(obj, num_matvecs=8, seed=0)
    assert sum(hutch.per_layer.values()) == pytest.approx(hutch.value, rel=1e-9)
    n = obj.layout.numel
    xt = hessian_trace(obj, num_matvecs=n + 9, method="xtrace", seed=0)  # k = (n + 9) // 2 < n
    assert xt.num_matvecs == 2 * ((n + 9) // 2) < 2 * n
    for name, sl in obj.layout.slices().items():
        block = float(torch.trace(H[sl, sl]))
        assert xt.per_layer[name] == pytest.approx(block, abs=0.05 * abs(float(torch.trace(H))))
    assert sum(xt.per_layer.values()) == pytest.approx(xt.value, rel=1e-9)
    small = hessian_trace(obj, num_matvecs=6, method="xtrace", seed=0)
    assert sum(small.per_layer.values()) == pytest.approx(small.value, rel=1e-9)


def test_sketching_estimators_beat_hutchinson_on_a_trained_network(trained_mlp):
    obj, H = trained_mlp
    truth = float(torch.trace(H))
    err = {m: [] for m in ("hutchinson", "hutch++", "xtrace")}
    for seed in range(10):
        for m in err:
            err[m].append(abs(hessian_trace(obj, num_matvecs=30, method=m, seed=seed).value - truth) / truth)
    assert sorted(err["hutch++"])[5] < sorted(err["hutchinson"])[5]
    assert sorted(err["xtrace"])[5] < sorted(err["hutchinson"])[5]


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
    # the Ritz pair's residual is the one Lanczos reports (a 1e-8 eigenvalue needs only ~sqrt(1e-8 * gap) of it)
    assert float((A @ v - first.value * v).norm()) == pytest.approx(first.residuals[0], rel=1e-6, abs=1e-12)
    assert first.residuals[0] < 1e-3
    warm = top_eigenvalues(A, which="LA", tol=1e-6, start=v)
    assert warm.num_matvecs <= 3  # the bound must hold at two consecutive steps
    assert warm.value == pytest.approx(10.0, rel=1e-6)


def test_lanczos_negative_dominant_spectrum():
    A = torch.diag(torch.tensor([1.0, 2.0, -9.0, 0.5], dtype=torch.float64))
    assert top_eigenvalues(A).value == pytest.approx(-9.0, rel=1e-3)  # the default tol: 0.1%
    assert top_eigenvalues(A, which="LA", tol=1e-8).value == pytest.approx(2.0, rel=1e-8)


@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-3])
def test_lanczos_stops_when_the_eigenvalue_is_within_tol(trained_mlp, tol):
    # The tolerance is the relative error of the eigenvalue, and the stopping rule bounds it.
    obj, H = trained_mlp
    spectrum = torch.linalg.eigvalsh(H.double())
    exact = float(spectrum[-1])
    for seed in range(5):
        result = top_eigenvalues(obj, which="LA", tol=tol, seed=seed)
        assert result.converged and abs(result.value - exact) <= tol * abs(exact)
        # the residual bounds the distance to the nearest eigenvalue, whatever the spectrum
        assert float((spectrum - result.value).abs().min()) <= result.residuals[0] * (1 + 1e-6) + 1e-9
    loose, tight = (top_eigenvalues(obj, which="LA", tol=t, seed=0).num_matvecs for t in (1e-1, 1e-6))
    assert loose < tight  # a looser tolerance spends fewer HVPs


def test_lanczos_reports_not_converged_when_the_steps_run_out():
    A = _spd(40, seed=5)
    result = top_eigenvalues(A, which="LA", tol=1e-12, max_iter=3)
    assert not result.converged and result.num_matvecs == 3
    assert float((torch.linalg.eigvalsh(A) - result.value).abs().min()) <= result.residuals[0] + 1e-12


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
        hessian_trace(A, method="exactly")
    with pytest.raises(NotExact, match="not an Objective"):  # the exact trace needs the network, not a matrix
        hessian_trace(A, method="exact")
    assert hessian_trace(A, num_matvecs=4, method="auto").method == "hutchinson"
    with pytest.raises(ValueError, match="at least 3"):
        hessian_trace(A, num_matvecs=2, method="hutch++")
    with pytest.raises(ValueError, match="XTrace needs at least 4"):
        hessian_trace(A, num_matvecs=3, method="xtrace")
    with pytest.raises(ValueError, match="k must"):
        top_eigenvalues(A, k=5)
    with pytest.raises(TypeError, match="Objective"):
        hessian_trace("not an operator")
    assert math.isnan(hessian_trace(A, num_matvecs=1).stderr)


# -- tracking across measurements ---------------------------------------------------------------------
def _drifting_matrices(n=200, steps=12, seed=0):
    """A slowly rotating, slowly growing spectrum: four outliers over a flat bulk (known exactly)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    skew = torch.randn(n, n, generator=g, dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(0.01 * (skew - skew.T) / math.sqrt(n))
    bulk = torch.full((n - 4,), 0.05, dtype=torch.float64)
    for t in range(steps):
        eig = torch.cat([torch.tensor([100.0, 60.0, 40.0, 30.0], dtype=torch.float64) * (1 + 0.01 * t), bulk])
        yield basis @ torch.diag(eig) @ basis.T, eig
        basis = rotation @ basis


def test_tracking_a_slowly_drifting_matrix_takes_few_matvecs_per_measurement():
    from dynscope.tracking import CurvatureTracker
    from dynscope.trace import deflated_hutchinson

    tracker = CurvatureTracker(trace_matvecs=4, sketch=4, eigen_tol=1e-2)
    cold_matvecs, warm_matvecs, plain_errors = [], [], []
    for t, (A, eig) in enumerate(_drifting_matrices()):
        got = tracker.measure(MatrixOperator(A), seed=t)
        lam, trace = float(eig.max()), float(eig.sum())
        assert abs(got.eigen.value - lam) <= 0.01 * lam and got.eigen.converged
        assert abs(got.trace.value - trace) <= 0.05 * trace
        if t > 0:  # after the first measurement: at most 8 HVPs each
            assert got.eigen.num_matvecs <= 8 and got.trace.num_matvecs <= 8
        cold_matvecs.append(top_eigenvalues(A, which="LA", tol=1e-2, seed=t).num_matvecs)
        warm_matvecs.append(got.eigen.num_matvecs)
        plain_errors.append(abs(hessian_trace(A, 8, seed=t).value - trace) / trace)
    assert sum(warm_matvecs[1:]) < sum(cold_matvecs[1:])  # the warm start pays
    assert sorted(plain_errors)[len(plain_errors) // 2] > 0.05  # undeflated Hutchinson misses 5% with 8 probes
    with pytest.raises(ValueError, match="positive"):
        deflated_hutchinson(MatrixOperator(torch.eye(3)), 0)


def _flat_drifting_matrices(n=60, steps=8, seed=0):
    """A flat, indefinite spectrum (no small subspace holds the trace) that rotates and grows 2% a step."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    skew = torch.randn(n, n, generator=g, dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(0.02 * (skew - skew.T) / math.sqrt(n))
    for t in range(steps):
        eig = torch.linspace(-1.0, 3.0, n, dtype=torch.float64) * (1 + 0.02 * t)
        yield basis @ torch.diag(eig) @ basis.T, eig
        basis = rotation @ basis


def _unrelated_matrices(n=60, steps=8, seed=0):
    """A new random eigenbasis at every measurement, the scale alternating: nothing persists."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
        eig = torch.linspace(-1.0, 3.0, n, dtype=torch.float64) * (1 + 0.5 * (t % 2))
        yield basis @ torch.diag(eig) @ basis.T, eig


def _tracked_trace_errors(mats, memory, reps=60):
    from dynscope.tracking import CurvatureTracker

    errors, z_scores = [], []
    for rep in range(reps):
        tracker = CurvatureTracker(trace_matvecs=8, sketch=0, eigen_tol=1e-2, memory=memory)
        for t, (A, eig) in enumerate(mats):
            got = tracker.measure(MatrixOperator(A), seed=1000 * rep + t)  # the same probes for every memory
            assert got.trace.num_matvecs == 8  # lambda_max: see the tests above (these spectra have no gap)
            if t >= 3:
                errors.append(got.trace.value - float(eig.sum()))
                z_scores.append(errors[-1] / got.trace.stderr)
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    return rms, sum(errors) / len(errors), math.sqrt(sum(z * z for z in z_scores) / len(z_scores)), len(errors)


def test_carried_probes_track_the_trace_of_a_drifting_matrix_without_bias_and_with_an_honest_stderr():
    from dynscope.tracking import CurvatureTracker

    drifting, unrelated = list(_flat_drifting_matrices()), list(_unrelated_matrices())
    cold = _tracked_trace_errors(drifting, 0.0)[0]
    for memory in (0.7, "auto"):
        rms, mean, z_rms, count = _tracked_trace_errors(drifting, memory)
        assert rms < 0.8 * cold  # the carried probes pay on a slowly drifting matrix
        assert abs(mean) < 3 * rms / math.sqrt(count / 5)  # unbiased (measurements of one run correlate)
        assert 0.8 < z_rms < 1.35  # the stderr is the spread it claims
    # when nothing persists, a fixed memory costs accuracy; "auto" lowers its weight and stays near cold
    cold = _tracked_trace_errors(unrelated, 0.0)[0]
    assert _tracked_trace_errors(unrelated, 0.7)[0] > 1.4 * cold
    rms, mean, z_rms, count = _tracked_trace_errors(unrelated, "auto")
    assert rms < 1.3 * cold and abs(mean) < 3 * rms / math.sqrt(count / 5) and 0.8 < z_rms < 1.4
    with pytest.raises(ValueError, match="memory"):
        CurvatureTracker(memory=1.0)
    with pytest.raises(ValueError, match="trace_matvecs >= 4"):
        CurvatureTracker(trace_matvecs=3, memory="auto")


@pytest.mark.parametrize("memory", [0.0, 0.7, "auto"])
def test_tracking_along_a_training_trajectory_matches_eigvalsh(memory):
    from dynscope.tracking import CurvatureTracker

    torch.manual_seed(0)
    net = mlp((5, 12, 3))
    x, y = classification_data(64, (5,), seed=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    tracker = CurvatureTracker(trace_matvecs=4, sketch=0 if memory else 4, eigen_tol=1e-2, memory=memory)
    z_scores = []
    for step in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if step % 10:
            continue
        obj = Objective(net, F.cross_entropy, (x, y))
        H = exact_hessian(obj)
        exact = torch.linalg.eigvalsh(H)
        got = tracker.measure(obj)
        assert got.eigen.value == pytest.approx(float(exact[-1]), rel=1e-2)
        z_scores.append((got.trace.value - float(exact.sum())) / got.trace.stderr)
        per_layer = sum(got.trace.per_layer.values())
        assert per_layer == pytest.approx(got.trace.value, rel=1e-9)
    assert tracker.num_measurements == 6
    assert all(abs(z) < 4 for z in z_scores)  # unbiased, with an honest standard error
@pytest.mark.parametrize("hvp_method", ["forward", "reverse", "loop"])
def test_hessian_trace_takes_the_hvp_kernel_and_the_estimator_by_separate_names(hvp_method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
    obj = Objective(net, F.cross_entropy, (torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))))
    exact = float(torch.trace(exact_hessian(obj)))  # 14 parameters: 42 matvecs make Hutch++ exact
    new = hessian_trace(obj, num_matvecs=42, estimator="hutch++", hvp_method=hvp_method, seed=0)
    old = hessian_trace(obj, 42, "hutch++", 0)  # the old spelling: method= is the estimator
    assert new.value == pytest.approx(exact, rel=1e-9) and old.value == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match="unknown HVP method"):
        hessian_trace(obj, num_matvecs=9, hvp_method="hutch++")  # reaches the operator, not the estimator


def _swapping_pair(n=200, steps=10, seed=0):
    """A slowly rotating matrix whose top two eigenvalues (1.5% apart) cross between measurements 1 and 2."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    skew = torch.randn(n, n, generator=g, dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(0.01 * (skew - skew.T) / math.sqrt(n))
    rest = torch.cat([torch.tensor([6.0, 5.0, 4.0], dtype=torch.float64), torch.linspace(-1.0, 1.0, n - 5, dtype=torch.float64)])
    for t in range(steps):
        eig = torch.cat([torch.tensor([10.0 + 0.15 * t, 10.15 - 0.05 * t], dtype=torch.float64), rest])
        yield basis @ torch.diag(eig) @ basis.T
        basis = rotation @ basis


def test_tracked_lanczos_follows_a_top_pair_that_swaps_places():
    from dynscope.tracking import CurvatureTracker

    for seed in range(2):
        runs = {gap: CurvatureTracker(trace_matvecs=4, sketch=0, eigen_tol=1e-2, swap_gap=gap, seed=seed) for gap in (None, 0.0)}
        errors = {gap: [] for gap in runs}
        for t, A in enumerate(_swapping_pair(seed=seed)):
            lam = float(torch.linalg.eigvalsh(A)[-1])
            cold = top_eigenvalues(A, which="LA", tol=1e-2, seed=seed * 100 + t)  # (can stop at either of the pair)
            for gap, tracker in runs.items():
                got = tracker.measure(MatrixOperator(A), seed=seed * 100 + t).eigen
                errors[gap].append(abs(got.value - lam) / lam)
                if gap is None:  # the default: the pair is carried and used as a block start while it is close
                    assert errors[gap][-1] <= 0.01 and got.converged
                    if t > 0:
                        assert got.num_matvecs <= min(cold.num_matvecs, 4)  # cold: 4-9
        # from the old top vector alone, Lanczos converges to the new second eigenvalue and stops there
        assert max(errors[0.0]) > 0.05
    with pytest.raises(ValueError, match="swap_gap"):
        CurvatureTracker(swap_gap=-1.0)


def test_block_warm_start_is_lanczos_from_one_vector_and_exact_on_an_invariant_subspace():
    A = _spd(40, seed=3)
    v = torch.randn(2, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    from dynscope.eigen import _block_warm_start, lanczos

    one = lanczos(MatrixOperator(A), 1, which="LA", tol=1e-6, start=v[0])
    # a block start from v[0] and a multiple of it (dropped): the same Krylov space, the same steps
    same = _block_warm_start(MatrixOperator(A), 1, torch.stack([v[0], 2 * v[0]]), which="LA", tol=1e-6, max_iter=100,
                             return_eigenvectors=False, keep_basis=False)
    assert same.num_matvecs == one.num_matvecs and same.value == pytest.approx(one.value, rel=1e-10)
    spectrum, vectors = torch.linalg.eigh(A)
    exact = top_eigenvalues(A, k=2, which="LA", tol=1e-8, start=vectors[:, -2:].T.flip(0), block_start=True)
    assert exact.num_matvecs == 2 and exact.converged  # the start spans an invariant subspace
    assert exact.eigenvalues == pytest.approx(spectrum[-2:].flip(0).tolist(), rel=1e-10)
    assert exact.error_bounds == pytest.approx([0.0, 0.0], abs=1e-8 * float(spectrum[-1]))


def test_tracking_lambda_max_along_a_training_trajectory_against_torch_func_hessian():
    from torch.func import functional_call, hessian

    from dynscope.tracking import CurvatureTracker

    torch.manual_seed(0)
    net = mlp((6, 16, 4)).double()
    x, y = classification_data(96, (6,), classes=4, seed=5)
    x = x.double()
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.9)
    tracker = CurvatureTracker(trace_matvecs=4, sketch=0, eigen_tol=1e-2, memory="auto")
    warm, cold = [], []
    for step in range(50):
        opt.zero_grad()
        F.cross_entropy(net(x[step % 3 * 32 :][:32]), y[step % 3 * 32 :][:32]).backward()
        opt.step()
        if step % 5:
            continue
        params = {k: v.detach() for k, v in net.named_parameters()}
        h = hessian(lambda p: F.cross_entropy(functional_call(net, p, (x[:24],)), y[:24]))(params)
        names, sizes = list(params), [v.numel() for v in params.values()]
        H = torch.cat([torch.cat([h[a][b].reshape(sa, sb) for b, sb in zip(names, sizes)], 1) for a, sa in zip(names, sizes)])
        lam = float(torch.linalg.eigvalsh(H)[-1])
        obj = Objective(net, F.cross_entropy, (x[:24], y[:24]))
        got = tracker.measure(obj, seed=step).eigen
        assert got.converged and abs(got.value - lam) <= 0.01 * lam
        cold.append(top_eigenvalues(obj, which="LA", tol=1e-2, seed=step).num_matvecs)
        warm.append(got.num_matvecs)
    assert max(warm[1:]) <= 8 and sum(warm[1:]) < sum(cold[1:])


@pytest.mark.parametrize("which", ["LM", "LA"])
def test_lanczos_float32_basis_meets_its_bound(which):
    # a float32 operator at a loose tolerance runs Lanczos on a float32 basis: the Ritz values must
    # stay within the stated bound of eigvalsh's (rounding included) and the run must be reproducible
    from dynscope.eigen import lanczos

    g = torch.Generator().manual_seed(3)
    n = 400
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    eig = torch.cat([torch.tensor([-9.0, 8.5, 7.0]), torch.rand(n - 3, generator=g, dtype=torch.float64) * 6 - 3])
    A = (U @ torch.diag(eig) @ U.T).float()
    exact = torch.linalg.eigvalsh(A.double())
    exact = sorted(exact.tolist(), key=abs if which == "LM" else (lambda v: v), reverse=True)
    op = MatrixOperator(A)
    res = lanczos(op, k=2, which=which, tol=1e-3, max_iter=120, keep_basis=True)
    assert res.converged and res.basis.dtype == torch.float32
    gram = res.basis.double() @ res.basis.double().T
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5)
    for value, ref, bound in zip(res.eigenvalues, exact[:2], res.error_bounds):
        assert abs(value - ref) <= bound and abs(value - ref) <= 1e-3 * abs(ref)
    again = lanczos(MatrixOperator(A), k=2, which=which, tol=1e-3, max_iter=120)
    assert again.eigenvalues == res.eigenvalues and again.num_matvecs == res.num_matvecs
    # a tolerance below float32's reach keeps the float64 basis
    assert lanczos(op, which=which, tol=1e-6, max_iter=120, keep_basis=True).basis.dtype == torch.float64


class _Diagonal:
    """``diag(d)`` as an operator without a dense matrix (Lanczos sees any orthogonally similar matrix alike)."""

    def __init__(self, d):
        from dynscope import Operator

        class Op(Operator):
            def __init__(self):
                self.size, self.dtype, self.device = d.numel(), d.dtype, d.device

            def _matmat(self, vectors):
                return vectors * d

        self.op = Op()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.float64, 1e-10)])
def test_lanczos_on_a_large_operator_stays_semi_orthogonal_without_ghost_eigenvalues(dtype, tol):
    # From 2048 parameters on, Lanczos reorthogonalises only when Simon's estimates of the lost
    # orthogonality call for it. Well separated top eigenvalues converge first, and without
    # reorthogonalisation they would come back as ghost copies; with it the top three are
    # eigvalsh's, each once, and the basis stays orthogonal to about sqrt(eps).
    from dynscope.eigen import lanczos

    g = torch.Generator().manual_seed(0)
    n = 6000
    d = torch.cat([torch.tensor([10.0, 9.9, 5.0, -3.0]), torch.rand(n - 4, generator=g) * 2 - 1]).to(dtype)
    res = lanczos(_Diagonal(d).op, k=3, which="LA", tol=tol, max_iter=300, seed=1, keep_basis=True, return_eigenvectors=True)
    assert res.converged
    for value, ref, bound in zip(res.eigenvalues, d[:3].tolist(), res.error_bounds):
        assert abs(value - ref) <= max(bound, 1e-12) and abs(value - ref) <= tol * ref
    unit = torch.finfo(res.basis.dtype).eps / 2
    gram = res.basis.double() @ res.basis.double().T
    assert float((gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max()) <= 10 * math.sqrt(unit)
    for vector, ref in zip(res.eigenvectors.double(), (0, 1, 2)):  # unit Ritz vectors along e_0, e_1, e_2
        assert float(vector.norm()) == pytest.approx(1.0, abs=1e-6) and abs(float(vector[ref])) >= 1 - 10 * tol
    # a long run (the bulk's edge never converges to 1e-12: all 200 steps, long after 10 and 9.9
    # converged, when their ghost copies form without reorthogonalisation): 10, 9.9, 5 each once
    long = lanczos(_Diagonal(d).op, k=5, which="LA", tol=1e-12, max_iter=200, seed=2)
    assert long.num_matvecs == 200 and not long.converged
    top = long.eigenvalues
    assert top[:3] == pytest.approx(d[:3].tolist(), rel=1e-5) and top[3] < 1.0 + 1e-3
