"""Softmax collapse metrics (core) and the SoftmaxCollapse / AutoStableMax callbacks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynscope.dashboards.events import parse_event
from models import Classifier, Recorder, classification_data, loader, mlp, trainer
from observer import assert_same_weights, trained_weights

from dynscope import max_logit_gap, nlm_alignment, softmax_collapse, zero_loss_fraction
from dynscope.collapse import collapsed_rows, zero_loss_rows
from dynscope.callbacks import AutoStableMax, LossProtocolError, SoftmaxCollapse
from dynscope.nn import CrossEntropy, stablemax_cross_entropy
from dynscope.optim import OrthoGrad

# half a unit in the last place of 1: the other classes' relative mass below it rounds away
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def _margin_logits(margins, classes=2):
    """Rows ``[m, 0, ..., 0]``: the other classes' relative mass is ``(classes - 1) e^-m``."""
    z = torch.zeros(len(margins), classes, dtype=torch.float64)
    z[:, 0] = torch.tensor(margins, dtype=torch.float64)
    return z


@pytest.mark.parametrize("dtype", list(HALF_ULP))
def test_softmax_collapse_per_dtype_with_wide_margins(dtype):
    u = HALF_ULP[dtype]
    classes = 4
    collapsed = math.log((classes - 1) * 64 / u)  # mass u / 64: rounds to exactly 1
    alive = math.log((classes - 1) / (64 * u))  # mass 64 u: clearly above 1
    z = _margin_logits([collapsed, alive, alive, 0.0], classes)
    assert softmax_collapse(z.to(dtype)) == 0.25
    assert softmax_collapse(z, dtype=dtype) == 0.25
    assert softmax_collapse(z, dtype=str(dtype).removeprefix("torch.")) == 0.25
    # label on the winner: loss exactly 0 only for the collapsed row; on a loser: never 0
    assert zero_loss_fraction(z, torch.tensor([0, 0, 0, 0]), dtype=dtype) == 0.25
    assert zero_loss_fraction(z.to(dtype), torch.tensor([1, 0, -100, -100])) == 0.0
    assert zero_loss_fraction(z.to(dtype), torch.tensor([0, -100, 0, -100])) == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_collapse_is_the_losss_own_zero(dtype):
    """For correctly classified rows, collapsed <=> F.cross_entropy in that dtype is exactly 0."""
    g = torch.Generator().manual_seed(0)
    n, classes = 4000, 97
    z = torch.randn(n, classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    top = {torch.float32: 30.0, torch.bfloat16: 12.0, torch.float16: 16.0}[dtype]
    z[torch.arange(n), y] = z.max(1).values + top * torch.rand(n, generator=g, dtype=torch.float64)
    z = z.to(dtype)
    zero = F.cross_entropy(z, y, reduction="none") == 0
    correct = z.argmax(-1) == y
    assert 0.2 < zero.double().mean() < 0.6 and correct.double().mean() > 0.99  # both kinds of rows present
    collapsed = collapsed_rows(z)
    assert torch.equal(collapsed[correct], zero[correct])
    assert softmax_collapse(z) == pytest.approx(zero[correct].double().mean().item() * correct.double().mean().item()
                                                + collapsed[~correct].double().sum().item() / n)
    if dtype == torch.float32:  # the old test, sum exp(z - max) == 1, flags rows whose loss is not yet zero
        mass = torch.exp(z - z.max(-1, keepdim=True).values).sum(-1) == 1
        assert int((mass & ~zero & correct).sum()) > 20


def test_stablemax_rows_do_not_collapse_where_softmax_does():
    z = _margin_logits([30.0, 60.0, 1.0], classes=5).float()
    y = torch.zeros(3, dtype=torch.long)
    assert collapsed_rows(z).tolist() == [True, True, False]
    assert collapsed_rows(z, normalization="stablemax").tolist() == [False, False, False]
    assert zero_loss_rows(z, y, normalization="stablemax").tolist() == [False, False, False]
    assert (stablemax_cross_entropy(z, y, reduction="none") > 0).all()
    with pytest.raises(ValueError, match="normalization"):
        collapsed_rows(z, normalization="sparsemax")


def test_collapse_depends_on_the_dtype_and_the_shift():
    z = _margin_logits([10.0, 20.0, 45.0])  # e^-10 = 4.5e-5, e^-20 = 2.1e-9, e^-45 = 2.9e-20
    assert softmax_collapse(z, dtype="bfloat16") == 1.0
    assert softmax_collapse(z, dtype="float32") == pytest.approx(2 / 3)
    assert softmax_collapse(z, dtype="float64") == pytest.approx(1 / 3)
    assert softmax_collapse(z + 1000.0) == softmax_collapse(z)  # only differences matter
    seq = z.float().reshape(1, 3, 2).expand(2, 3, 2)  # [B, T, C], class dimension last
    assert softmax_collapse(seq) == pytest.approx(2 / 3)
    assert zero_loss_fraction(seq, torch.zeros(2, 3, dtype=torch.long)) == pytest.approx(2 / 3)


def test_max_logit_gap():
    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0], [2.0, 2.0, -1.0]])
    assert max_logit_gap(z) == pytest.approx((0.5 + 3.0 + 0.0) / 3)


