"""Curvature(method="tracked", sub_batch=k) inside Lightning runs, against exact references."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dynscope import Objective
from dynscope.callbacks import Curvature
from models import Classifier, classification_data, loader, mlp, trainer
from reference import exact_hessian


class Weights(pl.Callback):
    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = {n[len("net."):]: p.detach().clone() for n, p in pl_module.named_parameters()}


def run(callback, steps=9, batch_size=16):
    torch.manual_seed(0)
    module = Classifier(mlp((4, 6, 3)), lr=0.1, momentum=0.9)
    x, y = classification_data(64, (4,))
    weights, logged = Weights(), {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if callback._last_step == trainer.global_step and callback.last_metrics:
                logged[trainer.global_step] = (dict(callback.last_metrics), batch)

    trainer(max_steps=steps, callbacks=[weights, callback, Spy()]).fit(module, loader(x, y, batch_size=batch_size))
    return weights.after, logged


def exact_at(weights, batch):
    net = mlp((4, 6, 3))
    net.load_state_dict(weights)
    return exact_hessian(Objective(net, F.cross_entropy, batch)).double()


def test_tracked_curvature_on_a_sub_batch_matches_the_exact_hessian_of_that_slice():
    callback = Curvature(every_n_steps=2, method="tracked", num_matvecs=8, eigen_tol=1e-2, sub_batch=6, strict=True,
                         exact_trace=False)
    weights, logged = run(callback)
    assert sorted(logged) == [1, 2, 4, 6, 8]
    z_scores = []
    for step, (metrics, batch) in logged.items():
        x, y = batch
        H = exact_at(weights[step], (x[:6], y[:6]))  # the first 6 samples of the step's batch
        spectrum = torch.linalg.eigvalsh(H)
        assert metrics["lambda_max"] == pytest.approx(float(spectrum[-1]), rel=1e-2)
        assert metrics["lambda_max_converged"] == 1.0
        z_scores.append((metrics["hessian_trace"] - float(spectrum.sum())) / metrics["hessian_trace_stderr"])
        layers = sum(v for k, v in metrics.items() if k.startswith("hessian_trace/"))
        assert layers == pytest.approx(metrics["hessian_trace"], rel=1e-9)
    assert all(abs(z) < 4 for z in z_scores)
    assert callback.tracker.num_measurements == 5 and callback.tracker.sketch_vectors.shape[0] == 4


def test_sub_batch_larger_than_the_batch_measures_the_whole_batch():
    whole, _ = run(Curvature(every_n_steps=4, num_matvecs=4, strict=True), steps=4)
    callback = Curvature(every_n_steps=4, num_matvecs=4, sub_batch=1000, strict=True)
    _, logged = run(callback, steps=4)
    metrics, batch = logged[4]
    H = exact_at(whole[4], batch)
    assert metrics["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-2)


def test_tracking_state_survives_a_checkpoint():
    first = Curvature(every_n_steps=2, method="tracked", num_matvecs=6, strict=True, exact_trace=False)
    run(first, steps=4)
    state = first.state_dict()
    second = Curvature(every_n_steps=2, method="tracked", num_matvecs=6, strict=True)
    second.load_state_dict(state)
    assert torch.equal(second.tracker.sketch_vectors, first.tracker.sketch_vectors)
    assert second.tracker.num_measurements == first.tracker.num_measurements == 3
    with pytest.raises(ValueError, match="eigen"):
        Curvature(method="tracked", eigen=False)
    with pytest.raises(ValueError, match="sub_batch"):
        Curvature(sub_batch=0)


def test_tracked_curvature_on_a_fixed_measurement_set_carries_its_probes_and_matches_the_exact_hessian():
    # as DynScope's default: a fixed slice of the first batch, probes carried between measurements
    callback = Curvature(every_n_steps=2, method="tracked", num_matvecs=8, eigen_tol=1e-2, sub_batch=6,
                         eval_batches=1, strict=True, exact_trace=False)
    assert callback.tracker.memory == "auto" and callback.tracker.sketch == 0
    weights, logged = run(callback)
    assert sorted(logged) == [1, 2, 4, 6, 8]
    first = logged[1][1]  # the measurement set: the first 6 samples of the first batch, at every step
    z_scores = []
    for step, (metrics, _) in logged.items():
        H = exact_at(weights[step], (first[0][:6], first[1][:6]))
        spectrum = torch.linalg.eigvalsh(H)
        assert metrics["lambda_max"] == pytest.approx(float(spectrum[-1]), rel=1e-2)
        z_scores.append((metrics["hessian_trace"] - float(spectrum.sum())) / metrics["hessian_trace_stderr"])
        layers = sum(v for k, v in metrics.items() if k.startswith("hessian_trace/"))
        assert layers == pytest.approx(metrics["hessian_trace"], rel=1e-9)
    assert all(abs(z) < 4 for z in z_scores)
    assert callback.tracker._carried is not None and callback.tracker._carried["count"] == 4
    assert 0 < callback.tracker.last_memory <= 0.9


def test_the_trace_of_a_relu_network_is_exact_and_the_tracker_runs_lanczos_alone():
    # DynScope's default settings on a ReLU MLP: tr(H) = tr(GGN), no probes; lambda_max still tracked
    callback = Curvature(every_n_steps=2, method="tracked", num_matvecs=8, eigen_tol=1e-2, sub_batch=6,
                         eval_batches=1, strict=True)
    weights, logged = run(callback)
    assert sorted(logged) == [1, 2, 4, 6, 8]
    first = logged[1][1]
    for step, (metrics, _) in logged.items():
        H = exact_at(weights[step], (first[0][:6], first[1][:6]))
        spectrum = torch.linalg.eigvalsh(H)
        assert metrics["hessian_trace"] == pytest.approx(float(spectrum.sum()), rel=1e-5)
        assert metrics["hessian_trace_stderr"] == 0.0
        for name, block in layer_blocks(weights[step]).items():
            assert metrics[f"hessian_trace/net.{name}"] == pytest.approx(float(H.diagonal()[block].sum()), rel=1e-5, abs=1e-7)
        assert metrics["lambda_max"] == pytest.approx(float(spectrum[-1]), rel=1e-2)
    assert callback.tracker.num_measurements == 5 and callback.tracker._carried is None  # no trace probes spent
    cold = Curvature(every_n_steps=2, method="tracked", num_matvecs=8, eigen_tol=1e-2, sub_batch=6, eval_batches=1)
    # the budget learns seconds per expected step: what the cold and warm expectations must get right
    # is their ratio. Cold: 8 probes, Lanczos at its step limit (it also places the second eigenvalue),
    # 2 for the sharpness; warm: the exact trace (~3), half the step limit from the previous vector, 2
    limit = cold.eigen_max_iter
    assert callback.expected_cost() / cold.expected_cost() == pytest.approx((3 + limit / 2 + 2) / (8 + limit + 2))


def layer_blocks(weights):
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = slice(start, start + w.numel())
        start += w.numel()
    return out


def test_the_first_measurement_stays_within_eigen_max_iter_and_reports_lambda_max_own_convergence():
    from dynscope import MatrixOperator
    from dynscope.tracking import CurvatureTracker

    # a well separated top eigenvalue above a tight cluster: the second Ritz value converges slowly
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.tensor([10.0]), 4.0 + torch.rand(150, generator=g, dtype=torch.float64),
                          torch.linspace(-1.0, 1.0, 149, dtype=torch.float64)])
    A = basis @ torch.diag(spectrum) @ basis.T
    tracker = CurvatureTracker(sketch=0, eigen_tol=1e-2, eigen_max_iter=12)
    got = tracker.measure(MatrixOperator(A), trace=False).eigen
    assert got.num_matvecs <= 12
    assert got.value == pytest.approx(10.0, rel=1e-2)
    assert got.converged and got.error_bounds[0] <= 1e-2 * got.value  # lambda_max's own bound, not the pair's
    assert len(got.eigenvalues) == 1
