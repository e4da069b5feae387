"""SpikeForensics: the spike rule, the snapshot against exact Hessians and per-sample gradients, a planted spike."""

from __future__ import annotations

import statistics
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

from models import Classifier, Recorder, loader, mlp, trainer
from observer import assert_same_weights

from dynscope import Objective
from dynscope.callbacks import SpikeForensics
from dynscope.callbacks._lightning import CallbackBase
from dynscope.spikes import SpikeDetector, opposing_signals, sample_projections


def test_spike_rule_is_median_plus_k_robust_std():
    losses = [2.0, 2.2, 1.9, 2.1, 2.05, 1.95, 2.3, 2.0]
    d = SpikeDetector(k=5.0, window=6, min_history=4)
    for v in losses:
        d.update(v)
    window = losses[-6:]
    median = statistics.median(window)
    mad = statistics.median(abs(v - median) for v in window)
    threshold = median + 5.0 * 1.4826 * mad
    assert d.stats() == pytest.approx((median, 1.4826 * mad))
    probe = SpikeDetector(k=5.0, window=6, min_history=4)
    probe.load_state_dict(d.state_dict())
    assert probe.update(threshold + 1e-6) == (True, pytest.approx(5.0, rel=1e-5))
    probe.load_state_dict(d.state_dict())
    assert probe.update(threshold - 1e-6)[0] is False
    fresh = SpikeDetector(k=5.0, window=6, min_history=4)
    assert [fresh.update(v)[0] for v in (1.0, 1.0, 100.0)] == [False, False, False]  # not enough history yet


def tiny_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = mlp((3, 5, 3), act=torch.nn.Tanh)
    x, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    return model, Objective(model, F.cross_entropy, (x, y)), x, y


def test_snapshot_against_the_exact_hessian_and_per_sample_gradients():
    model, obj, x, y = tiny_problem()
    params = OrderedDict((n, p.detach()) for n, p in model.named_parameters())
    names = list(params)

    def flat_loss(theta):
        return F.cross_entropy(functional_call(model, obj.layout.unflatten(theta), (x,)), y)

    theta = obj.layout.flatten(params)
    H = hessian(flat_loss)(theta)
    evals, evecs = torch.linalg.eigh(H.double())
    snap = opposing_signals(obj, top_k=3, max_iter=obj.layout.numel, tol=1e-8)
    assert snap.lambda_max == pytest.approx(float(evals[-1]), rel=1e-4)
    v = evecs[:, -1].float()
    assert abs(float(v @ snap.eigenvector)) == pytest.approx(1.0, abs=1e-3)
    # per-sample gradients by jacrev of the per-sample losses, projected on the oriented eigenvector
    J = jacrev(lambda t: F.cross_entropy(functional_call(model, obj.layout.unflatten(t), (x,)), y, reduction="none"))(theta)
    proj = J @ snap.eigenvector
    assert torch.allclose(snap.projections, proj, atol=1e-5)
    assert float(proj.mean()) >= 0
    order = torch.argsort(proj)
    assert snap.positive == order.flip(0)[:3].tolist() and snap.negative == order[:3].tolist()
    # the forward-mode projections agree with dynscope's per-sample gradients too
    direction = obj.layout.unflatten(snap.eigenvector)
    from dynscope import per_sample_grads

    g = per_sample_grads(obj)
    assert torch.allclose(sample_projections(obj, direction), sum((g[n].flatten(1) * direction[n].flatten()).sum(1) for n in names), atol=1e-5)
    p = snap.projections
    assert snap.opposition == pytest.approx(1 - float(p.sum().abs() / p.abs().sum()))


POISONED_STEP = 61  # batch index 60 of 16 samples: its first 8 labels are wrong


def poisoned_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1280, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=torch.Generator().manual_seed(1))).argmax(1)
    start = (POISONED_STEP - 1) * 16
    y[start : start + 8] = (y[start : start + 8] + 1) % 3
    return x, y


class WeightsAt(CallbackBase):
    """Keeps a copy of the weights as they are when the loss of optimizer step ``step`` is handed to backward."""

    def __init__(self, step):
        self.step, self.weights = step, None

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step + 1 == self.step:
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def planted_run(callbacks, dropout=0.0):
    torch.manual_seed(0)
    module = Classifier(mlp((4, 16, 3), dropout=dropout), lr=0.2)
    x, y = poisoned_data()
    recorder = Recorder()
    trainer(max_steps=80, callbacks=callbacks, logger=recorder).fit(module, loader(x, y, batch_size=16))
    return module, recorder


def test_planted_spike_is_found_with_its_opposing_samples_on_the_pre_spike_weights():
    spikes, weights = SpikeForensics(top_k=5), WeightsAt(POISONED_STEP)
    module, recorder = planted_run([weights, spikes])
    assert spikes.num_spikes == 1 and [e["step"] for e in spikes.events] == [POISONED_STEP]
    event = spikes.events[0]
    assert event["zscore"] > 6.0 and event["samples"] == 4 * 16  # the spiking batch and 3 buffered ones
    # the eigenvalue is that of the joined batches at the weights before the spiking update
    x, y = poisoned_data()
    rows = torch.cat([torch.arange((s - 1) * 16, s * 16) for s in (POISONED_STEP, 60, 59, 58)])
    net = module.net
    params = OrderedDict((n.removeprefix("net."), w) for n, w in weights.weights.items())
    layout = Objective(net, F.cross_entropy, (x[rows], y[rows])).layout
    H = hessian(lambda t: F.cross_entropy(functional_call(net, layout.unflatten(t), (x[rows],)), y[rows]))(layout.flatten(params))
    assert event["metrics"]["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)
    # the poisoned samples carry the largest projections, with opposing signs among them
    poisoned = {f"step {POISONED_STEP} #{i}" for i in range(8)}
    top = [name for name, _, _ in event["positive"]]
    assert len(poisoned & set(top)) >= 3
    assert event["metrics"]["opposition"] > 0.5
    assert recorder.scalars["dynscope/spikes/detected"] == [(POISONED_STEP, 1.0)]
    assert any(tag == "dynscope/spikes/forensics" and "step 61 #0" in text for tag, text, _ in recorder.texts)
    assert any(tag == "dynscope/mitigation/events" and "**loss-spike on** at step 61" in text for tag, text, _ in recorder.texts)
    resumed = SpikeForensics()
    resumed.load_state_dict(spikes.state_dict())
    assert resumed.events == spikes.events and list(resumed.detector.values) == list(spikes.detector.values)


def test_forensics_never_change_training():
    baseline, _ = planted_run([], dropout=0.2)
    spikes = SpikeForensics(k=1.0, min_history=5, cooldown=5, max_snapshots=4, mode="train")
    watched, _ = planted_run([spikes], dropout=0.2)
    assert len(spikes.events) >= 2  # snapshots were taken
    assert_same_weights(baseline.state_dict(), watched.state_dict())


def test_the_loss_scale_of_16_bit_mixed_precision_is_divided_out():
    from types import SimpleNamespace

    scaler = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 1024.0)  # torch.amp.GradScaler's interface
    fake = SimpleNamespace(global_step=0, world_size=1, loggers=[], is_global_zero=True,
                           strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)))
    spikes = SpikeForensics(history_batches=0, max_snapshots=0)
    spikes.on_before_backward(fake, None, torch.tensor(2.5) * scaler.get_scale())
    assert list(spikes.detector.values) == [2.5]