def test_nlm_alignment_closed_form():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([2.0]))
    lin.weight.grad = torch.tensor([[-3.0, -4.0]])  # -g = theta: cos 1
    lin.bias.grad = torch.tensor([5.0])  # -g = -5: cos -1
    got = nlm_alignment(lin)
    assert got.per_tensor == {"weight": pytest.approx(1.0), "bias": pytest.approx(-1.0)}
    # global: (25 - 10) / (sqrt(25 + 4) sqrt(25 + 25))
    assert got.global_cos == pytest.approx(15 / math.sqrt(29 * 50))
    lin.bias.grad = None  # tensors without a gradient are left out
    assert nlm_alignment(lin).per_tensor == {"weight": pytest.approx(1.0)}
    other = nlm_alignment(lin, grads={"weight": torch.tensor([[4.0, -3.0]])})
    assert other.per_tensor == {"weight": pytest.approx(0.0)}


def test_core_bad_input_is_named():
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="unsupported dtype"):
        softmax_collapse(z, dtype="int8")
    with pytest.raises(TypeError, match="floating point"):
        softmax_collapse(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        zero_loss_fraction(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        zero_loss_fraction(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="two classes"):
        max_logit_gap(torch.randn(3, 1))
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        nlm_alignment(nn.Linear(2, 2))


# -- Lightning ---------------------------------------------------------------------------------
class Switchable(Classifier):
    """Classifier whose loss is dynscope's CrossEntropy; remembers the mode of every step."""

    def __init__(self, net, **kwargs):
        super().__init__(net, **kwargs)
        self.criterion = CrossEntropy()
        self.modes = []

    def training_step(self, batch, batch_idx):
        self.modes.append(self.criterion.mode)
        return super().training_step(batch, batch_idx)


def _confident_net(seed=0, scale=150.0):
    """An MLP whose last layer is scaled up: large logit margins, many rows in float32 collapse."""
    torch.manual_seed(seed)
    net = mlp((4, 8, 3))
    with torch.no_grad():
        net[-1].weight.mul_(scale)
    return net


def _full_batch(n=64, seed=0):
    x, y = classification_data(n, (4,), seed=seed)
    return x, y, loader(x, y, batch_size=n)


def test_softmax_collapse_logs_reference_values():
    x, y, data = _full_batch()
    module = Classifier(_confident_net(), lr=0.01)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    rec = Recorder()
    callback = SoftmaxCollapse(every_n_steps=1, strict=True)
    trainer(max_steps=1, callbacks=[callback], logger=rec).fit(module, data)

    with torch.no_grad():  # logits metrics: after the step, on the batch
        z = module.net(x)
    top = z.double().topk(2, -1).values
    zero = F.cross_entropy(z, y, reduction="none") == 0
    correct = z.argmax(-1) == y
    wrong_zero = F.cross_entropy(z, z.argmax(-1), reduction="none") == 0  # the top class's loss, for wrong rows
    expected = {
        "sc_fraction": (zero | (~correct & wrong_zero)).double().mean().item(),
        "softmax_sc_fraction": (zero | (~correct & wrong_zero)).double().mean().item(),
        "zero_loss_fraction": zero.double().mean().item(),
        "max_logit_gap": (top[:, 0] - top[:, 1]).mean().item(),
        "train_accuracy": (z.argmax(-1) == y).double().mean().item(),
    }
    assert 0.1 < expected["sc_fraction"] < 0.9  # the model is in partial collapse: a real test
    for name, value in expected.items():
        assert rec.scalars[f"dynscope/collapse/{name}"] == [(1, pytest.approx(value, rel=1e-12))]

    # nlm_cos: the gradient of the step, at the weights before it
    ref = Classifier(_confident_net(), lr=0.01)
    ref.load_state_dict(initial)
    F.cross_entropy(ref.net(x), y).backward()
    thetas = {n: p.detach().flatten() for n, p in ref.named_parameters()}
    grads = {n: -p.grad.flatten() for n, p in ref.named_parameters()}
    for n in thetas:
        cos = F.cosine_similarity(thetas[n].double(), grads[n].double(), dim=0).item()
        assert rec.scalars[f"dynscope/collapse/nlm_cos/{n}"] == [(1, pytest.approx(cos, rel=1e-9, abs=1e-12))]
    total = F.cosine_similarity(torch.cat(list(thetas.values())).double(), torch.cat(list(grads.values())).double(), dim=0)
    assert rec.scalars["dynscope/collapse/nlm_cos"] == [(1, pytest.approx(total.item(), rel=1e-9))]


def test_softmax_collapse_on_held_validation_data():
    x, y, data = _full_batch()
    xv, yv = classification_data(32, (4,), seed=5)
    module = Classifier(_confident_net(), lr=0.01)
    rec = Recorder()
    callback = SoftmaxCollapse(every_n_steps=2, held_data="val", held_batches=2, strict=True)
    trainer(max_steps=2, callbacks=[callback], logger=rec, num_sanity_val_steps=0, limit_val_batches=0).fit(
        module, data, loader(xv, yv, batch_size=16)
    )
    with torch.no_grad():
        z = module.net(xv)
    top_zero = F.cross_entropy(z, z.argmax(-1), reduction="none") == 0  # the top class's loss is exactly 0
    assert [step for step, _ in rec.scalars["dynscope/collapse/held_sc_fraction"]] == [1, 2]  # step 1 is always due
    assert rec.scalars["dynscope/collapse/held_sc_fraction"][-1] == (2, pytest.approx(top_zero.double().mean().item()))
    acc = (z.argmax(-1) == yv).double().mean().item()
    assert rec.scalars["dynscope/collapse/held_accuracy"][-1] == (2, pytest.approx(acc))


def test_observer_effect_with_softmax_collapse_on():
    baseline = trained_weights([], steps=6)
    assert_same_weights(baseline, trained_weights([SoftmaxCollapse(every_n_steps=1, strict=True)], steps=6))
    assert_same_weights(baseline, trained_weights([SoftmaxCollapse(every_n_steps=2, mode="train", strict=True)], steps=6))


LR = 0.002  # small enough that the scaled-up model stays collapsed for a few steps


def _auto_run(steps, callback, ckpt=None):
    x, y, data = _full_batch()
    module = Switchable(_confident_net(scale=300.0), lr=LR)
    rec = Recorder()
    fit_trainer = trainer(max_steps=steps, callbacks=[callback], logger=rec)
    fit_trainer.fit(module, data, ckpt_path=ckpt)
    return module, rec, fit_trainer


def test_auto_stablemax_fires_logs_and_applies_orthograd(tmp_path):
    from dynscope.callbacks._lightning import CallbackBase

    class UpdateProbe(CallbackBase):
        """Records each step's weights and raw gradient, and the update the optimizer made."""

        def __init__(self):
            self.steps = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self._before = [(p.detach().clone(), p.grad.clone()) for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = [p.detach().clone() for p in pl_module.parameters()]
            self.steps.append([(w, g, a - w) for (w, g), a in zip(self._before, after)])

    callback = AutoStableMax(threshold=0.1, patience=2, every_n_steps=1, actions=("stablemax", "orthograd"),
                             nlm_trigger=False, strict=True)
    probe = UpdateProbe()
    x, y, data = _full_batch()
    module = Switchable(_confident_net(scale=300.0), lr=LR)
    rec = Recorder()
    fit_trainer = trainer(max_steps=5, callbacks=[callback, probe], logger=rec)
    fit_trainer.fit(module, data)

    sc = rec.scalars["dynscope/collapse/sc_fraction"]
    assert sc[0][1] >= 0.1 and sc[1][1] >= 0.1  # the condition held at steps 1 and 2
    assert callback.active and callback.triggered_step == 2
    assert "sc_fraction >= 0.1 for 2 consecutive checks" in callback.reason
    assert callback.trigger_values["sc_fraction"] == sc[1][1]
    assert rec.scalars["dynscope/mitigation/stablemax"] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0)]
    assert rec.scalars["dynscope/mitigation/orthograd"] == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0)]
    assert [(name, step) for name, _, step in rec.texts] == [("dynscope/mitigation/events", 2)]
    assert "StableMax" in rec.texts[0][1] and "OrthoGrad" in rec.texts[0][1] and "step 2" in rec.texts[0][1]
    event = parse_event(rec.texts[0][1])  # the shape the report reads
    assert (event["mitigation"], event["action"], event["step"]) == ("stablemax", "on", 2)
    assert float(event["values"]["sc_fraction"]) == pytest.approx(callback.trigger_values["sc_fraction"], rel=1e-3)
    assert module.modes == ["softmax", "softmax", "stablemax", "stablemax", "stablemax"]
    assert isinstance(fit_trainer.optimizers[0], OrthoGrad) and fit_trainer.global_step == 5

    ulp = torch.finfo(torch.float32).eps
    for step, tensors in enumerate(probe.steps, start=1):
        for w, g, update in tensors:
            w64, g64 = w.double(), g.double()
            if step <= 2:  # plain SGD
                expected = -LR * g64
            else:  # g_perp = g - (w.g / w.w) w rescaled to |g|: orthogonal to w, same norm
                perp = g64 - (w64 * g64).sum() / (w64 * w64).sum() * w64
                expected = -LR * perp * g64.norm() / perp.norm()
                assert abs(float((expected * w64).sum())) < 1e-12 * float(expected.norm() * w64.norm())
            # the float32 weights round the update to about one ulp of the weight
            assert ((update.double() - expected).abs() <= 2 * ulp * w64.abs() + 1e-9).all(), f"step {step}"


