"""The Curvature callback inside real Lightning runs."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from dynscope.callbacks import Curvature, LossProtocolError, Schedule
from models import Classifier, SmallCNN, classification_data, loader, mlp, trainer


class Recorder(pl.Callback):
    """Keeps a copy of the weights after each optimizer step, to compute exact references."""

    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _module(momentum=0.0):
    torch.manual_seed(0)
    return Classifier(mlp((4, 6, 3)), lr=0.1, momentum=momentum)


def test_tags_land_in_a_real_tensorboard_event_file(tmp_path):
    x, y = classification_data(64, (1, 8, 8))
    module = Classifier(SmallCNN(channels=2), lr=0.05, momentum=0.9)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer(max_steps=4, callbacks=[Curvature(every_n_steps=2, num_matvecs=4, eigen_max_iter=10)], logger=logger).fit(
        module, loader(x, y)
    )
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for metric in ("hessian_trace", "hessian_trace_stderr", "lambda_max", "eos_ratio", "trace_ratio",
                   "update_sharpness", "grad_sharpness"):
        assert f"dynscope/curvature/{metric}" in tags, metric
    assert "dynscope/curvature/hessian_trace/net.conv.weight" in tags
    steps = [e.step for e in acc.Scalars("dynscope/curvature/lambda_max")]
    assert steps == [1, 2, 4]


def test_logged_values_match_exact_references_at_that_step():
    module = _module(momentum=0.9)
    x, y = classification_data(32, (4,))
    recorder = Recorder()
    callback = Curvature(every_n_steps=3, num_matvecs=200, method="hutch++", eigen_tol=1e-6, eigen_max_iter=200,
                         fixed_batch=True)
    logged = {}

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if callback.last_metrics and trainer.global_step == 3:
                logged.update(callback.last_metrics)

    trainer(max_steps=3, callbacks=[recorder, callback, Spy()]).fit(module, loader(x, y, batch_size=32))
    from dynscope import Objective
    from reference import exact_hessian

    net = mlp((4, 6, 3))
    net.load_state_dict({k[len("net."):]: v for k, v in recorder.weights[3].items()})
    H = exact_hessian(Objective(net, F.cross_entropy, (x, y))).double()
    assert logged["hessian_trace"] == pytest.approx(float(torch.trace(H)), rel=1e-6)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert logged["lambda_max"] == pytest.approx(lam, rel=1e-4)
    assert logged["eos_threshold"] == pytest.approx((2 + 2 * 0.9) / 0.1)
    assert logged["eos_ratio"] == pytest.approx(0.1 * lam / (2 + 2 * 0.9), rel=1e-4)
    assert logged["trace_ratio"] == pytest.approx(0.1 * float(torch.trace(H)) / 2, rel=1e-6)
    u = torch.cat([(recorder.weights[3][n] - recorder.weights[2][n]).reshape(-1) for n in recorder.weights[3]]).double()
    assert logged["update_sharpness_next"] == pytest.approx(float(u @ H @ u / (u @ u)), rel=1e-4)
    # Pan and Li's convention: the Hessian where the step starts, theta_t
    net.load_state_dict({k[len("net."):]: v for k, v in recorder.weights[2].items()})
    H_t = exact_hessian(Objective(net, F.cross_entropy, (x, y))).double()
    assert logged["update_sharpness"] == pytest.approx(float(u @ H_t @ u / (u @ u)), rel=1e-4)
    assert abs(logged["update_sharpness"] - logged["update_sharpness_next"]) > 1e-3 * logged["update_sharpness"]
    # minibatch = full batch here: batch sharpness is the gradient's sharpness, over the heavy-ball threshold
    assert logged["batch_sharpness"] == logged["grad_sharpness"]
    assert logged["batch_sharpness_ratio"] == pytest.approx(logged["grad_sharpness"] * 0.1 / 3.8)
    # full batch (N = B = 32): the batch-aware linear stability ratio is the EoS ratio
    assert logged["linear_stability_ratio"] == pytest.approx(logged["eos_ratio"], rel=1e-12)


def test_adam_gets_the_preconditioned_ratio():
    torch.manual_seed(0)
    module = Classifier(mlp((4, 6, 3)), lr=0.01, optimizer="adam")
    x, y = classification_data(32, (4,))
    callback = Curvature(every_n_steps=2, num_matvecs=4, eigen_max_iter=30, sharpness=False)
    trainer(max_steps=2, callbacks=[callback]).fit(module, loader(x, y))
    m = callback.last_metrics
    assert m["eos_threshold"] == pytest.approx((2 + 2 * 0.9) / ((1 - 0.9) * 0.01))
    assert m["eos_ratio"] == pytest.approx(m["preconditioned_lambda_max"] / m["eos_threshold"])
    assert m["preconditioned_lambda_max"] > m["lambda_max"]  # v_hat is tiny early on: P^-1 inflates


def test_module_protocol_dynscope_loss_and_no_double_logging(tmp_path):
    class Custom(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 1)
            self.calls = 0

        def dynscope_loss(self, batch):
            self.log("should_not_appear", 1.0)
            return ((self.net(batch["x"]) - batch["y"]) ** 2).mean(1)

        def training_step(self, batch, batch_idx):
            self.calls += 1
            return self.dynscope_loss(batch).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    samples = [{"x": torch.randn(3), "y": torch.randn(1)} for _ in range(32)]
    data = torch.utils.data.DataLoader(samples, batch_size=8)
    module = Custom()
    callback = Curvature(every_n_steps=1, num_matvecs=12, method="hutch++", eigen_max_iter=4, fixed_batch=True)
    logger = pl.loggers.CSVLogger(str(tmp_path))
    trainer(max_steps=4, callbacks=[callback], logger=logger).fit(module, data)
    assert module.calls == 4  # training_step is never re-run by dynscope
    # a linear model with MSE: H = 2 X^T X / B over [x, 1]; 4 parameters, so Hutch++ with 12 matvecs is exact
    x = torch.stack([s["x"] for s in samples[:8]])
    X = torch.cat([x, torch.ones(8, 1)], 1)
    assert callback.last_metrics["hessian_trace"] == pytest.approx(float(2 * (X * X).sum() / 8), rel=1e-5)
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "dynscope/curvature/hessian_trace" in text and "should_not_appear" not in text


def test_clear_error_at_setup_without_a_loss():
    class NoLoss(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = classification_data(8, (3,))
    with pytest.raises(LossProtocolError, match="dynscope_loss"):
        trainer(max_steps=1, callbacks=[Curvature()]).fit(NoLoss(), loader(x, y))


def test_a_failing_measurement_warns_once_and_training_goes_on():
    module = _module()
    x, y = classification_data(64, (4,))
    x[5, 0] = float("nan")  # batch 0 has a NaN input: loss not finite
    callback = Curvature(every_n_steps=1, num_matvecs=2, eigen_max_iter=3)
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        trainer(max_steps=3, callbacks=[callback]).fit(module, loader(x, y, batch_size=8))
    assert sum("dynscope" in str(w.message) for w in record) == 1
    with pytest.raises(Exception, match="not finite"):
        trainer(max_steps=1, callbacks=[Curvature(every_n_steps=1, strict=True)]).fit(_module(), loader(x, y, batch_size=8))


def test_state_dict_round_trip_keeps_the_warm_start_vector():
    module = _module()
    x, y = classification_data(32, (4,))
    callback = Curvature(every_n_steps=2, num_matvecs=2, eigen_max_iter=20, sharpness=False)
    trainer(max_steps=2, callbacks=[callback]).fit(module, loader(x, y))
    state = callback.state_dict()
    fresh = Curvature(every_n_steps=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh._eigvec, callback._eigvec)
    assert fresh.num_measurements == callback.num_measurements == 2


def test_schedules():
    every = Schedule("steps", every_n_steps=5)
    assert [s for s in range(1, 21) if every.due(s)] == [1, 5, 10, 15, 20]
    log = Schedule("log", points_per_decade=2)
    assert [s for s in range(1, 1001) if log.due(s)] == [1, 4, 10, 32, 100, 317, 1000]
    with pytest.raises(ValueError, match="schedule"):
        Schedule("weekly")


def test_epoch_schedule_measures_once_per_epoch():
    module = _module()
    x, y = classification_data(32, (4,))
    callback = Curvature(schedule="epoch", num_matvecs=2, eigen_max_iter=3)
    trainer(max_epochs=3, callbacks=[callback]).fit(module, loader(x, y, batch_size=8))
    assert callback.num_measurements == 3
    assert not math.isnan(callback.last_metrics["hessian_trace"])


def test_xtrace_in_the_callback_gives_the_exact_trace_of_a_small_model():
    # 51 parameters: with 2 * 51 matvecs or more XTrace takes the trace from the unit vectors
    module = _module()
    x, y = classification_data(32, (4,))
    recorder = Recorder()
    callback = Curvature(every_n_steps=2, num_matvecs=128, method="xtrace", eigen=False, fixed_batch=True)
    trainer(max_steps=2, callbacks=[recorder, callback]).fit(module, loader(x, y, batch_size=32))
    from dynscope import Objective
    from reference import exact_hessian

    net = mlp((4, 6, 3))
    net.load_state_dict({k[len("net."):]: v for k, v in recorder.weights[2].items()})
    H = exact_hessian(Objective(net, F.cross_entropy, (x, y)))
    assert callback.last_metrics["hessian_trace"] == pytest.approx(float(torch.trace(H)), rel=1e-5)
    with pytest.raises(ValueError, match="xtrace"):
        Curvature(method="exact")
    with pytest.raises(ValueError, match="too small"):
        Curvature(method="xtrace", num_matvecs=3)
