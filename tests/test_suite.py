"""DynScope: the same values as the single callbacks, diagnostics that do not apply, the overhead
budget and its tightening near events, the observer effect, resume, and LightningCLI YAML."""

from __future__ import annotations

import pytest
import torch
import pytorch_lightning as pl
import torch.nn.functional as F
from torch import nn

from dynscope.callbacks import Curvature, DiagnosticCallback, DynScope, GradientNoise, LinearRegions, SoftmaxCollapse
from dynscope.callbacks.budget import Allowance, share_budget
from dynscope.callbacks.suite import DEFAULTS, near_event
from dynscope.nn import CrossEntropy
from models import Classifier, Recorder, SmallCNN, classification_data, loader, mlp, trainer
from observer import assert_same_weights, trained_weights


def fit_cnn(callbacks, steps=12, logger=None, ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    module = Classifier(SmallCNN(), lr=0.05, momentum=0.9)
    x, y = classification_data(96, (1, 8, 8))
    fit_trainer = trainer(max_steps=steps, callbacks=list(callbacks), logger=logger or False, **kwargs)
    fit_trainer.fit(module, loader(x, y, batch_size=16), ckpt_path=ckpt_path)
    return module, fit_trainer


def dynscope_scalars(recorder):
    return {k: v for k, v in recorder.scalars.items() if k.startswith("dynscope/") and not k.startswith("dynscope/overhead")}


def test_without_a_budget_the_suite_logs_what_the_single_callbacks_log():
    suite_log, single_log = Recorder(), Recorder()
    scope = DynScope(budget=None, strict=True)
    fit_cnn([scope], logger=suite_log)
    fit_cnn(
        [
            Curvature(strict=True, **DEFAULTS["curvature"]),
            GradientNoise(strict=True, **DEFAULTS["noise"]),
            SoftmaxCollapse(strict=True, **DEFAULTS["collapse"]),
            LinearRegions(strict=True, **DEFAULTS["regions"]),
        ],
        logger=single_log,
    )
    ours, theirs = dynscope_scalars(suite_log), dynscope_scalars(single_log)
    assert set(ours) == set(theirs)
    for group in ("curvature/hessian_trace", "curvature/lambda_max", "noise/gsnr", "collapse/sc_fraction", "regions/lc_train"):
        assert f"dynscope/{group}" in ours
    for key in theirs:
        assert [s for s, _ in ours[key]] == [s for s, _ in theirs[key]], key
        assert [v for _, v in ours[key]] == pytest.approx([v for _, v in theirs[key]], rel=1e-6, abs=1e-9), key
    assert [s for s, _ in ours["dynscope/collapse/sc_fraction"]] == [1, 10]
    assert [s for s, _ in ours["dynscope/curvature/hessian_trace"]] == [1]
    overhead = suite_log.scalars["dynscope/overhead"]
    assert overhead and all(v > 0 for _, v in overhead)
    assert {"dynscope/overhead/curvature", "dynscope/overhead/stretch/noise"} <= set(suite_log.scalars)


def test_diagnostics_that_do_not_apply_are_dropped_with_a_warning_and_training_goes_on():
    class Regression(Classifier):  # float targets, a batch-level loss, no loss_fn attribute
        def __init__(self):
            super().__init__(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), lr=0.01)
            del self.criterion

        def dynscope_loss(self, batch):
            x, y = batch
            return F.mse_loss(self(x).squeeze(-1), y)  # a scalar: not per sample

        def training_step(self, batch, batch_idx):
            return self.dynscope_loss(batch)

    x = torch.randn(32, 4)
    y = x.sum(1)
    scope = DynScope(budget=None, regions={"functional": False})
    with pytest.warns(RuntimeWarning) as record:
        trainer(max_steps=12, callbacks=[scope]).fit(Regression(), loader(x, y, batch_size=8))
    messages = " ".join(str(w.message) for w in record)
    assert "smooth activations (Tanh at 'net.1')" in messages and "GradientNoise: dropped for the rest of this run" in messages
    assert "SoftmaxCollapse: dropped for the rest of this run" in messages and "C >= 2" in messages
    assert list(scope.callbacks) == ["curvature"]  # regions at setup, collapse at its first measurement
    assert scope.callbacks["curvature"].num_measurements == 1