def test_auto_stablemax_stays_on_after_resume(tmp_path):
    first = AutoStableMax(threshold=0.1, patience=2, every_n_steps=1, actions="stablemax,orthograd", nlm_trigger=False,
                          strict=True)
    _, _, fit_trainer = _auto_run(3, first)
    assert first.triggered_step == 2
    path = str(tmp_path / "switched.ckpt")
    fit_trainer.save_checkpoint(path)

    # the resumed run cannot trigger by itself (patience too long): the switch must come from the checkpoint
    second = AutoStableMax(threshold=0.1, patience=1000, every_n_steps=1, actions="stablemax,orthograd",
                           nlm_trigger=False, strict=True)
    module, rec, resumed = _auto_run(5, second, ckpt=path)
    assert second.active and second.triggered_step == 2 and second.reason == first.reason
    assert module.modes == ["stablemax", "stablemax"]
    assert rec.scalars["dynscope/mitigation/stablemax"] == [(4, 1.0), (5, 1.0)]
    assert isinstance(resumed.optimizers[0], OrthoGrad) and rec.texts == []


def test_auto_stablemax_nlm_trigger():
    callback = AutoStableMax(threshold=1.0, patience=1, every_n_steps=1, nlm_trigger=True, nlm_threshold=-1.0,
                             accuracy_threshold=0.0, strict=True)
    module, rec, _ = _auto_run(2, callback)
    assert callback.triggered_step == 1 and "naive loss minimisation" in callback.reason
    assert module.modes == ["softmax", "stablemax"]


