"""Per-sample gradient moments from the training step's own forward and backward (StepCapture, GradientNoise)."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from dynscope import Objective
from dynscope.callbacks import DynScope, GradientNoise
from dynscope.noise import gradient_noise_scale
from dynscope.step_capture import StepCapture
from models import Classifier, Recorder, classification_data, loader, mlp, trainer
from observer import assert_same_weights, trained_weights
from test_noise import looped_grads, numpy_stats


def _captured(model, x, y, *, loss=None, call=None, objective_loss=F.cross_entropy, mode="eval"):
    """One training step of ``model`` under a capture: ``(capture, objective)``."""
    objective = Objective(model, objective_loss, (x, y), mode=mode)
    model.zero_grad()
    with StepCapture(objective) as capture:
        out = call() if call else model(x)
        value = loss(out, y) if loss else F.cross_entropy(out, y)
        capture.saw_loss(value)
        value.backward()
    return capture, objective


class _Tokens(nn.Module):
    """An embedding, a Linear on every position ([B, T, D]) and a head: two rules on sequences."""

    def __init__(self):
        super().__init__()
        self.embed, self.seq, self.head = nn.Embedding(9, 4), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, tokens):
        return self.head(torch.relu(self.seq(self.embed(tokens))).mean(1))


def _case(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return mlp((5, 7, 3)).double(), torch.randn(12, 5, generator=g, dtype=torch.float64)
    if name == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3))
        return model.double(), torch.randn(12, 2, 4, 4, generator=g, dtype=torch.float64)
    return _Tokens().double(), torch.randint(0, 9, (12, 6), generator=g)


@pytest.mark.parametrize("name", ["mlp", "conv", "tokens"])
def test_captured_moments_equal_a_per_sample_loop(name):
    model, x = _case(name)
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    capture, _ = _captured(model, x, y)
    moments = capture.moments()
    assert capture.reason is None and moments is not None
    reference = looped_grads(model, F.cross_entropy, x, y)
    assert set(moments.mean) == set(reference)
    for n, g in reference.items():
        torch.testing.assert_close(moments.mean[n], g.mean(0), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(moments.sq_dev[n], g.var(0, correction=1) * 11, rtol=1e-9, atol=1e-13)
    grads = {n: g.reshape(12, -1).numpy() for n, g in reference.items()}
    every = np.concatenate(list(grads.values()), axis=1)
    expected_noise = every.var(0, ddof=1).sum() / (every.mean(0) ** 2).sum()
    assert gradient_noise_scale(moments).value == pytest.approx(expected_noise, rel=1e-9)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):  # the head's weight enters the graph a second time, outside its call
        h = torch.relu(self.body(x))
        return self.head(h) + 0.1 * F.linear(h, self.head.weight)


MODELS = {
    "dropout": lambda: nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3)),
    "layer norm": lambda: nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)),
    "twice": _Twice,
}
REFUSALS = {  # case: (model, the step's loss or call, what the reason says)
    "a regulariser": (None, "regulariser", "not the mean"),
    "label smoothing": (None, lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), "not the mean"),
    "a summed loss": (None, lambda o, t: F.cross_entropy(o, t, reduction="sum"), "not the mean"),
    "a zero term with a gradient": (None, lambda o, t: F.cross_entropy(o, t) + 0.1 * (o - o.detach()).sum(),
                                    "another gradient"),
    "another input tensor": (None, "clone", "input tensor"),
    "two calls": (None, "twice", "called 2 times"),
    "dropout in eval mode": ("dropout", None, "eval mode"),
    "a layer without a rule": ("layer norm", None, "no per-sample rule for 1.weight"),
    "a weight used outside its layer": ("twice", None, "could not account for head.weight"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_step_whose_loss_is_not_the_objective_is_refused_with_the_reason(case):
    kind, how, why = REFUSALS[case]
    torch.manual_seed(0)
    model = MODELS[kind]() if kind else mlp((5, 7, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss = how if callable(how) else None
    if how == "regulariser":
        loss = lambda o, t: F.cross_entropy(o, t) + 1e-3 * model[0].weight.square().sum()  # noqa: E731
    call = {"clone": lambda: model(x.clone()), "twice": lambda: model(x) + 0 * model(x)}.get(how if isinstance(how, str) else None)
    capture, _ = _captured(model, x, y, loss=loss, call=call)
    assert capture.moments() is None and why in capture.reason
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone


def test_autocast_is_refused():
    model, x, y = mlp((5, 7, 3)), torch.randn(8, 5), torch.randint(0, 3, (8,))
    with StepCapture(Objective(model, F.cross_entropy, (x, y))) as capture:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
            capture.saw_loss(loss)
        loss.backward()
    assert capture.moments() is None and capture.reason == "autocast is on"


class _Snapshots(pl.Callback):
    """The parameters and batch at the start of every step."""

    def __init__(self):
        self.at = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at[trainer.global_step + 1] = ({n: p.detach().clone() for n, p in pl_module.net.named_parameters()},
                                            [t.clone() for t in batch])


def test_gradient_noise_measures_from_the_training_step_at_its_parameters():
    torch.manual_seed(0)
    net = mlp((4, 6, 3))
    module = Classifier(net, lr=0.1)
    x, y = classification_data(48, (4,))
    noise, snapshots, recorder = GradientNoise(every_n_steps=2, loss_fn=F.cross_entropy), _Snapshots(), Recorder()
    reasons = []
    run = noise.run
    noise.run = lambda *a, **k: (run(*a, **k), reasons.append(noise.capture_reason))[0]
    trainer(max_steps=6, callbacks=[snapshots, noise], logger=recorder).fit(module, loader(x, y, batch_size=8))
    assert reasons[0].startswith("the first measurement") and reasons[1:] == [None, None, None]
    for step in (4, 6):  # captured: the per-sample gradients of that step's batch at the parameters before its update
        params, (bx, by) = snapshots.at[step]
        reference = mlp((4, 6, 3))
        reference.load_state_dict(params)
        grads = looped_grads(reference, F.cross_entropy, bx, by)
        every = np.concatenate([g.reshape(8, -1).double().numpy() for g in grads.values()], axis=1)
        logged = [m for s, m in recorder.rows if s == step and "dynscope/noise/noise_scale" in m][0]
        expected = every.var(0, ddof=1).sum() / (every.mean(0) ** 2).sum()
        assert logged["dynscope/noise/noise_scale"] == pytest.approx(expected, rel=1e-4)
        assert logged["dynscope/noise/grad_norm"] == pytest.approx(float(np.linalg.norm(every.mean(0))), rel=1e-5)
        stats = numpy_stats({"net." + n: g for n, g in grads.items()})
        assert logged["dynscope/noise/gsnr"] == pytest.approx(stats["gsnr"], rel=1e-3)
        for name, value in stats["per_layer"].items():
            assert logged[f"dynscope/noise/gsnr/{name}"] == pytest.approx(value, rel=1e-3)


class _OwnForward(Classifier):
    def training_step(self, batch, batch_idx):  # calls the network, not the module: nothing to capture
        x, y = batch
        return self.criterion(self.net(x), y)


def test_a_step_the_capture_cannot_see_is_measured_the_usual_way():
    torch.manual_seed(0)
    noise = GradientNoise(every_n_steps=2, loss_fn=F.cross_entropy)
    x, y = classification_data(48, (4,))
    trainer(max_steps=6, callbacks=[noise]).fit(_OwnForward(mlp((4, 6, 3))), loader(x, y, batch_size=8))
    assert noise.num_measurements == 4 and "gsnr" in noise.last_metrics
    assert noise.capture_reason == "the model was called 0 times in the step, not once"  # tried once, then not again


def test_observer_effect_with_the_training_step_captured():
    def net():
        return nn.Sequential(nn.Flatten(), mlp((64, 16, 3)))

    noise = GradientNoise(every_n_steps=2)
    baseline = trained_weights([], steps=10, net_factory=net)
    measured = trained_weights([noise], steps=10, net_factory=net)
    assert_same_weights(baseline, measured)
    assert noise.capture_reason is None and noise.num_measurements == 6  # steps 1, 2, 4, ..., 10


def test_dynscope_captures_the_steps_its_noise_measures():
    torch.manual_seed(0)
    x, y = classification_data(48, (4,))
    scope = DynScope(loss_fn=F.cross_entropy, budget=None, curvature=False, collapse=False, regions=False,
                     noise=dict(every_n_steps=2))
    trainer(max_steps=6, callbacks=[scope]).fit(Classifier(mlp((4, 6, 3))), loader(x, y, batch_size=8))
    assert scope.callbacks["noise"].num_measurements == 4 and scope.callbacks["noise"].capture_reason is None


class _Skipping(Classifier):
    def training_step(self, batch, batch_idx):  # no loss: Lightning skips the backward and the update
        return None if batch_idx == 3 else super().training_step(batch, batch_idx)


def test_a_step_without_a_backward_leaves_no_hooks_and_the_next_ones_are_captured():
    torch.manual_seed(0)
    noise, reasons = GradientNoise(every_n_steps=1, loss_fn=F.cross_entropy), []
    run = noise.run
    noise.run = lambda *a, **k: (run(*a, **k), reasons.append(noise.capture_reason))[0]
    module = _Skipping(mlp((4, 6, 3)))
    hooked_after = {}

    class Look(pl.Callback):  # runs after GradientNoise's on_train_batch_end
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            hooked_after[batch_idx] = any(m._forward_hooks for m in pl_module.modules())

    x, y = classification_data(48, (4,))
    trainer(max_steps=5, callbacks=[noise, Look()]).fit(module, loader(x, y, batch_size=8))
    assert reasons[0].startswith("the first measurement") and reasons[-1] is None and None in reasons[1:3]
    assert not any(hooked_after.values()) and 3 in hooked_after