def test_a_requested_mitigation_that_cannot_work_is_an_error():
    with pytest.raises(ValueError, match="metric"):
        DynScope(mitigate=("ema",))
    with pytest.raises(ValueError, match="mitigate"):
        DynScope(mitigate=("dropout",))
    # a module computing F.cross_entropy itself: the StableMax switch is skipped with a warning, the rest of
    # AutoStableMax's recipe still applies (issue 13), and the run goes on
    with pytest.warns(RuntimeWarning, match="StableMax switch is skipped"):
        fit_cnn([DynScope(budget=None, mitigate=("stablemax",))], steps=1)


# -- the budget ------------------------------------------------------------------------------------------
def test_budget_sharing_and_allowance():
    assert share_budget({"a": 1.0, "b": 0.1}, available=0.5) == {"b": 1.0, "a": 2.5}
    assert share_budget({"a": 1.0}, available=0.0) == {"a": 1024.0}
    # a diagnostic near an event gets four times the share and may run four times as often
    near = share_budget({"a": 1.0, "b": 1.0}, available=1.0, weights={"a": 4.0}, floors={"a": 0.25})
    assert near == pytest.approx({"a": 1.25, "b": 5.0})
    allowance = Allowance(0.1)
    allowance.update(dynscope_seconds=1.0, training_seconds=20.0)
    assert allowance.admit(0.6) and not allowance.admit(0.6) and allowance.admit(0.4)
    with pytest.raises(ValueError, match="budget"):
        Allowance(1.5)
    assert near_event({"sc_fraction": 0.01}, {}) and not near_event({"eos_ratio": 0.5, "sc_fraction": 0.0}, {})
    assert not near_event({"sc_fraction": 0.5}, {"sc_fraction": 0.6})
    assert near_event({"amplification": 3.0}, {"amplification": 2.0})