def test_auto_stablemax_without_a_switchable_loss_acts_or_warns():
    x, y, data = _full_batch(16)
    # the default recipe on a module computing F.cross_entropy itself: no refusal, the other actions act
    torch.manual_seed(0)
    module = Classifier(mlp(), lr=0.01)
    callback = AutoStableMax(every_n_steps=1, patience=1, accuracy_threshold=0.0, nlm_threshold=-1.0)
    with pytest.warns(RuntimeWarning, match="StableMax switch is skipped"):
        fit_trainer = trainer(max_steps=2, callbacks=[callback])
        fit_trainer.fit(module, data)
    assert callback.triggered_step == 1 and callback.applied == ["orthograd", "rescale", "reset_optimizer"]
    assert isinstance(fit_trainer.optimizers[0], OrthoGrad)
    # only the switch asked for: strict refuses at setup, non-strict warns and goes on
    with pytest.raises(LossProtocolError, match="dynscope.nn.CrossEntropy"):
        trainer(max_steps=1, callbacks=[AutoStableMax(actions="stablemax", strict=True)]).fit(Classifier(mlp()), data)
    with pytest.warns(RuntimeWarning, match="StableMax switch is skipped"):
        trainer(max_steps=1, callbacks=[AutoStableMax(actions="stablemax")]).fit(Classifier(mlp()), data)
    with pytest.raises(ValueError, match="threshold"):
        AutoStableMax(threshold=0.0)
    with pytest.raises(ValueError, match="actions"):
        AutoStableMax(actions=["stablemax", "sparsemax"])
    with pytest.raises(ValueError, match="rescale_factor"):
        AutoStableMax(rescale_factor=0.0)
    with pytest.raises(ValueError, match="held_data"):
        SoftmaxCollapse(held_data="test")
    with pytest.raises(ValueError, match="unsupported dtype"):
        SoftmaxCollapse(dtype="half-ish")


