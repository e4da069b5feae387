"""OutputLogits and AutoZLoss: log Z statistics by hand, the z-loss, and the acceptance run on a small LM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import Classifier, Recorder, classification_data, loader, mlp, trainer

from dynscope.callbacks import AutoZLoss, LossProtocolError, OutputLogits
from dynscope.cli.demo_transformer import make_data, make_module
from dynscope.logits import output_logit_stats, z_loss
from dynscope.nn import CrossEntropy


def test_log_z_statistics_by_hand_with_ignored_positions():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [5.0, 1.0, -2.0]], [[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]]])  # [B=2, T=2, V=3]
    targets = torch.tensor([[0, 1], [2, -100]])
    s = output_logit_stats(logits, targets)
    z = [math.log(3), math.log(math.exp(5) + math.exp(1) + math.exp(-2)), math.log(math.exp(1) + math.exp(2) + math.exp(3))]
    assert s.count == 3
    assert s.log_z_mean == pytest.approx(sum(z) / 3, rel=1e-6)
    assert s.log_z_max == pytest.approx(max(z), rel=1e-6) and s.log_z_min == pytest.approx(min(z), rel=1e-6)
    assert s.max_logit == 5.0  # the 9s are at an ignored position
    assert s.z_loss == pytest.approx(sum(v * v for v in z) / 3, rel=1e-6)


def test_cross_entropy_with_z_loss_is_cross_entropy_plus_the_coefficient_times_log_z_squared():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 4, requires_grad=True)  # torch layout [N, C, T]
    targets = torch.randint(0, 5, (6, 4))
    targets[0, 0] = -100
    loss = CrossEntropy(z_loss=1e-2)(logits, targets)
    keep = targets != -100
    lz = torch.logsumexp(logits.double(), dim=1)
    expected = F.cross_entropy(logits.double(), targets) + 1e-2 * (lz[keep] ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    per = CrossEntropy(reduction="none", z_loss=1e-2)(logits, targets)
    assert torch.allclose(per.double(), F.cross_entropy(logits.double(), targets, reduction="none") + 1e-2 * torch.where(keep, lz ** 2, 0.0), atol=1e-6)
    assert float(z_loss(torch.zeros(1, 2))) == pytest.approx(math.log(2) ** 2)
    assert float(CrossEntropy()(logits, targets)) == pytest.approx(float(F.cross_entropy(logits, targets)))


def lm_run(callback, steps: int = 150):
    module = make_module(3e-2, 0, vocab=32, seq=16, dim=32, layers=1, heads=2)
    recorder = Recorder()
    trainer(max_steps=steps, callbacks=[callback], logger=recorder).fit(module, make_data(2048, 32, 16, 0, 32))
    series = dict(recorder.scalars["dynscope/logits/log_z_mean"])
    return module, recorder, series


@pytest.fixture(scope="module")
def acceptance():
    return lm_run(OutputLogits(every_n_steps=10)), lm_run(AutoZLoss(every_n_steps=10))


def test_acceptance_log_z_diverges_without_the_z_loss_and_stays_bounded_with_it(acceptance):
    (_, _, control), (module, recorder, mitigated) = acceptance
    # control: log Z climbs from ~log V by more than 13 nats and is still rising at the end
    assert control[1] < 4.0 and control[150] > 16.0 and control[150] > control[100] > control[50]
    # AutoZLoss fires on the drift at its default threshold, then log Z comes back near 0 and stays there
    callback = next(c for c in module.trainer.callbacks if isinstance(c, AutoZLoss))
    assert callback.triggered_step is not None and callback.triggered_step <= 50
    assert module.criterion.z_loss == 1e-4
    assert max(abs(v) for s, v in mitigated.items() if s >= 120) < 2.0
    flags = dict(recorder.scalars["dynscope/mitigation/zloss"])
    assert flags[callback.triggered_step] == 1.0 and flags[10] == 0.0
    assert any("zloss" in text and "output-logit divergence" in text for _, text, _ in recorder.texts)


def test_auto_z_loss_state_survives_a_resume(acceptance):
    (_, (module, _, _)) = acceptance
    callback = next(c for c in module.trainer.callbacks if isinstance(c, AutoZLoss))
    fresh = AutoZLoss()
    fresh.load_state_dict(callback.state_dict())
    assert fresh.active and fresh.triggered_step == callback.triggered_step and fresh.reference == callback.reference
    other = make_module(3e-2, 0, vocab=32, seq=16, dim=32, layers=1, heads=2)
    fresh.on_train_start(None, other)
    assert other.criterion.z_loss == 1e-4


def test_auto_z_loss_needs_a_switchable_loss():
    x, y = classification_data(32)
    with pytest.raises(LossProtocolError, match="CrossEntropy"):
        trainer(max_steps=1, callbacks=[AutoZLoss()]).fit(Classifier(mlp()), loader(x, y))


def test_output_logits_leaves_training_bit_identical():
    def run(callbacks):
        module = make_module(3e-2, 0, vocab=16, seq=8, dim=16, layers=1, heads=2)
        trainer(max_steps=8, callbacks=callbacks).fit(module, make_data(256, 16, 8, 0, 16))
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    a, b = run([]), run([OutputLogits(every_n_steps=1)])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_the_z_loss_and_the_reference(tmp_path):
    def fit(callback, steps, ckpt=None):
        module = make_module(3e-2, 0, vocab=16, seq=8, dim=16, layers=1, heads=2)
        t = trainer(max_steps=steps, callbacks=[callback], enable_checkpointing=False)
        t.fit(module, make_data(512, 16, 8, 0, 16), ckpt_path=ckpt)
        return module, t

    first = AutoZLoss(threshold=0.5, patience=1, every_n_steps=2)
    module, t = fit(first, 12)
    assert first.triggered_step is not None and module.criterion.z_loss == 1e-4
    t.save_checkpoint(tmp_path / "run.ckpt")
    second = AutoZLoss(threshold=0.5, patience=1, every_n_steps=2)
    resumed, _ = fit(second, 16, str(tmp_path / "run.ckpt"))
    assert second.triggered_step == first.triggered_step and second.reference == first.reference
    assert resumed.criterion.z_loss == 1e-4  # re-applied to the fresh module's loss on resume


def test_auto_z_loss_stays_off_on_a_healthy_run():
    # a stochastic language (a random Markov chain): log Z settles about a nat above its start
    g = torch.Generator().manual_seed(0)
    transitions = torch.softmax(torch.randn(32, 32, generator=g) * 2, dim=1)
    x = torch.empty(2048, 17, dtype=torch.long)
    x[:, 0] = torch.randint(0, 32, (2048,), generator=g)
    for t in range(16):
        x[:, t + 1] = torch.multinomial(transitions[x[:, t]], 1, generator=g).squeeze(1)
    module = make_module(1e-2, 0, vocab=32, seq=16, dim=32, layers=1, heads=2)
    callback, recorder = AutoZLoss(every_n_steps=10), Recorder()
    data = torch.utils.data.DataLoader(x, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer(max_steps=150, callbacks=[callback], logger=recorder).fit(module, data)
    drift = [v for _, v in recorder.scalars["dynscope/logits/log_z_drift"]]
    assert callback.triggered_step is None and module.criterion.z_loss == 0.0
    assert max(abs(v) for v in drift) < 2.5  # half the default threshold
