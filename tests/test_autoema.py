"""VarianceAmplification and AutoEMA inside real Lightning runs: logging, the EMA against an explicit
loop, validation on the EMA weights, checkpoint resume, both Lightning packages, observer effect."""

from __future__ import annotations

import functools

import pytest
import torch
import pytorch_lightning as pl

from dynscope import variance_amplification
from dynscope.callbacks import AutoEMA, VarianceAmplification
from dynscope.cli.demo_gva import expert_data, make_module, make_system, rollout_metric
from models import Recorder
from observer import assert_same_weights, trained_weights

THRESHOLD_ALWAYS = 1e-9  # any moving metric exceeds it: AutoEMA fires as soon as the patience allows


class Weights(pl.Callback):
    """Online weights after every optimizer step, and (module, EMA) weights seen at validation start."""

    def __init__(self, autoema=None):
        self.autoema, self.steps, self.validation = autoema, {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.autoema is not None and self.autoema.ema_module is not None:
            self.validation.append((trainer.global_step, [p.detach().clone() for p in pl_module.parameters()],
                                    [p.detach().clone() for p in self.autoema.ema_module.parameters()]))


def bc_setup(seed=0):
    A, B, K = make_system(1.2)
    X, U = expert_data(A, B, K, samples=64, length=8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, U), batch_size=16, shuffle=False)
    return make_module(4, 2, 16, 0.05, seed), data, rollout_metric(A, B, horizon=20, starts=8)


def fit(callbacks, steps, logger=None, ckpt_path=None, val=False, **kwargs):
    module, data, _ = bc_setup()
    if val:
        module.validation_step = lambda batch, batch_idx: None
    trainer = pl.Trainer(
        max_steps=steps, callbacks=callbacks, logger=logger or False, enable_checkpointing=any(
            isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        limit_val_batches=1 if val else 0, num_sanity_val_steps=0, **kwargs,
    )
    torch.manual_seed(0)
    trainer.fit(module, data, data if val else None, ckpt_path=ckpt_path)
    return module


def explicit_ema(weights_by_step, start, end, decay):
    ema = [w.clone() for w in weights_by_step[start]]
    for t, step in enumerate(range(start + 1, end + 1), start=1):
        d = min(decay, (1 + t) / (10 + t))
        ema = [d * e + (1 - d) * w for e, w in zip(ema, weights_by_step[step])]
    return ema


def test_variance_amplification_logs_metric_loss_and_window():
    _, _, metric = bc_setup()
    logger = Recorder()
    callback = VarianceAmplification(metric, every_n_steps=2, window=4, reference_batches=2)
    module = fit([callback], 16, logger)
    J = [v for _, v in logger.scalars["dynscope/gva/metric"]]
    L = [v for _, v in logger.scalars["dynscope/gva/loss"]]
    steps = [s for s, _ in logger.scalars["dynscope/gva/metric"]]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]  # evenly spaced, from the step the reference set was complete
    amplification = logger.scalars["dynscope/gva/amplification"]
    assert [s for s, _ in amplification] == steps[3:]
    for i, (_, a) in enumerate(amplification):
        assert a == pytest.approx(variance_amplification(J[i:i + 4], L[i:i + 4]), rel=1e-12)
    assert J[-1] == pytest.approx(metric(module.policy), rel=1e-6)
    X, U = bc_setup()[1].dataset.tensors
    with torch.no_grad():
        assert L[-1] == pytest.approx(float(torch.nn.functional.mse_loss(module(X[:32]), U[:32])), rel=1e-5)