def _default_recipe_run(steps, callback, ckpt=None, record=None):
    from dynscope.callbacks._lightning import CallbackBase

    class Probe(CallbackBase):
        def on_train_start(self, trainer, pl_module):
            self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.opt_state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    x, y, data = _full_batch()
    module = Switchable(_confident_net(scale=300.0), lr=LR, momentum=0.9)
    rec, probe = Recorder(), Probe()
    fit_trainer = trainer(max_steps=steps, callbacks=[callback, probe], logger=rec)
    fit_trainer.fit(module, data, ckpt_path=ckpt)
    return module, rec, fit_trainer, probe


def test_auto_stablemax_default_recipe_acts_once_and_survives_resume(tmp_path):
    first = AutoStableMax(threshold=0.1, patience=2, every_n_steps=1, nlm_trigger=False, strict=True)
    assert first.actions == ("stablemax", "orthograd", "rescale", "reset_optimizer") and first.rescale_factor == 0.5
    module, rec, fit_trainer, probe = _default_recipe_run(3, first)
    assert first.triggered_step == 2 and first.applied == list(first.actions)
    # step 3 started from half the weights after step 2, with the momentum buffers cleared
    ref = Switchable(_confident_net(scale=300.0), lr=LR, momentum=0.9)
    x, y, data = _full_batch()
    trainer(max_steps=2, callbacks=[]).fit(ref, data)
    for name, p in ref.named_parameters():
        assert torch.equal(probe.before[name], 0.5 * p.detach()), name
    text = rec.texts[0][1]
    for what in ("switched 1 CrossEntropy loss to StableMax", "wrapped 1 optimizer in OrthoGrad",
                 f"multiplied {len(list(module.parameters()))} weight tensors by 0.5 once", "reset the optimizer state", "sc_fraction >= 0.1"):
        assert what in text, what
    assert float(parse_event(text)["values"]["sc_fraction"]) == pytest.approx(first.trigger_values["sc_fraction"], rel=1e-3)
    # after the switch sc_fraction/zero_loss_fraction measure the loss in use (StableMax: no collapse),
    # softmax_sc_fraction keeps measuring the softmax
    sc = dict(rec.scalars["dynscope/collapse/sc_fraction"])
    softmax = dict(rec.scalars["dynscope/collapse/softmax_sc_fraction"])
    assert sc[1] == softmax[1] >= 0.1 and sc[3] == 0.0 and dict(rec.scalars["dynscope/collapse/zero_loss_fraction"])[3] == 0.0
    with torch.no_grad():
        z = module.net(x)
    assert softmax[3] == pytest.approx(collapsed_rows(z).double().mean().item()) and softmax[3] > 0
    path = str(tmp_path / "after.ckpt")
    fit_trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)

    second = AutoStableMax(threshold=0.1, patience=1000, every_n_steps=1, nlm_trigger=False, strict=True)
    module2, rec2, resumed, probe2 = _default_recipe_run(5, second, ckpt=path)
    assert second.active and second.triggered_step == 2 and second.applied == first.applied
    for name, p in probe2.start.items():  # not shrunk a second time
        assert torch.equal(p, saved["state_dict"][name]), name
    assert probe2.opt_state and all(  # not reset a second time: the momentum of step 3 is there
        torch.equal(s["momentum_buffer"], saved["optimizer_states"][0]["state"][k]["momentum_buffer"])
        for k, s in probe2.opt_state.items())
    assert module2.modes == ["stablemax", "stablemax"] and isinstance(resumed.optimizers[0], OrthoGrad)
    assert rec2.texts == []


