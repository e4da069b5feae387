"""The overhead budget's controller (dynscope.budget), driven by an injected clock: no Lightning, no
sleeping, no timing. Every second below passes only when the test advances the fake clock, so each
expected value follows from the arithmetic of the rules in the module docstring."""

from __future__ import annotations

import math

import pytest
import torch

from dynscope.budget import REFRESH_EVERY, SYNC_EVERY, BudgetController, share_budget


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Check:
    """A diagnostic due every ``every`` steps (and at step 1) whose measurements cost ``cost`` seconds
    (``first`` for the first one); it states ``prior`` training steps as its expected cost."""

    def __init__(self, every, cost, first=None, prior=None, deferrable=True, metrics=None):
        self.every, self.cost, self.first = every, cost, cost if first is None else first
        self.prior = cost if prior is None else prior
        self.deferrable = deferrable
        self.metrics = metrics or {}
        self.num_measurements, self.last_metrics, self.stretch, self.pending = 0, {}, 1.0, False
        self.steps = []

    def expected_cost(self, batch_size=None):
        return self.prior

    def period(self, step):
        return float(self.every)

    def wants(self, step):
        period = max(1, int(round(self.every * self.stretch)))
        return self.pending or step == 1 or step % period == 0

    def next_wanted(self, step):
        if self.pending or step == 1:
            return step
        period = max(1, int(round(self.every * self.stretch)))
        return -(-step // period) * period

    def set_stretch(self, stretch):
        self.stretch = stretch


def simulate(checks, steps, budget=0.05, step_seconds=1.0, hook_seconds=0.0, total=None, **kwargs):
    """Train ``steps`` steps of ``step_seconds``; each step's hooks cost ``hook_seconds``; measure what is admitted.
    Returns the controller and the overhead after each step."""
    clock = Clock()
    controller = BudgetController(budget, clock=clock, **kwargs)
    controller.start(0, steps if total is None else total, checks)
    overheads = []
    for step in range(1, steps + 1):
        admitted = controller.plan(step, checks)  # at the start of the step, as DynScope does
        clock.now += step_seconds + hook_seconds
        controller.charge(hook_seconds)
        for name, check in checks.items():  # after the optimizer step
            if name in admitted:
                cost = check.first if check.num_measurements == 0 else check.cost
                clock.now += cost
                controller.charge(cost)
                check.num_measurements += 1
                check.pending = False
                check.steps.append(step)
                controller.measured(name, cost, check.metrics)
            elif name in controller.wanting:
                check.pending = True
        overheads.append(controller.overhead())
    return controller, overheads


def test_the_overhead_stays_under_the_budget_at_every_step():
    # 1 s steps, budget 5%: 0.05 s saved per step; a 2 s measurement due every step fits every 40 steps
    check = Check(every=1, cost=2.0)
    controller, overheads = simulate({"check": check}, 1000)
    assert controller.seconds == pytest.approx(2.0 * len(check.steps))
    assert controller.training_seconds() == pytest.approx(1000.0)
    assert max(overheads) <= 0.05 + 1e-12  # its prior was its true cost: never over, not even at first
    # every 40 steps from step 41 (when 40 s of training have saved 2 s): 24 of the 25 that 1000 s pay for
    assert check.steps == list(range(41, 1001, 40))


def test_the_cost_model_learns_from_the_first_measurement_and_drops_its_one_time_work():
    clock = Clock()
    check = Check(every=1, cost=1.0, prior=4.0)
    controller = BudgetController(0.1, clock=clock)
    controller.start(0, math.inf, {"check": check})
    assert controller.expected("check", check) == math.inf  # no step timed yet: a prior in steps means nothing
    clock.now = 2.0
    controller.plan(3, {"check": check})  # two steps of training done: 1 s per step
    assert controller.expected("check", check) == pytest.approx(4.0)  # 4 steps of 1 s
    controller.measured("check", 3.0, {})  # the first measurement, with its one-time work
    assert controller.expected("check", check) == 3.0
    controller.measured("check", 1.0, {})  # the second replaces it
    assert controller.expected("check", check) == 1.0
    controller.measured("check", 2.0, {})  # then a moving average
    assert controller.expected("check", check) == pytest.approx(1.5)


def _one_second_steps(prior: float):
    """A controller (budget 0.1) with a check of ``prior`` expected steps, after two training steps of 1 s."""
    clock = Clock()
    check = Check(every=1, cost=1.0, prior=prior)
    controller = BudgetController(0.1, clock=clock)
    controller.start(0, math.inf, {"check": check})
    clock.now = 2.0
    controller.plan(3, {"check": check})
    return clock, check, controller


def test_a_diagnostic_whose_expected_cost_drops_is_charged_the_learnt_rate_times_its_new_expectation():
    # like curvature once its trace turned out exact: 12 expected steps, then 3; the controller learns seconds
    # per expected step and scales the new expectation, instead of repeating the first cost
    clock, check, controller = _one_second_steps(prior=12.0)
    controller.measured("check", 6.0, {}, expected_steps=12.0)  # 0.5 s per expected step
    check.prior = 3.0  # the warm measurements it expects from now on
    assert controller.expected("check", check) == pytest.approx(1.5)
    controller.measured("check", 2.0, {}, expected_steps=3.0)  # the second replaces the first rate
    assert controller.expected("check", check) == pytest.approx(2.0)
    controller.measured("other", 5.0, {})  # without an expected cost: its seconds, as before
    assert controller.expected("other", check) == 5.0
    restored = BudgetController(0.1, clock=clock)
    restored.load_state_dict(controller.state_dict())
    assert restored.expected("check", check) == pytest.approx(2.0)


def priced(**priors):
    """A controller at 1 s per training step over checks stating ``priors`` (training steps), none measured."""
    clock = Clock()
    checks = {name: Check(every=1, cost=1.0, prior=prior) for name, prior in priors.items()}
    controller = BudgetController(0.1, clock=clock)
    controller.start(0, math.inf, checks)
    clock.now = 2.0
    controller.plan(3, checks)  # two steps of training done
    return controller, checks


def test_a_diagnostic_not_yet_measured_is_expected_at_its_prior_times_what_the_others_priors_were_worth():
    controller, checks = priced(cheap=4.0, dear=30.0, third=2.0)
    dear = checks["dear"]
    assert controller.expected("dear", dear) == pytest.approx(30.0)  # nothing measured: the prior
    controller.measured("cheap", 2.0, {}, expected_steps=4.0)  # cost half its prior
    assert controller.expected("dear", dear) == pytest.approx(15.0)
    controller.measured("third", 4.0, {}, expected_steps=2.0)  # twice its prior: the geometric mean is 1
    assert controller.expected("dear", dear) == pytest.approx(30.0)
    controller.measured("third", 1.0, {}, expected_steps=2.0)  # the second measurement replaces the first
    assert controller.expected("dear", dear) == pytest.approx(30.0 * 0.5)
    controller.measured("cheap", 0.001, {}, expected_steps=4.0)
    assert controller.expected("dear", dear) == pytest.approx(30.0 / 4)  # at most 4x off
    controller.measured("dear", 6.0, {}, expected_steps=30.0)  # measured: its own rate from now on
    assert controller.expected("dear", dear) == pytest.approx(6.0)


def test_a_pilot_sets_the_rate_until_the_first_measurement_and_stays_out_of_the_calibration():
    controller, checks = priced(dear=30.0, cheap=4.0, other=2.0)
    dear, cheap = checks["dear"], checks["cheap"]
    controller.piloted("dear", 0.25)  # a pilot timed one expected step at 0.25 s
    assert controller.expected("dear", dear) == pytest.approx(30.0 * 0.25)
    dear.prior = 10.0  # its expected cost changes (a cold start, then warm ones): the pilot's rate scales it
    assert controller.expected("dear", dear) == pytest.approx(10.0 * 0.25)
    assert controller.calibration() == 1.0  # a pilot is not what a measurement taught about the priors
    assert controller.expected("cheap", cheap) == pytest.approx(4.0)
    controller.measured("other", 4.0, {}, expected_steps=2.0)  # measured at twice its prior
    assert controller.calibration() == 1.0  # never above 1: one dearer than it stated says nothing of the others
    assert controller.expected("cheap", cheap) == pytest.approx(4.0)
    controller.measured("other", 1.0, {}, expected_steps=2.0)  # (the second replaces the first) half its prior
    assert controller.calibration() == pytest.approx(0.5) and controller.expected("cheap", cheap) == pytest.approx(2.0)
    assert controller.expected("dear", dear) == pytest.approx(10.0 * 0.25)  # its own pilot, not the calibration
    controller.piloted("dear", 1.0)  # a second pilot does not overwrite the first
    assert controller.expected("dear", dear) == pytest.approx(10.0 * 0.25)
    controller.measured("dear", 6.0, {}, expected_steps=10.0)  # its first measurement replaces the pilot
    assert controller.expected("dear", dear) == pytest.approx(6.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        controller.piloted("cheap", bad)
    assert "cheap" not in controller.rates


def test_when_nothing_waiting_can_fit_before_the_end_the_next_plan_is_at_the_next_refresh():
    from dynscope.budget import REFRESH_EVERY

    # 100 steps of 1 s at budget 0.05: 5 s can be saved over the run, a measurement costs 20 s
    clock = Clock()
    checks = {"dear": Check(every=1, cost=20.0, prior=20.0)}
    controller = BudgetController(0.05, clock=clock)
    controller.start(0, 100, checks)
    clock.now = 2.0
    assert controller.plan(3, checks) == []
    assert controller.next_admission(3) == REFRESH_EVERY  # not every step (each plan spending what it waits for)
    assert controller.quiet(4) and not controller.quiet(REFRESH_EVERY)
    # one that will fit: planned again when the allowance will have grown enough
    fits = {"cheap": Check(every=1, cost=0.5, prior=0.5)}
    controller = BudgetController(0.05, clock=clock)
    controller.start(0, 100, fits)
    clock.now = 2.0
    assert controller.plan(3, fits) == [] and 3 < controller.next_admission(3) < REFRESH_EVERY


def test_a_cold_first_measurement_does_not_slow_down_the_later_ones():
    # warm measurements cost 1 s, the first 10 s; 0.05 s saved per step: a warm one every 20 steps once
    # the first has been paid back
    check = Check(every=1, cost=1.0, first=10.0, prior=1.0)
    simulate({"check": check}, 1000)
    gaps = [b - a for a, b in zip(check.steps[1:], check.steps[2:])]
    assert gaps and max(gaps) <= 21  # not 200 (the first measurement's cost taken as the expected one)
    assert len(check.steps) >= 1 + (50 - 10 - 1) // 1 - 1


def test_each_diagnostic_gets_its_measurements_when_the_budget_affords_them():
    # Costs in steps like the benchmark MLP's (collapse 1, regions 2, noise 2.5, curvature 8; first
    # measurements dearer): 3 of each cost 40.5 s of the 50 s a 1000-step run saves at 5%.
    checks = {
        "curvature": Check(50, 8.0, first=10.0, prior=15.0),
        "noise": Check(25, 2.5, first=3.0, prior=4.0),
        "collapse": Check(10, 1.0, first=1.4, prior=1.5),
        "regions": Check(20, 2.0, first=3.0, prior=3.0),
    }
    controller, overheads = simulate(checks, 1000)
    assert {n: c.num_measurements >= 3 for n, c in checks.items()} == dict.fromkeys(checks, True)
    assert controller.overhead() <= 0.05
    assert max(overheads) <= 0.05 + 1e-12  # every first measurement cost at most its prior
    assert controller.unmeasured(checks) == []


def test_the_fewest_measured_goes_first_so_cheap_checks_do_not_crowd_out_an_expensive_one():
    cheap, costly = Check(1, 0.2), Check(10, 8.0)
    simulate({"cheap": cheap, "costly": costly}, 400, budget=0.1)
    assert len(costly.steps) >= 4 and len(cheap.steps) >= 4


def mlp_like_checks(kind=Check, collapse=None):
    """The suite's four diagnostics at the benchmark MLP's costs in steps at budget 0.05 (curvature 13
    cold, 8 warm): 50 steps saved over 1000, 46 for 3 of each."""
    return {
        "curvature": kind(50, 8.0, first=13.0, prior=15.0),
        "noise": kind(25, 1.8, first=2.2, prior=4.0),
        "collapse": (collapse or kind)(10, 0.9, first=1.2, prior=1.0),
        "regions": kind(20, 1.6, first=2.0, prior=3.2),
    }


def test_a_turn_is_kept_for_the_laggard_so_cheap_checks_on_short_cadences_do_not_spend_its_savings():
    # Costs in steps like the benchmark MLP's at budget 0.05 (curvature 13 cold, 8 warm; DynScope's
    # own bookkeeping 0.4% of each step): 50 s saved over 1000 steps, 46 s for 3 of each. Without
    # cadence ceilings (min_measurements=0) the turn alone decides: without it curvature (on the
    # slowest cadence) is measured once while the cheap checks, due more often, are measured up to
    # 9 times with what it was saving up.
    class Blind(Check):  # a diagnostic that does not say when it is next due: no turn is kept for it
        next_wanted = None

    counts = {}
    for kind in (Check, Blind):
        checks = mlp_like_checks(kind)
        controller, _ = simulate(checks, 1000, hook_seconds=0.004, min_measurements=0)
        assert controller.overhead() <= 0.05
        counts[kind] = {n: c.num_measurements for n, c in checks.items()}
    assert counts[Blind]["curvature"] == 1 and max(counts[Blind].values()) >= 8
    assert counts[Check]["curvature"] == 2 and max(counts[Check].values()) <= 7
    # with the cadence ceilings of min_measurements (the default) as well, the counts stay level
    checks = mlp_like_checks()
    controller, _ = simulate(checks, 1000, hook_seconds=0.004)
    counts = [c.num_measurements for c in checks.values()]
    assert controller.overhead() <= 0.05 and min(counts) >= 3 and max(counts) - min(counts) <= 1


def test_a_diagnostic_behind_is_due_often_enough_for_its_missing_measurements():
    # curvature's first measurement waits for savings until step ~460 (its prior is dear); then its
    # cadence may not stretch beyond what leaves room for the missing two before step 1000. With the
    # ceiling of total / min_measurements alone (every 200 steps, the power of two under 250) it
    # was due at 800 and 1000 and measured twice; the others three times or more.
    checks = {
        "curvature": Check(50, 6.5, first=12.0, prior=13.0),
        "noise": Check(25, 2.0, first=4.0, prior=4.0),
        "collapse": Check(10, 1.2, first=2.2, prior=1.0),
        "regions": Check(20, 1.8, first=1.8, prior=2.3),
    }
    controller, _ = simulate(checks, 1000, hook_seconds=0.004)
    assert controller.overhead() <= 0.05
    assert {n: len(c.steps) >= 3 for n, c in checks.items()} == dict.fromkeys(checks, True)
    first = checks["curvature"].steps[0]
    assert first > 400 and checks["curvature"].stretch * 50 <= (1000 - first) / 2


def test_a_diagnostic_near_an_event_runs_up_to_tighten_times_as_often_as_the_laggard_but_does_not_starve_it():
    # softmax collapse rising at every measurement: near an event for the whole run. It goes first and
    # may be measured four times as often as the laggard, then it too leaves the laggard's turn paid
    # for (without that rule it took the whole allowance: curvature and noise were never measured)
    class Rising(Check):
        @property
        def metrics(self):
            return {"sc_fraction": 0.01 * (self.num_measurements + 1)}

        @metrics.setter
        def metrics(self, value):
            pass

    checks = mlp_like_checks(Check, collapse=Rising)
    controller, _ = simulate(checks, 1000, hook_seconds=0.004)
    counts = {n: c.num_measurements for n, c in checks.items()}
    assert controller.overhead() <= 0.05 and controller.near["collapse"]
    assert counts["curvature"] >= 2 and counts["noise"] >= 3 and counts["regions"] >= 3
    assert counts["collapse"] >= 3 * counts["curvature"]
    # the same collapse deciding a mitigation (AutoStableMax): never held back, it measures whenever due
    Rising.mitigating = True
    checks = mlp_like_checks(Check, collapse=Rising)
    simulate(checks, 1000, hook_seconds=0.004)
    assert checks["collapse"].num_measurements >= 40


def test_a_measurement_that_cannot_fit_before_the_end_steps_aside_and_is_named():
    # a 100 s measurement never fits in 300 steps at 5% (15 s): the cheap one still gets the allowance
    huge, cheap = Check(10, 100.0), Check(10, 1.0)
    controller, _ = simulate({"huge": huge, "cheap": cheap}, 300, hook_seconds=0.01)
    assert huge.steps == []
    assert len(cheap.steps) >= 11  # 15 s of allowance less 3 s of hooks, 1 s each (not held up behind the huge one)
    lines = controller.unmeasured({"huge": huge, "cheap": cheap})
    assert len(lines) == 1 and lines[0].startswith("dynscope DynScope: huge was not measured in this run")
    assert "~100 training steps" in lines[0] and "saved up 15 steps' worth" in lines[0]
    assert "planning and logging took 3)" in lines[0]  # the hooks' 0.01 s per 1 s step


def test_cadences_are_stretched_to_the_budget_but_not_beyond_min_measurements():
    check = Check(every=10, cost=3.0)
    simulate({"check": check}, 1000, total=1000, min_measurements=4)
    # 0.3 s per step wanted at the base cadence, 0.05 s per step available: 6x, rounded down to a power
    # of two (the allowance sets the pace), under the ceiling 1000 / 4 / 10 = 25 (rounded down to 16)
    assert check.stretch == 4.0
    class Recorded(Check):
        def set_stretch(self, stretch):
            super().set_stretch(stretch)
            self.history.append(stretch)

    pricey = Recorded(every=10, cost=20.0)
    pricey.history = []
    simulate({"pricey": pricey}, 1000, total=1000, min_measurements=4)
    # would need 64x; the ceiling keeps 4 measurements within reach. It can afford only 2 (at 401 and
    # 801, 0.05 * 400 steps each): behind,
    # it is due more often late in the run (every (steps left) / (measurements missing))
    assert pricey.history[0] == 16.0 and max(pricey.history) == 16.0
    assert pricey.steps == [401, 801] and pricey.stretch < 16.0


def test_a_cadence_slower_than_min_measurements_allows_is_sped_up():
    class LogSpaced(Check):  # log-spaced: the period grows with the step (4 points per decade)
        def period(self, step):
            return max(1.0, step * math.log(10) / 4)

        def wants(self, step):
            density = 4 / self.stretch
            return self.pending or step == 1 or math.floor(density * math.log10(step)) > math.floor(
                density * math.log10(step - 1))

    log = LogSpaced(every=1, cost=0.5)
    simulate({"log": log}, 1000, total=1000, min_measurements=4)
    # at step 1000 the base period is 576 steps, 2.3x the 250 that 4 measurements in 1000 steps need
    assert log.stretch == 0.25 and len([s for s in log.steps if s > 250]) >= 3


def test_near_an_event_a_diagnostic_gets_more_of_the_budget():
    calm = Check(every=32, cost=0.5, metrics={"eos_ratio": 0.1})
    edgy = Check(every=32, cost=0.5, metrics={"eos_ratio": 0.9})
    simulate({"calm": calm}, 320, budget=0.5)
    simulate({"edgy": edgy}, 320, budget=0.5)
    assert calm.stretch == 1.0 and edgy.stretch == 0.25  # tighten=4: up to 4x its base cadence
    assert len(edgy.steps) >= 3 * len(calm.steps)


def test_measurements_that_are_not_deferrable_are_always_admitted():
    even = Check(every=5, cost=0.02, deferrable=False)  # 0.004 s per step of the 0.01 s available
    controller, _ = simulate({"even": even}, 100, budget=0.01)
    assert even.steps == [1] + list(range(5, 101, 5))  # at step 1 too, before any allowance was saved
    costly = Check(every=5, cost=1.0, deferrable=False)  # 0.2 s per step: slowed down 32x, evenly spaced
    simulate({"costly": costly}, 400, budget=0.01)
    assert costly.stretch == 32.0 and costly.steps == [1, 160, 320]


def test_under_ddp_the_decisions_come_from_averaged_inputs_and_only_at_refreshes():
    clock = Clock()
    check = Check(every=1, cost=1.0)
    controller = BudgetController(0.5, clock=clock)
    controller.start(0, math.inf, {"check": check})
    calls = []

    def reduce(t):  # another rank spent twice as long, three times as much of it outside measurements
        calls.append(t.clone())
        other = t.clone()
        other[0] = 2 * t[0]
        other[2] = 3 * t[2]
        return (t + other) / 2

    clock.now = 10.0
    assert controller.plan(3, {"check": check}, reduce=reduce) == []  # not a refresh: no collective, no admission
    assert calls == []
    clock.now = 20.0
    controller.charge(4.0)
    assert controller.plan(SYNC_EVERY, {"check": check}, reduce=reduce) == ["check"]
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    # averaged: 6 s spent of 0.5 * 16 s allowed, and one step (16 s / 15 steps) admitted (its prior)
    assert controller.allowance.left == pytest.approx(0.5 * 16 - 6 - 16 / 15)
    assert controller.next_admission(SYNC_EVERY + 1, synced=True) == 2 * SYNC_EVERY
    # the saving rate too: 8 s of spending outside measurements (averaged) in 16 s leaves the floor, a tenth
    # of the budget (this rank's own 4 s would leave 0.25: the ranks would decide apart)
    assert controller.saving_rate() == pytest.approx(0.05)
    # what each rank learnt of the costs is averaged too (seconds per measurement, and per expected step)
    controller.costs, controller.rates = {"check": 1.0}, {"check": 0.25}
    controller.aftermath_seconds, controller._aftermaths = 0.2, 2  # and the steps after its measurements

    def reduce_learnt(t):
        other = t.clone()
        other[3:6] = t[3:6] * 3  # the other rank measured each at three times the cost
        return (t + other) / 2

    controller.plan(2 * SYNC_EVERY, {"check": check}, reduce=reduce_learnt)
    assert (controller.costs, controller.rates) == ({"check": 2.0}, {"check": 0.5})
    assert controller.expected("check", check) == pytest.approx(0.5 * check.prior + 0.2)  # 0.1 s here, 0.3 s there


def test_next_admission_waits_for_the_allowance_at_the_measured_step_time():
    clock = Clock()
    check = Check(every=1, cost=2.0)
    controller = BudgetController(0.05, clock=clock)
    controller.start(0, math.inf, {"check": check})
    clock.now = 9.0
    assert controller.plan(10, {"check": check}) == []  # 0.45 s saved, 2 s needed: 31 more steps of 1 s
    assert controller.next_admission(10) == 41
    assert controller.next_admission(40) == REFRESH_EVERY  # capped at the next refresh
    check.pending = True  # (else the refresh at step 64 stretches its cadence beyond it)
    clock.now = 37.8  # the refresh learns the step time: 0.6 s, so 2 steps cost 1.2 s of the 1.89 s saved
    assert controller.plan(REFRESH_EVERY, {"check": check}) == ["check"]


def test_a_measurement_held_back_for_the_laggard_is_planned_again_when_it_will_fit_not_every_step():
    # "cheap" (1 s, measured once) is due now, "dear" (10 s, never measured) at step 30: cheap waits until
    # the allowance pays for both, i.e. 11 s minus what dear's 20 steps to come will save (1 s)
    clock = Clock()
    cheap, dear = Check(every=1, cost=1.0), Check(every=30, cost=10.0)
    dear.next_wanted = lambda step: 30.0 if step <= 30 else math.inf
    dear.wants = lambda step: step == 30
    checks = {"cheap": cheap, "dear": dear}
    controller = BudgetController(0.05, clock=clock)
    controller.start(0, math.inf, checks)
    cheap.num_measurements = 1  # measured once in this fit
    clock.now = 9.0
    assert controller.plan(10, checks, wanting=["cheap"]) == []  # 0.45 s saved: cheap needs 1 + 9 s
    # (before, a measurement held back for the laggard was planned again at every step)
    assert controller._fits_at == pytest.approx(9.0 + (1.0 + 9.0 - 0.45) / 0.05)
    assert controller.next_admission(10) == REFRESH_EVERY  # past the next refresh: planned again there


def test_a_waiting_measurement_expects_the_allowance_to_grow_by_the_budget_less_dynscopes_own_spending():
    # 1 s steps whose hooks cost 0.03 s: of the 0.05 s a step saves, 0.02 s are left for measurements
    clock = Clock()
    check = Check(every=1000, cost=2.0)
    controller = BudgetController(0.05, clock=clock)
    controller.charge(0.5)  # set-up before the training: spent once, not per step
    controller.start(0, math.inf, {"check": check})
    for step in range(1, 11):
        controller.plan(step, {"check": check}, wanting=[])
        clock.now += 1.03
        controller.charge(0.03)
    clock.now += 0.3
    controller.charge(0.3)
    controller.piloted("check", None, seconds=0.3)  # a (failed) pilot: spent once, not per step
    check.pending = True  # (due now: still wanted when the refresh after the pilot asks again)
    assert controller.plan(11, {"check": check}, wanting=["check"]) == []  # 0.5 - 0.5 - 0.3 - 0.3 < 0 s left
    assert controller.saving_rate() == pytest.approx(0.02)  # (as of this plan)
    lacking = 2.0 - controller.allowance.left
    # at 0.02 s per step (at 0.05 s per step it came too soon, and was planned again and again)
    assert controller._fits_at - controller.training_seconds() == pytest.approx(lacking / 0.02)
    assert controller.next_admission(11) == REFRESH_EVERY
    controller.measured("check", 2.0, {})  # what measurements cost is not spending outside them
    check.pending = False
    clock.now += 2.0
    controller.charge(2.0)
    controller.plan(12, {"check": check}, wanting=["check"])
    assert controller.saving_rate() == pytest.approx(0.02)
    clock.now += 100.0
    controller.charge(100.0)  # more spent outside measurements than the budget: a tenth of it, not 0
    controller.plan(13, {"check": check}, wanting=["check"])
    assert controller.saving_rate() == pytest.approx(0.005)
    restored = BudgetController(0.05, clock=clock)
    restored.load_state_dict(controller.state_dict())
    assert restored.measuring_seconds == 2.0


def test_without_a_budget_everything_due_runs_and_the_accounts_are_kept():
    clock = Clock()
    check = Check(every=1, cost=1.0)
    controller = BudgetController(None, clock=clock)
    controller.start(0, 10, {"check": check})
    clock.now = 4.0
    controller.charge(1.0)
    assert controller.plan(2, {"check": check}) == ["check"]
    assert controller.overhead() == pytest.approx(1.0 / 3.0)
    assert controller.unmeasured({"check": check}) == []


def test_the_accounts_survive_a_checkpoint_and_start_afresh_on_reset():
    clock = Clock()
    controller = BudgetController(0.1, clock=clock)
    controller.start(0, 100, {})
    clock.now = 50.0
    controller.charge(5.0)
    controller.measured("a", 3.0, {"sc_fraction": 0.2})
    state = controller.state_dict()
    restored = BudgetController(0.1, clock=clock)
    restored.load_state_dict(state)
    assert (restored.seconds, restored.elapsed_before, restored.costs, restored.near) == (5.0, 50.0, {"a": 3.0}, {"a": True})
    restored.measured("a", 1.0, {})  # its second measurement (counted in the checkpoint) replaces the first
    assert restored.costs["a"] == 1.0
    restored.reset()
    assert (restored.seconds, restored.elapsed_before, restored.costs) == (0.0, 0.0, {})


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="budget"):
        BudgetController(1.5)
    with pytest.raises(ValueError, match="tighten"):
        BudgetController(0.1, tighten=0.5)
    with pytest.raises(ValueError, match="min_measurements"):
        BudgetController(0.1, min_measurements=-1)
    assert share_budget({"a": 1.0}, available=0.0) == {"a": 1024.0}


def test_a_waiting_measurement_is_planned_again_when_the_allowance_covers_it_and_the_plan_that_admits_it():
    # 1 s steps, budget 5%, a 1 s check due every step and plans that cost 0.04 s each (most of what
    # a step saves), run as DynScope does: no plan before next_admission. When the wait counted only
    # the check's shortfall, the plan that found it 0.05 s short came a step later, spent 0.04 s of
    # the step's 0.05 s and found it short again: a plan at every step, the savings eaten by plans
    clock, plan_cost = Clock(), 0.04
    check = Check(every=1, cost=1.0, prior=1.0)
    checks = {"check": check}
    controller = BudgetController(0.05, clock=clock)
    controller.start(0, 2000, checks)
    plans, quiet_until = 0, 0
    for step in range(1, 2001):
        if step < quiet_until and controller.quiet(step):
            clock.now += 1.0
            continue
        plans += 1
        admitted = controller.plan(step, checks)
        if check.wants(step) and not admitted:  # it waits: planned again when it may fit
            check.pending = True
            quiet_until = controller.next_admission(step)
        clock.now += plan_cost
        controller.charge(plan_cost)
        if not admitted:
            controller.planned(plan_cost)
        clock.now += 1.0
        if admitted:
            clock.now += 1.0
            controller.charge(1.0)
            check.num_measurements += 1
            check.pending = False
            controller.measured("check", 1.0, {})
            quiet_until = step + 1
        elif not check.pending:
            quiet_until = check.next_wanted(step + 1)
    # each measurement waits ~1 / 0.05 steps' savings and a plan or two: not ~100 plans in between
    assert plans <= 3 * check.num_measurements + 2000 // REFRESH_EVERY
    assert controller.overhead() <= 0.05 + 1e-9
    assert check.num_measurements >= 0.8 * (0.05 * 2000 - plans * plan_cost) / 1.0


def test_the_steps_after_a_measurement_are_charged_what_they_take_above_the_typical_step():
    # 1 s steps; a 2 s measurement after step 10 leaves the next three steps at 1.5, 1.2 and 1.0 s
    # (cold caches), of which 0.1 s was charged in the first (a plan): 0.4 + 0.2 + 0 s are the
    # measurement's. A 10 s step (a checkpoint written) counts one step at most; an epoch's end stops the timing
    clock = Clock()
    check = Check(every=1000, cost=2.0)
    controller = BudgetController(0.05, clock=clock)
    controller.start(0, math.inf, {"check": check})

    def step(seconds, charged=0.0):
        if controller.timing_steps:
            controller.step_started()
        clock.now += seconds
        controller.charge(charged)

    for _ in range(10):
        step(1.0)
    assert controller.plan(11, {"check": check}, wanting=["check"]) == []  # (learns the step time: 1 s)
    clock.now += 2.0
    controller.charge(2.0)
    controller.measured("check", 2.0, {})
    before = controller.seconds
    for seconds, charged in ((1.5, 0.1), (1.2, 0.0), (1.0, 0.0), (1.0, 0.0), (3.0, 0.0)):
        step(seconds, charged)
    assert not controller.timing_steps
    assert controller.aftermath_seconds == pytest.approx(0.4 + 0.2)  # (the 3 s step came after the three)
    assert controller.seconds - before == pytest.approx(0.1 + 0.6)
    controller.plan(17, {"check": check}, wanting=["check"])
    assert controller.expected("check", check) == pytest.approx(2.0 + 0.6)  # its next one, aftermath included
    # the aftermath is a measurement's cost, not spending per step (only the plan's 0.1 s is)
    assert controller.saving_rate() == pytest.approx(0.05 - 0.1 / controller.training_seconds())
    controller.measured("check", 2.0, {})
    step(1.0)
    step(10.0)  # a checkpoint: one step's extra at most
    step(1.0)
    controller.steps_interrupted()  # the epoch ends: validation and the next epoch's start are not the measurement's
    clock.now += 30.0
    assert controller.timing_steps  # (one more step to time)
    step(1.5)
    step(1.0)
    assert not controller.timing_steps
    typical = controller.step_seconds  # (the mean step as of the plan at step 17: a little above 1 s)
    assert 1.0 < typical < 1.1
    assert controller.aftermath_seconds == pytest.approx(0.6 + (1.0 - typical) + typical + (1.5 - typical))
    controller.measured("check", 2.0, {})  # the last measurement of the run: one step after it, then the end
    step(1.5)
    step(1.0)  # (its start times the 1.5 s step)
    controller.finish()
    assert not controller.timing_steps
    assert controller.aftermath_seconds == pytest.approx(0.6 + (2.5 - typical) + (1.5 - typical))
    controller.plan(40, {"check": check}, wanting=["check"])  # (expected() adds the mean as of the last plan)
    restored = BudgetController(0.05, clock=clock)
    restored.load_state_dict(controller.state_dict())
    assert restored.expected("check", check) == pytest.approx(controller.expected("check", check))


def test_a_pause_inside_one_measurement_does_not_make_the_diagnostic_look_many_times_dearer():
    _, check, controller = _one_second_steps(prior=1.0)
    for seconds in (1.0, 1.0, 1.0):
        controller.measured("check", seconds, {})
    controller.measured("check", 1.0 + 20.0, {})  # a 20 s pause (a full garbage collection) inside it
    assert controller.expected("check", check) == pytest.approx(0.5 * 1.0 + 0.5 * 4.0)  # learnt at most 4x
    assert controller.measuring_seconds == pytest.approx(24.0)  # charged in full
    for _ in range(3):  # a cost that really rose 8x is learnt within a few measurements
        controller.measured("check", 8.0, {})
    assert controller.expected("check", check) == pytest.approx(7.3125)  # 2.5 -> 5.25 -> 6.625 -> 7.3125
