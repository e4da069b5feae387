"""Configuration problems in how the module states its loss: caught at setup where possible,
otherwise dropped at the first measurement with one warning that names the problem; the run goes on."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from dynscope.callbacks import Curvature, DynScope, GradientNoise, LossProtocolError, SoftmaxCollapse
from dynscope.callbacks.protocol import check_shapes
from models import Classifier, Recorder, classification_data, loader, mlp, trainer


class Regressor(pl.LightningModule):
    """Outputs [B, 1]; the targets' shape is the test's choice."""

    def __init__(self, loss=F.mse_loss):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.loss = loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self(x).reshape(y.shape), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _regression(target_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    y = (x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(32, generator=g)).reshape(target_shape)
    return loader(x, y, batch_size=16)


def _fit(callbacks, module, data, steps=4):
    rec = Recorder()
    run = trainer(max_steps=steps, callbacks=callbacks, logger=rec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(module, data)
    return run, rec, [str(w.message) for w in caught]


def test_mse_with_broadcasting_shapes_is_named_once_and_never_computed():
    callbacks = [Curvature(every_n_steps=1, loss_fn=F.mse_loss, num_matvecs=4, eigen=False),
                 GradientNoise(every_n_steps=1, loss_fn=F.mse_loss)]
    run, rec, messages = _fit(callbacks, Regressor(), _regression((32,)))
    assert run.global_step == 4  # training went on
    assert not [m for m in messages if "target size" in m]  # torch's broadcasting warning: never reached
    for callback in callbacks:
        mine = [m for m in messages if type(callback).__name__ in m]
        assert len(mine) == 1, mine
        assert "outputs [16, 1] and targets [16], which torch broadcasts to [16, 16]" in mine[0]
        assert "dropped for the rest of this run" in mine[0] and callback.disabled
    assert not [t for t in rec.scalars if t.startswith(("dynscope/curvature", "dynscope/noise"))]


def test_matching_regression_shapes_are_measured_exactly():
    callback = Curvature(every_n_steps=1, loss_fn=F.mse_loss, num_matvecs=12, method="hutch++", eigen=False,
                         strict=True)
    module = Regressor()
    data = _regression((32, 1))
    _, rec, _ = _fit([callback], module, data, steps=1)
    # the loss is quadratic in (W, b): H = 2/(B) [x 1]^T [x 1], rank 4 <= 12/3, so Hutch++ is exact
    x, _ = next(iter(data))
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    exact = float(torch.trace(2.0 / len(x) * design.T @ design))
    (step, value), = rec.scalars["dynscope/curvature/hessian_trace"]
    assert value == pytest.approx(exact, rel=1e-5)


class ColumnTargets(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y.squeeze(1))  # the module copes with [B, 1] targets; a loss_fn= does not


def test_class_targets_shaped_b_by_1_drop_the_diagnostic_with_the_reason():
    x, y = classification_data(32, (4,))
    callback = Curvature(every_n_steps=1, loss_fn=F.cross_entropy, num_matvecs=2, eigen=False)
    run, rec, messages = _fit([callback], ColumnTargets(mlp()), loader(x, y.unsqueeze(1), batch_size=16))
    (message,) = [m for m in messages if "Curvature" in m]
    assert "class-index targets shaped [16, 1]" in message and callback.num_measurements == 1 and callback.disabled
    with pytest.raises(LossProtocolError, match="class-index targets"):
        check_shapes(nn.CrossEntropyLoss(), torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long))
    check_shapes(F.cross_entropy, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))  # the usual shapes pass
    check_shapes(F.mse_loss, torch.zeros(4, 3), torch.zeros(4, 1))  # a target broadcast over features: no mixing


class DictBatches(Classifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])


def _dict_loader():
    x, y = classification_data(32, (4,))
    data = [{"x": x[i:i + 16], "y": y[i:i + 16]} for i in (0, 16)]
    return torch.utils.data.DataLoader(data, batch_size=None)


def test_dict_batches_without_dynscope_loss_drop_the_diagnostic_and_training_goes_on():
    callback = Curvature(every_n_steps=1, loss_fn=F.cross_entropy, num_matvecs=2, eigen=False)
    run, _, messages = _fit([callback], DictBatches(mlp()), _dict_loader(), steps=4)
    assert run.global_step == 4
    (message,) = [m for m in messages if "Curvature" in m]
    assert "got a batch of type dict" in message and "dynscope_loss" in message
    strict = Curvature(every_n_steps=1, loss_fn=F.cross_entropy, num_matvecs=2, eigen=False, strict=True)
    with pytest.raises(LossProtocolError, match="got a batch of type dict"):
        _fit([strict], DictBatches(mlp()), _dict_loader())


def test_softmax_collapse_on_regression_outputs_is_dropped_not_fatal():
    callback = SoftmaxCollapse(every_n_steps=1)
    run, rec, messages = _fit([callback], Regressor(), _regression((32, 1)))
    assert run.global_step == 4 and callback.disabled
    (message,) = [m for m in messages if "SoftmaxCollapse" in m]
    assert "class logits" in message and not [t for t in rec.scalars if t.startswith("dynscope/collapse")]


def test_a_summed_loss_is_refused_at_setup_for_per_sample_metrics():
    class Summed(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.criterion = nn.CrossEntropyLoss(reduction="sum")

    x, y = classification_data(32, (4,))
    run = trainer(max_steps=2, callbacks=[GradientNoise(every_n_steps=1)])
    with pytest.raises(LossProtocolError, match="reduction='sum'"):
        run.fit(Summed(), loader(x, y))
    assert run.global_step == 0  # before any training
    scope = DynScope(budget=None, collapse=False, regions=False, curvature={"every_n_steps": 1, "eigen": False,
                                                                             "num_matvecs": 2})
    run, rec, messages = _fit([scope], Summed(), loader(x, y), steps=2)
    assert list(scope.callbacks) == ["curvature"] and any("noise does not apply" in m for m in messages)
    assert "dynscope/curvature/hessian_trace" in rec.scalars