def test_nlm_cos_is_not_logged_for_zero_norm_tensors():
    x, y, data = _full_batch()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].bias.zero_()
    rec = Recorder()
    trainer(max_steps=1, callbacks=[SoftmaxCollapse(every_n_steps=1, strict=True)], logger=rec).fit(
        Classifier(net, lr=0.01), data)
    logged = {t for t in rec.scalars if t.startswith("dynscope/collapse/nlm_cos/")}
    assert logged == {"dynscope/collapse/nlm_cos/net.0.weight", "dynscope/collapse/nlm_cos/net.2.weight",
                      "dynscope/collapse/nlm_cos/net.2.bias"}
    assert all(math.isfinite(v) for t in logged for _, v in rec.scalars[t])


def test_a_requested_mitigation_with_unmeasurable_batches_never_ends_the_run():
    """Soft targets or dict batches: AutoStableMax (alone or through DynScope) warns, skips, training goes on."""
    from dynscope.callbacks import DynScope

    x, y, _ = _full_batch(32)
    soft = torch.nn.functional.one_hot(y, 3).float()

    class SoftTargets(Switchable):
        def training_step(self, batch, batch_idx):
            return self.criterion(self(batch[0]), batch[1])

    class DictBatches(Switchable):
        def training_step(self, batch, batch_idx):
            return self.criterion(self(batch["x"]), batch["y"])

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return {"x": x[i], "y": y[i]}

    dict_data = torch.utils.data.DataLoader(Dicts(), batch_size=16)
    cases = [(SoftTargets, loader(x, soft, batch_size=16)), (DictBatches, dict_data)]
    for kind, data in cases:
        for make in (lambda: AutoStableMax(every_n_steps=1),
                     lambda: DynScope(budget=None, curvature=False, noise=False, regions=False, mitigate=("stablemax",),
                                      collapse={"every_n_steps": 1})):
            callback = make()
            fit_trainer = trainer(max_steps=4, callbacks=[callback])
            with pytest.warns(RuntimeWarning, match="mitigation is skipped"):
                fit_trainer.fit(kind(mlp(), lr=0.01), data)
            assert fit_trainer.global_step == 4, kind.__name__
        strict = AutoStableMax(every_n_steps=1, strict=True)
        with pytest.raises(LossProtocolError):
            trainer(max_steps=4, callbacks=[strict]).fit(kind(mlp(), lr=0.01), data)