class FakeClock:
    """Seconds that pass only when the test says so: the budget's arithmetic, free of machine load."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Sleeper(Classifier):
    """A training step of known length (5 ms on the fake clock)."""

    def __init__(self, net, clock):
        super().__init__(net)
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock.advance(0.005)
        return super().training_step(batch, batch_idx)


class Slow(DiagnosticCallback):
    """A diagnostic that takes 30 ms (on the fake clock) and reports a fixed eos_ratio."""

    group = "slow"

    def __init__(self, clock, eos_ratio=0.0, every_n_steps=1, cost=0.03):
        super().__init__(every_n_steps=every_n_steps)
        self.fake = clock
        self.eos_ratio = eos_ratio
        self.cost = cost
        self.steps = []

    def measure(self, trainer, pl_module, batch):
        self.fake.advance(self.cost)
        self.steps.append(trainer.global_step)
        return {"eos_ratio": self.eos_ratio}


def run_sleeper(scope, steps, clock, before=()):
    torch.manual_seed(0)
    x, y = classification_data(64, (4,))
    trainer(max_steps=steps, callbacks=[*before, scope]).fit(Sleeper(mlp((4, 8, 3)), clock), loader(x, y, batch_size=8))


def test_the_budget_keeps_the_overhead_under_its_fraction():
    clock = FakeClock()
    slow = Slow(clock, every_n_steps=1)
    scope = DynScope(budget=0.1, curvature=False, noise=False, collapse=False, regions=False, extra={"slow": slow},
                     clock=clock)
    run_sleeper(scope, 200, clock)
    # Every second counted is one the fake clock was advanced by: 200 steps of 5 ms, 30 ms per measurement.
    assert scope.training_seconds() == pytest.approx(200 * 0.005)
    assert scope.seconds == pytest.approx(0.03 * len(slow.steps))
    # Each admitted measurement fit in the time saved up; the first one's cost was only estimated.
    assert 2 <= len(slow.steps) and scope.seconds <= 0.1 * scope.training_seconds() + 0.03
    assert slow.schedule.stretch >= 8  # 30 ms per step wanted, 0.5 ms per step available


def test_the_steps_a_measurement_slows_down_are_charged_to_it():
    # each measurement (30 ms) leaves the next two training steps at 8 and 6 ms instead of 5 ms (cold
    # caches): DynScope times the steps after it and charges the 3 + 1 ms to the budget
    clock = FakeClock()

    class Cooling(Slow):
        def measure(self, trainer, pl_module, batch):
            pl_module.slower = [0.003, 0.001]
            return super().measure(trainer, pl_module, batch)

    class Slowed(Sleeper):
        slower = []

        def training_step(self, batch, batch_idx):
            if self.slower:
                self.clock.advance(self.slower.pop(0))
            return super().training_step(batch, batch_idx)

    slow = Cooling(clock, every_n_steps=50)
    scope = DynScope(budget=0.5, curvature=False, noise=False, collapse=False, regions=False, extra={"slow": slow},
                     clock=clock)
    torch.manual_seed(0)
    x, y = classification_data(64, (4,))
    trainer(max_steps=225, callbacks=[scope]).fit(Slowed(mlp((4, 8, 3)), clock), loader(x, y, batch_size=8))
    measured = len(slow.steps)
    assert measured >= 3 and slow.steps[-1] <= 221  # (each one's aftermath inside the run)
    # (the typical step it is compared with is the mean step so far, a little above 5 ms)
    assert scope.controller.aftermath_seconds == pytest.approx(0.004 * measured, rel=0.1)
    assert scope.seconds == pytest.approx(0.03 * measured + scope.controller.aftermath_seconds, rel=1e-6)


def test_near_an_event_a_diagnostic_runs_more_often_than_its_base_cadence():
    counts = {}
    for eos in (0.1, 0.9):
        clock = FakeClock()
        slow = Slow(clock, eos_ratio=eos, every_n_steps=32)
        scope = DynScope(budget=0.9, curvature=False, noise=False, collapse=False, regions=False, extra={"slow": slow},
                         clock=clock)
        run_sleeper(scope, 160, clock)
        counts[eos] = len(slow.steps)
        assert slow.schedule.stretch == (1.0 if eos < 0.8 else 0.25)
    assert counts[0.9] >= 2 * counts[0.1]


def test_a_dynscope_reused_for_a_second_fit_starts_its_budget_accounts_afresh():
    class Accounts(pl.Callback):  # placed before DynScope: its state when the training starts
        def on_train_start(self, trainer, pl_module):
            self.seen = (scope.seconds, scope.elapsed_before, dict(scope.costs),
                         {n: c.seconds_spent for n, c in scope.callbacks.items()})

    clock = FakeClock()  # (on the machine's clock a loaded machine could leave a short fit without a measurement)
    scope = DynScope(budget=0.5, curvature=False, noise=False, collapse=False, regions=False,
                     extra={"slow": Slow(clock, cost=0.001)}, clock=clock)
    probe = Accounts()
    run_sleeper(scope, 6, clock, before=[probe])
    assert scope.seconds > 0 and scope.costs  # the first fit spent time and measured costs
    run_sleeper(scope, 6, clock, before=[probe])
    seconds, elapsed, costs, spent = probe.seen
    assert seconds == 0.0 and elapsed == 0.0 and costs == {} and set(spent.values()) == {0.0}
    assert scope.seconds > 0  # and the second fit counted its own


def test_an_expensive_diagnostic_is_not_crowded_out_by_cheap_ones():
    # 5 ms steps, budget 10%: 0.5 ms per step to spend. A 1 ms check due every step would take it all;
    # a 40 ms measurement due every 10 steps gets its turn because the fewest-measured goes first.
    clock = FakeClock()
    cheap, costly = Slow(clock, every_n_steps=1, cost=0.001), Slow(clock, every_n_steps=10, cost=0.04)
    scope = DynScope(budget=0.1, curvature=False, noise=False, collapse=False, regions=False,
                     extra={"cheap": cheap, "costly": costly}, clock=clock)
    run_sleeper(scope, 400, clock)
    assert len(costly.steps) >= 4  # min_measurements over the run (its cadence capped at 400 / 4 steps)
    assert len(cheap.steps) >= 4
    assert scope.seconds <= 0.1 * scope.training_seconds() + 0.04  # the first one's cost was a prior
    assert not scope.unmeasured()


def test_a_diagnostic_that_cannot_fit_is_named_with_the_reason():
    clock = FakeClock()
    huge = Slow(clock, every_n_steps=10, cost=5.0)
    huge.expected_steps = 1000.0  # 1000 steps of 5 ms: more than 40 steps ever save up
    scope = DynScope(budget=0.05, curvature=False, noise=False, collapse=False, regions=False, extra={"huge": huge},
                     clock=clock)
    with pytest.warns(RuntimeWarning, match="huge was not measured in this run"):
        run_sleeper(scope, 40, clock)
    assert huge.steps == []


class Piloted(Slow):
    """A 40 ms diagnostic whose prior (20 steps of 5 ms = 100 ms) is 2.5x too dear; its pilot takes 2 ms
    on the fake clock and says one expected step costs 2 ms (40 ms for a measurement)."""

    def __init__(self, clock, fail=False):
        super().__init__(clock, every_n_steps=10, cost=0.04)
        self.expected_steps, self.fail, self.pilots = 20.0, fail, []

    def pilot(self, trainer, pl_module, batch, clock, batch_size=None):
        self.pilots.append(trainer.global_step)
        self.fake.advance(0.002)
        if self.fail:
            raise RuntimeError("no pilot here")
        return 0.002


def test_a_pilot_runs_once_before_the_first_measurement_and_its_rate_replaces_the_prior():
    clock = FakeClock()
    piloted = Piloted(clock)
    scope = DynScope(budget=0.1, curvature=False, noise=False, collapse=False, regions=False, extra={"piloted": piloted},
                     clock=clock)
    expected = []
    learn = scope.controller.measured
    scope.controller.measured = lambda name, *a, **k: (expected.append(scope.controller.expected(name, piloted)), learn(name, *a, **k))
    run_sleeper(scope, 200, clock)
    assert len(piloted.pilots) == 1 and piloted.steps and piloted.pilots[0] < piloted.steps[0]
    assert expected[0] == pytest.approx(0.04)  # the pilot's 2 ms per expected step, times 20: not the prior's 0.1 s
    # with the prior it waits for 100 ms of savings (200 steps of 5 ms at 10%): measured only once the run ends
    assert piloted.steps[0] <= 100
    assert scope.seconds == pytest.approx(0.002 + 0.04 * len(piloted.steps))  # the pilot is charged too
    unpiloted = DynScope(budget=None, curvature=False, noise=False, collapse=False, regions=False,
                         extra={"piloted": Piloted(FakeClock())}, clock=FakeClock())
    run_sleeper(unpiloted, 20, FakeClock())
    assert unpiloted.callbacks["piloted"].pilots == []  # no budget: nothing to plan, no pilot


def test_a_pilot_waits_until_its_diagnostic_is_next_in_line():
    clock = FakeClock()
    piloted, cheap = Piloted(clock), Slow(clock, every_n_steps=10, cost=0.001)
    scope = DynScope(budget=0.1, curvature=False, noise=False, collapse=False, regions=False,
                     extra={"piloted": piloted, "cheap": cheap}, clock=clock)
    run_sleeper(scope, 200, clock)
    # both are due every 10 steps; the cheap one, never measured either, goes first and the pilot after it
    assert cheap.steps and len(piloted.pilots) == 1 and piloted.pilots[0] >= cheap.steps[0]
    assert piloted.steps and piloted.pilots[0] < piloted.steps[0]


def test_no_pilot_for_a_diagnostic_out_of_reach_even_at_half_its_expected_cost():
    # a prior of 1000 steps of 5 ms (5 s) in a 40-step run at 5%: 10 ms ever saved up, so even a
    # pilot saying it costs half as much would not bring it within reach: the pilot is skipped
    clock = FakeClock()
    piloted = Piloted(clock)
    piloted.expected_steps = 1000.0
    scope = DynScope(budget=0.05, curvature=False, noise=False, collapse=False, regions=False, extra={"piloted": piloted},
                     clock=clock)
    with pytest.warns(RuntimeWarning, match="piloted was not measured in this run"):
        run_sleeper(scope, 40, clock)
    assert piloted.pilots == [] and piloted.steps == []
    assert scope.seconds < 0.002  # (a pilot alone costs 2 ms)


def test_a_failing_pilot_leaves_the_prior_and_training_goes_on_unless_strict():
    clock = FakeClock()
    failing = Piloted(clock, fail=True)
    scope = DynScope(budget=0.1, curvature=False, noise=False, collapse=False, regions=False, extra={"piloted": failing},
                     clock=clock)
    run_sleeper(scope, 200, clock)  # (long enough to be worth a pilot)
    assert len(failing.pilots) == 1 and "piloted" not in scope.controller.rates
    strict = DynScope(budget=0.1, curvature=False, noise=False, collapse=False, regions=False,
                      extra={"piloted": Piloted(clock, fail=True)}, clock=clock, strict=True)
    with pytest.raises(RuntimeError, match="no pilot here"):
        run_sleeper(strict, 200, clock)


def test_the_curvature_pilot_times_a_few_lanczos_steps_and_touches_nothing():
    class Ticks:  # every reading one second later: the pilot's time is its number of readings
        now = 0.0

        def __call__(self):
            self.now += 1.0
            return self.now

    torch.manual_seed(0)
    module = Classifier(mlp((4, 8, 3)))
    x, y = classification_data(32, (4,))
    curvature = Curvature(method="tracked", num_matvecs=8, eigen_tol=1e-12, sub_batch=16, eval_batches=1)
    curvature._eval = [(x[:32], y[:32])]
    before = {n: p.clone() for n, p in module.named_parameters()}
    rng = torch.get_rng_state()
    rate = curvature.pilot(None, module, None, Ticks(), batch_size=32)
    # one clock second over PILOT_STEPS Lanczos steps, each 1.5 * (0.2 + 0.8 * 16 / 32) expected steps
    from callbacks.curvature import PILOT_STEPS
    assert rate == pytest.approx(1.0 / (PILOT_STEPS * 1.5 * 0.6))
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert curvature.tracker.eigenvector is None and curvature.num_measurements == 0
    # a ReLU network with cross-entropy: the pilot expects the exact trace (about 3 products, not the
    # 8 probes), so the first measurement is expected at (3 + 60 Lanczos + 2 sharpness) * 1.5 * 0.6
    assert curvature.trace_exact is None  # (nothing measured yet)
    assert curvature.expected_cost(32) == pytest.approx((3 + 60 + 2) * 1.5 * 0.6)
    curved = Curvature(method="tracked", num_matvecs=8, sub_batch=16, eval_batches=1)
    curved._eval = curvature._eval
    curved.pilot(None, Classifier(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))), None, Ticks(), 32)
    assert curved.expected_cost(32) == pytest.approx((8 + 60 + 2) * 1.5 * 0.6)
    waiting = Curvature(eval_batches=1)  # the evaluation set is not collected yet: nothing to time
    assert waiting.pilot(None, module, None, Ticks()) is None


def test_the_curvature_pilot_times_lanczos_only_after_its_bookkeeping_ran_once_untimed(monkeypatch):
    # a pilot is the first Lanczos of its process for most users: the bookkeeping's first calls
    # (LAPACK, numpy, buffers of the operator's size) run once on a diagonal of that size, before the timer
    import sys

    curvature_module = sys.modules[Curvature.__module__]
    ticks, calls = [0.0], []

    def clock():
        ticks[0] += 1.0
        return ticks[0]

    real = curvature_module.lanczos

    def recording(op, *args, **kwargs):
        calls.append((type(op).__name__, op.size, ticks[0], op.num_matvecs))
        return real(op, *args, **kwargs)

    monkeypatch.setattr(curvature_module, "lanczos", recording)
    torch.manual_seed(0)
    module = Classifier(mlp((4, 8, 3)))
    x, y = classification_data(32, (4,))
    curvature = Curvature(method="tracked", num_matvecs=8, sub_batch=16, eval_batches=1)
    curvature._eval = [(x[:32], y[:32])]
    assert curvature.pilot(None, module, None, clock, batch_size=32) is not None
    size = sum(p.numel() for p in module.parameters())
    (first, size_1, ticks_1, _), (second, size_2, ticks_2, _) = calls
    assert (first, size_1, ticks_1) == ("DiagonalOperator", size, 0.0)  # before the clock was read
    assert (second, size_2, ticks_2) == ("HessianOperator", size, 1.0)  # between the two readings
    assert ticks[0] == 2.0


# -- the observer effect, resume, configuration -----------------------------------------------------------
def test_the_suite_does_not_change_training():
    baseline = trained_weights([], steps=20)
    assert_same_weights(baseline, trained_weights([DynScope(budget=None)], steps=20))
    assert_same_weights(baseline, trained_weights([DynScope(budget=0.05)], steps=20))


def test_resume_continues_schedules_windows_and_state(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    def metric(module):
        return float(module.net.fc.weight.norm())

    def make():
        return DynScope(budget=None, metric=metric, gva={"every_n_steps": 2, "window": 4}, strict=True)

    straight_log, first_log, second_log = Recorder(), Recorder(), Recorder()
    straight = make()
    fit_cnn([straight], steps=24, logger=straight_log)
    first = make()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=12)
    fit_cnn([first, checkpoint], steps=12, logger=first_log, enable_checkpointing=True)
    resumed = make()
    fit_cnn([resumed], steps=24, logger=second_log, ckpt_path=str(tmp_path / "last.ckpt"))

    joined = dynscope_scalars(first_log)
    for key, rows in dynscope_scalars(second_log).items():
        joined.setdefault(key, []).extend(rows)
    expected = dynscope_scalars(straight_log)
    assert set(joined) == set(expected)
    for key in expected:
        assert [s for s, _ in joined[key]] == [s for s, _ in expected[key]], key
        assert [v for _, v in joined[key]] == pytest.approx([v for _, v in expected[key]], rel=1e-5, abs=1e-8), key
    gva = resumed.callbacks["gva"]
    assert list(gva.metrics) == pytest.approx(list(straight.callbacks["gva"].metrics))
    assert {n: c.num_measurements for n, c in resumed.callbacks.items()} == {
        n: c.num_measurements for n, c in straight.callbacks.items()
    }
    assert resumed.seconds > first.seconds - 1e-9


def test_configurable_from_lightning_cli_yaml(tmp_path):
    pytest.importorskip("jsonargparse")
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: dynscope.callbacks.DynScope
      init_args:
        loss_fn: torch.nn.functional.cross_entropy
        budget: 0.2
        curvature:
          every_n_steps: 100
          num_matvecs: 8
        regions: false
        mitigate: [stablemax, orthograd]
"""
    )
    cli = LightningCLI(CliModule, CliData, args=["--config", str(config)], run=False, save_config_callback=None)
    scope = next(c for c in cli.trainer.callbacks if isinstance(c, DynScope))
    assert scope.loss_fn is F.cross_entropy and scope.budget == 0.2
    assert list(scope.callbacks) == ["curvature", "noise", "collapse"]
    assert scope.callbacks["curvature"].num_matvecs == 8 and scope.callbacks["curvature"].schedule.every_n_steps == 100
    assert scope.callbacks["collapse"].orthograd
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3