def test_autoema_fires_logs_and_averages_like_an_explicit_ema():
    _, _, metric = bc_setup()
    logger = Recorder()
    autoema = AutoEMA(metric, threshold=THRESHOLD_ALWAYS, patience=2, every_n_steps=2, window=3, decay=0.9)
    weights = Weights(autoema)
    fit([autoema, weights], 24, logger, val=True, check_val_every_n_epoch=3)

    amplification = logger.scalars["dynscope/gva/amplification"]
    # first window full at the 3rd evaluation (step 6), two in a row above the threshold: step 8
    expected = [s for s, a in amplification if a > THRESHOLD_ALWAYS][1]
    assert autoema.active and autoema.triggered_step == expected == 8
    flags = logger.scalars["dynscope/mitigation/ema"]
    assert [v for s, v in flags if s < expected] == [0.0] * len([s for s, _ in flags if s < expected])
    assert all(v == 1.0 for s, v in flags if s >= expected) and flags[-1] == (24, 1.0)
    (tag, text, step), = logger.texts
    assert tag == "dynscope/mitigation/events" and step == expected and "ema on" in text and "amplification" in text
    assert autoema.trigger_values["amplification"] == dict(amplification)[expected]

    # the EMA (a shadow from the first step on) against an explicit warm-up loop over the recorded online weights
    ema = explicit_ema(weights.steps, 1, 24, 0.9)
    for mine, ref in zip(autoema.ema_module.parameters(), ema):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)
    # metric_ema is the metric at the EMA weights
    metric_ema = logger.scalars["dynscope/gva/metric_ema"]
    assert metric_ema[0][0] == 2  # from the first evaluation on: the shadow EMA
    assert metric_ema[-1][1] == pytest.approx(metric(autoema.ema_module.policy), rel=1e-6)
    # validation ran with the EMA weights (at step 12 and 24), the EMA module holding the online ones
    assert [s for s, _, _ in weights.validation] == [12, 24]
    for step, module_params, ema_params in weights.validation:
        ema_then = explicit_ema(weights.steps, 1, step, 0.9)
        for p, e, w in zip(module_params, ema_then, weights.steps[step]):
            torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-7)
        for p, w in zip(ema_params, weights.steps[step]):
            assert torch.equal(p, w)


def test_autoema_training_is_unchanged_until_the_end(tmp_path):
    plain, with_ema = Weights(), Weights()
    fit([plain], 20, val=True, val_check_interval=4)
    _, _, metric = bc_setup()
    autoema = AutoEMA(metric, threshold=THRESHOLD_ALWAYS, patience=1, every_n_steps=2, window=3)
    module = fit([autoema, with_ema], 20, val=True, val_check_interval=4)
    for step in plain.steps:  # the EMA only watches: the online iterates are the same
        assert all(torch.equal(a, b) for a, b in zip(plain.steps[step], with_ema.steps[step]))
    for p, e in zip(module.parameters(), autoema.ema_module.parameters()):  # at the end: the EMA weights
        assert torch.equal(p, e)


def test_autoema_resumes_from_a_checkpoint_with_its_ema_state(tmp_path):
    _, _, metric = bc_setup()
    make = lambda: AutoEMA(metric, threshold=THRESHOLD_ALWAYS, patience=2, every_n_steps=2, window=3, decay=0.95)  # noqa: E731
    straight = make()
    fit([straight], 24)

    first = make()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1)
    fit([first, checkpoint], 12)
    path = tmp_path / "epoch=2-step=12.ckpt"
    saved = torch.load(path, weights_only=False)
    # the model's state is the online weights, the EMA is in the callback's state beside it
    assert "current_model_state" not in saved and "averaging_state" not in saved
    torch.manual_seed(0)
    plain = fit([], 12)
    for name, value in plain.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name

    resumed = make()
    logger = Recorder()
    fit([resumed], 24, logger, ckpt_path=str(path))
    assert resumed.active and resumed.triggered_step == straight.triggered_step == 8
    assert list(resumed.metrics_ema) == pytest.approx(list(straight.metrics_ema), rel=1e-6)
    assert list(resumed.metrics) == pytest.approx(list(straight.metrics), rel=1e-6)
    for a, b in zip(resumed.ema_module.parameters(), straight.ema_module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert int(resumed._averaging._average_model.n_averaged) == int(straight._averaging._average_model.n_averaged) == 24
    assert logger.texts == []  # it does not fire a second time


def test_autoema_with_lightning_pytorch_trainer():
    import lightning.pytorch as lp

    class Policy(lp.LightningModule):
        def __init__(self):
            super().__init__()
            self.policy = torch.nn.Linear(4, 2, bias=False)
            self.loss_fn = torch.nn.MSELoss()

        def forward(self, x):
            return self.policy(x)

        def training_step(self, batch, batch_idx):
            return self.loss_fn(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    _, data, metric = bc_setup()
    autoema = AutoEMA(metric, threshold=THRESHOLD_ALWAYS, patience=1, every_n_steps=2, window=3)
    trainer = lp.Trainer(max_steps=10, callbacks=[autoema], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Policy(), data)
    assert autoema.active and autoema.triggered_step == 6
    assert isinstance(autoema._averaging, lp.callbacks.WeightAveraging)


def test_bad_arguments():
    metric = lambda m: 1.0  # noqa: E731
    with pytest.raises(ValueError, match="window"):
        VarianceAmplification(metric, window=2)
    with pytest.raises(ValueError, match="schedule"):
        VarianceAmplification(metric, schedule="log")
    with pytest.raises(ValueError, match="loss"):
        VarianceAmplification(metric, loss="val")
    with pytest.raises(TypeError, match="metric"):
        VarianceAmplification("not a metric")
    with pytest.raises(ValueError, match="warmup"):
        AutoEMA(metric, warmup="cosine")
    with pytest.raises(ValueError, match="decay"):
        AutoEMA(metric, decay=1.5)


def test_observer_effect_variance_amplification_on_autoema_off():
    probe = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    metric = functools.partial(lambda m, x: float(m(x).softmax(-1)[:, 0].mean()), x=probe)
    baseline = trained_weights([])
    callbacks = [
        VarianceAmplification(metric, every_n_steps=3, window=3),
        VarianceAmplification(metric, every_n_steps=4, window=3, loss="train"),
        AutoEMA(metric, threshold=1e12, every_n_steps=5, window=3),  # never fires
    ]
    watched = trained_weights(callbacks)
    assert_same_weights(baseline, watched)
    for callback in callbacks:  # they did measure
        assert callback.num_measurements >= 6 and "amplification" in callback.last_metrics
    assert not callbacks[2].active


def test_an_ema_active_checkpoint_resumed_without_autoema_continues_from_the_online_weights(tmp_path):
    _, _, metric = bc_setup()
    autoema = AutoEMA(metric, threshold=THRESHOLD_ALWAYS, patience=1, every_n_steps=2, window=3, decay=0.9)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12, save_top_k=-1)
    fit([autoema, checkpoint], 12)
    assert autoema.active and autoema.triggered_step < 12
    straight = fit([], 24)  # the same run without AutoEMA, uninterrupted
    resumed = fit([], 24, ckpt_path=str(tmp_path / "epoch=2-step=12.ckpt"))
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)