def test_auto_stablemax_without_an_optimizer_warns_and_goes_on():
    class NoOptimizer(Switchable):
        def configure_optimizers(self):
            return None

    _, _, data = _full_batch(16)
    callback = AutoStableMax(every_n_steps=1, patience=1, accuracy_threshold=0.0, nlm_threshold=-1.0)
    fit_trainer = trainer(max_steps=2, callbacks=[callback])
    with pytest.warns(RuntimeWarning, match="no optimizer to wrap"):
        fit_trainer.fit(NoOptimizer(mlp(), lr=0.01), data)
    assert callback.triggered_step == 1 and callback.applied == ["stablemax", "rescale"]
    assert not any(isinstance(o, OrthoGrad) for o in fit_trainer.strategy.optimizers)
    with pytest.raises(LossProtocolError, match="no optimizer"):
        trainer(max_steps=2, callbacks=[AutoStableMax(every_n_steps=1, patience=1, accuracy_threshold=0.0,
                                                      nlm_threshold=-1.0, strict=True)]).fit(
            NoOptimizer(mlp(), lr=0.01), data)


def test_every_callback_accepts_loss_fn_and_a_crossentropy_given_as_loss_fn_is_the_one_switched():
    from dynscope.callbacks import Curvature, GradientNoise, LinearRegions, VarianceAmplification

    ce = CrossEntropy()
    built = [Curvature(loss_fn=ce), GradientNoise(loss_fn=ce), SoftmaxCollapse(loss_fn=ce), AutoStableMax(loss_fn=ce),
             LinearRegions(loss_fn=ce), VarianceAmplification(lambda m: 0.0, loss_fn=ce)]
    assert all(c.loss_fn is ce for c in built)

    class Outside(Classifier):  # the loss is not a submodule: only loss_fn tells AutoStableMax about it
        def training_step(self, batch, batch_idx):
            x, y = batch
            return ce(self(x), y)

    x, y, data = _full_batch()
    callback = AutoStableMax(1, threshold=0.1, patience=1, actions="stablemax", nlm_trigger=False, loss_fn=ce,
                             strict=True)
    trainer(max_steps=2, callbacks=[callback]).fit(Outside(_confident_net(scale=300.0), lr=LR), data)
    assert callback.triggered_step == 1 and callback.applied == ["stablemax"] and ce.mode == "stablemax"
    # after the switch the loss in use is StableMax's (no float32 collapse); the softmax still collapses
    assert callback.last_metrics["sc_fraction"] == 0.0 and callback.last_metrics["softmax_sc_fraction"] > 0.1


def test_auto_stablemax_positional_arguments_are_softmax_collapses():
    callback = AutoStableMax(5, "float64")
    assert (callback.schedule.every_n_steps, callback.dtype) == (5, "float64")
    assert (callback.threshold, callback.patience) == (0.1, 3)
    with pytest.raises(TypeError, match="positional arguments"):
        AutoStableMax(0.1, 3)  # the old (threshold, patience) order is refused, not misread