class CliModule(Classifier):
    def __init__(self, hidden: int = 8):
        super().__init__(mlp((4, hidden, 3)), lr=0.1)
        self.criterion = CrossEntropy()


class CliData(pl.LightningDataModule):
    def train_dataloader(self):
        x, y = classification_data(32, (4,))
        return loader(x, y, batch_size=8)


def test_the_suite_demo_prints_what_each_diagnostic_did(tmp_path, capsys):
    from dynscope.cli.main import main

    assert main(["demo", "suite", "--steps", "40", "--budget", "0.5", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DynScope(budget=0.5) over 40 steps" in out
    table = out.split("over 40 steps")[1].split("\n\n")[0].splitlines()[1:]
    names = ("curvature", "noise", "collapse", "regions")
    # a row per diagnostic, or (when curvature's values make the table too wide) a column per diagnostic
    rows = {line.split()[0] for line in table if line.strip()}
    assert set(names) <= rows or all(name in table[0].split() for name in names), "\n".join(table)
    assert any(p.name.startswith("suite-") for p in tmp_path.iterdir())


def test_resume_keeps_a_mitigation_switched_on(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    eager = {"every_n_steps": 1, "patience": 1, "nlm_trigger": True, "nlm_threshold": -1.0, "accuracy_threshold": 0.0}
    x, y = classification_data(32, (4,))

    def run(scope, steps, extra=(), ckpt=None, **kwargs):
        torch.manual_seed(0)
        module = CliModule()
        trainer(max_steps=steps, callbacks=[scope, *extra], **kwargs).fit(module, loader(x, y, batch_size=8), ckpt_path=ckpt)
        return module

    first = DynScope(budget=None, collapse=eager, mitigate=("stablemax",), curvature=False, noise=False, regions=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    module = run(first, 3, extra=[checkpoint], enable_checkpointing=True)
    assert first.callbacks["collapse"].triggered_step == 1 and module.criterion.mode == "stablemax"
    # the resumed run could not switch by itself (patience too long): the switch comes from the checkpoint
    patient = dict(eager, patience=1000)
    second = DynScope(budget=None, collapse=patient, mitigate=("stablemax",), curvature=False, noise=False, regions=False)
    resumed = run(second, 6, ckpt=str(tmp_path / "last.ckpt"))
    assert second.callbacks["collapse"].active and second.callbacks["collapse"].triggered_step == 1
    assert resumed.criterion.mode == "stablemax"


def test_every_lightning_hook_reaches_the_diagnostics_that_implement_it():
    class Hooked(DiagnosticCallback):
        group = "hooked"

        def __init__(self):
            super().__init__(every_n_steps=1000)
            self.calls = []

        def measure(self, trainer, pl_module, batch):
            return {}

    hooks = ("on_fit_start", "on_fit_end", "teardown", "on_exception", "on_train_epoch_start",
             "on_validation_start", "on_validation_batch_end", "on_before_backward", "on_after_backward")
    for hook in hooks:  # each records that it was called
        setattr(Hooked, hook, lambda self, *args, _hook=hook, **kwargs: self.calls.append(_hook))
    Hooked.idle_between_measurements = False  # (an idle one gets the backward hooks in its measured steps only: below)

    class Validated(Classifier):
        def validation_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    class Failing(Classifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("the user's step failed")
            return super().training_step(batch, batch_idx)

    x, y = classification_data(32, (4,))
    hooked = Hooked()
    scope = DynScope(budget=0.05, curvature=False, noise=False, collapse=False, regions=False, extra={"hooked": hooked})
    trainer(max_steps=4, callbacks=[scope], limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0).fit(
        Validated(mlp((4, 8, 3))), loader(x, y, batch_size=8), loader(x, y, batch_size=8))
    assert set(hooked.calls) == set(hooks) - {"on_exception"}
    assert hooked.calls.count("on_before_backward") == 4 and hooked.calls.count("on_validation_batch_end") == 2

    class Idle(Hooked):
        idle_between_measurements = True

    idle = Idle()
    scope = DynScope(budget=None, curvature=False, noise=False, collapse=False, regions=False, extra={"idle": idle})
    trainer(max_steps=4, callbacks=[scope]).fit(Classifier(mlp((4, 8, 3))), loader(x, y, batch_size=8))
    assert idle.num_measurements == 1 and idle.calls.count("on_before_backward") == 1  # step 1 only

    hooked = Hooked()
    scope = DynScope(budget=0.05, curvature=False, noise=False, collapse=False, regions=False, extra={"hooked": hooked})
    with pytest.raises(RuntimeError, match="the user's step failed"):
        trainer(max_steps=4, callbacks=[scope]).fit(Failing(mlp((4, 8, 3))), loader(x, y, batch_size=8))
    assert hooked.calls.count("on_exception") == 1