class Swings(pl.Callback):
    """After each of AutoEMA's evaluations: the metric at the online and at the EMA weights, recomputed here."""

    def __init__(self, autoema, metric):
        self.autoema, self.metric, self.rows = autoema, metric, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.autoema.every_n_steps == 0 and self.autoema.ema_module is not None:
            with torch.no_grad():
                self.rows.append((trainer.global_step, self.metric(pl_module.eval()), self.metric(
                    self.autoema.ema_module.eval())))
            pl_module.train()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting
    yield
    torch.set_num_threads(threads)


def behaviour_cloning(rho, steps, seed=0):
    """The demo's setup: LQR expert, tanh MLP policy, minibatch SGD, 60-step rollout cost."""
    A, B, K = make_system(rho)
    X, U = expert_data(A, B, K)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, U), batch_size=32, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))
    metric = rollout_metric(A, B, horizon=60)
    autoema = AutoEMA(metric, reference_batches=8)
    swings = Swings(autoema, metric)
    trainer = pl.Trainer(max_steps=steps, callbacks=[autoema, swings], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    torch.manual_seed(seed)
    trainer.fit(make_module(4, 2, 32, 0.05, seed), data)
    return autoema, swings.rows


def _std_of_changes(values):
    d = [b - a for a, b in zip(values, values[1:])]
    mean = sum(d) / len(d)
    return (sum((x - mean) ** 2 for x in d) / len(d)) ** 0.5


def test_autoema_defaults_fire_on_an_unstable_system_and_the_ema_swings_3x_less(one_thread):
    autoema, rows = behaviour_cloning(1.2, 1000)
    assert autoema.active and autoema.triggered_step <= 800, autoema.last_metrics
    after = [(j, je) for step, j, je in rows if step > autoema.triggered_step][:20]  # the window after the trigger
    assert len(after) == 20
    online, ema = [j for j, _ in after], [je for _, je in after]
    assert _std_of_changes(online) >= 3 * _std_of_changes(ema)
    assert sum(ema) <= 1.02 * sum(online)  # no worse on average
    assert autoema.trigger_values["ema_swing_ratio"] >= 3 and autoema.trigger_values["swing"] >= autoema.min_swing


def test_autoema_defaults_stay_off_on_a_stable_system(one_thread):
    autoema, rows = behaviour_cloning(0.5, 1000)
    assert not autoema.active and autoema.num_measurements >= 90
    online = [j for _, j, _ in rows[-20:]]
    assert _std_of_changes(online) / (sum(online) / len(online)) < autoema.min_swing  # the metric does not swing
