"""The overhead budget: which diagnostics may measure now, and how often (no Lightning here).

A :class:`BudgetController` keeps the time spent measuring under a fraction (``budget``) of the
training time. Two rules, both in seconds of the injected ``clock``:

* the **allowance** (a token bucket): a due measurement runs only if the time spent so far plus
  its expected cost stays within ``budget`` times the training time so far; otherwise it waits
  (stays pending) until the allowance has grown. This keeps the overhead under the budget at every
  point of the run, the first measurements included. The allowance grows by the budget less what
  dynscope spends per step outside measurements (:meth:`BudgetController.saving_rate`): when that has
  happened, a waiting measurement is planned again;
* the **cadences** (water-filling): each diagnostic's schedule is stretched so that their combined
  cost per training step fits the budget, the cheap ones first, each getting an equal share (a
  diagnostic near an event gets ``tighten`` times the share and may run up to ``tighten`` times
  more often than its base cadence), but never beyond ``total steps / min_measurements`` when the
  run's length is known (sped up to it when the base cadence is slower: a log schedule late in the
  run, a run shorter than ``min_measurements`` base periods), nor, for one measured fewer than
  ``min_measurements`` times so far, beyond the steps left over the measurements missing. Stretches are powers of two (aligned cadences), rounded down, so that the
  allowance sets the pace and no share goes unused; a diagnostic that is never deferred (evenly
  spaced) is rounded up instead, and one that cannot fit before the end of the run gets no share.

**Costs.** Each diagnostic states what one measurement is expected to cost *in training steps*
(one optimizer step of the user's training: forward, backward and update on the full batch), from
what it does (HVP count and sub-batch, per-sample passes, points and directions):
``expected_cost(batch_size)``. Steps, not seconds, because the ratio carries over between
machines and models; the controller turns it into seconds with the measured seconds per training
step. From its first measurement on, a diagnostic's expected cost is what it measured: the first
measurement's seconds until the second (a first measurement often pays one-time work: building
kernels, a cold Lanczos start), then the second's, then a moving average. Where the caller says what
each measurement was expected to cost (``measured(..., expected_steps=)``), what is learnt is the
seconds per expected step, times the diagnostic's current ``expected_cost``: a diagnostic whose
measurements get cheaper in a way it knows of (curvature, once its trace turned out exact) is
expected to cost less from then on. The first measurement
may therefore cost more than expected: the allowance pays it back (later measurements wait). A
diagnostic that timed a pilot before its first measurement (:meth:`BudgetController.piloted`) is
expected at the pilot's seconds per expected step until then. A measurement also slows the few
training steps after it (cold caches and allocator): the caller times the ``AFTERMATH_STEPS``
steps after each one (:meth:`BudgetController.step_started`), what they took above the typical
step is charged, and the mean of it per measurement is added to every expected cost.

**Admission.** Among the due measurements, near an event first, then the diagnostic with the fewest
measurements, then the cheapest; the first that does not fit holds the queue (the others wait behind
it, saving up for it), unless it cannot fit before the end of the run at all: then it steps aside
and is named by :meth:`BudgetController.unmeasured`. A turn is kept for the laggard (the diagnostic
with the fewest measurements): one measured more often (near an event: ``tighten`` times as often)
is admitted only if the laggard's next measurement stays paid for when it comes due, so that cheap
diagnostics on short cadences, or near an event, do not spend what an expensive one saves up. A
diagnostic whose measurements decide a mitigation (``mitigating``) is never held back so.

The diagnostics are duck-typed (:class:`Budgeted`): the Lightning callbacks in
:mod:`dynscope.callbacks` are, and so are the plain objects in the tests.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Tuple

import torch

SYNC_EVERY = 16  # under DDP the accounts are averaged over ranks (and waiting measurements admitted) this often
REFRESH_EVERY = 4 * SYNC_EVERY  # the cadences are re-fitted to the budget this often, or after a measurement
AFTERMATH_STEPS = 3  # training steps after a measurement whose time above the typical step is charged to it
MAX_COST_JUMP = 4.0  # the most a learnt cost rises in one measurement (see BudgetController.measured)


class Budgeted(Protocol):
    """What the controller needs to know about a diagnostic."""

    deferrable: bool  # may run later than scheduled (False: evenly spaced, only ever slowed down)
    # optional, default False: its measurements decide a mitigation (never held back for the laggard)
    mitigating: bool
    num_measurements: int
    last_metrics: Dict[str, float]

    def expected_cost(self, batch_size: Optional[int] = None) -> float:
        """One measurement's expected cost in training steps (before any was timed)."""

    def period(self, step: int) -> Optional[float]:
        """Steps between two measurements at the base cadence around ``step``; ``None``: not on steps."""

    def wants(self, step: int) -> bool:
        """Whether a measurement is due (or still pending) after optimizer step ``step``."""

    def next_wanted(self, step: int) -> float:
        """The first step ``>= step`` at which :meth:`wants` may be true (``inf``: none on steps).
        Optional: a diagnostic without it is never kept a turn for (see ``BudgetController``)."""

    @property
    def stretch(self) -> float:
        """The factor the budget slows the cadence down by (1 at first)."""

    def set_stretch(self, stretch: float) -> None: ...


def share_budget(
    rates: Mapping[str, float],
    available: float,
    weights: Optional[Mapping[str, float]] = None,
    floors: Optional[Mapping[str, float]] = None,
    max_stretch: float = 1024.0,
) -> Dict[str, float]:
    """Stretch factors that fit the diagnostics' costs into ``available`` seconds per step.

    ``rates[name]`` is what a diagnostic costs per training step at its base cadence (seconds per
    measurement over steps between measurements). Water-filling: diagnostics in order of
    increasing ``rate / weight`` get ``weight``-proportional shares of what is left; one that
    needs less than its share runs at its floor (default 1: the base cadence) and leaves the rest to
    the others. Stretches are not rounded here.

    Example:
        >>> share_budget({"a": 1.0, "b": 0.1}, available=0.5)
        {'b': 1.0, 'a': 2.5}
        >>> share_budget({"a": 1.0, "b": 0.1}, available=2.1, weights={"a": 4.0}, floors={"a": 0.25})
        {'b': 1.0, 'a': 0.5}
    """
    weights = weights or {}
    floors = floors or {}
    order = sorted(rates, key=lambda n: rates[n] / weights.get(n, 1.0))
    left, unresolved = max(available, 0.0), set(order)
    stretches: Dict[str, float] = {}
    for name in order:
        share = left * weights.get(name, 1.0) / sum(weights.get(n, 1.0) for n in unresolved)
        needed = rates[name] / share if share > 0 else math.inf
        stretch = min(max(floors.get(name, 1.0), needed), max_stretch)
        stretches[name] = stretch
        left -= rates[name] / stretch
        unresolved.discard(name)
    return stretches


def power_of_two_at_least(value: float) -> float:
    """The smallest power of two >= ``value`` (powers below 1 too), so that cadences stay aligned.

    Example:
        >>> [power_of_two_at_least(v) for v in (0.25, 0.3, 1.0, 2.5, 1000.0)]
        [0.25, 0.5, 1.0, 4.0, 1024.0]
    """
    return 2.0 ** math.ceil(math.log2(value) - 1e-9)


def power_of_two_at_most(value: float) -> float:
    """The largest power of two <= ``value`` (powers below 1 too).

    Example:
        >>> [power_of_two_at_most(v) for v in (0.25, 0.3, 1.0, 2.5, 1000.0)]
        [0.25, 0.25, 1.0, 2.0, 512.0]
    """
    return 2.0 ** math.floor(math.log2(value) + 1e-9)


class Allowance:
    """The token bucket: ``budget * training seconds - dynscope seconds``, with reservations.

    Example:
        >>> a = Allowance(0.05)
        >>> a.update(dynscope_seconds=0.0, training_seconds=100.0)
        >>> a.admit(4.0), a.admit(2.0)  # 5 s to spend: the second no longer fits
        (True, False)
    """

    def __init__(self, budget: float) -> None:
        if not 0 < budget < 1:
            raise ValueError(f"budget is a fraction of training time in (0, 1), got {budget}")
        self.budget = budget
        self.left = 0.0

    def update(self, dynscope_seconds: float, training_seconds: float) -> None:
        self.left = self.budget * training_seconds - dynscope_seconds

    def admit(self, expected_seconds: float) -> bool:
        if expected_seconds > self.left:
            return False
        self.left -= expected_seconds
        return True


def near_event(metrics: Mapping[str, float], previous: Mapping[str, float]) -> bool:
    """Whether a diagnostic's latest values say something is about to happen (measure it more often).

    ``eos_ratio >= 0.8`` (approaching the edge of stability); the fraction of samples in softmax
    collapse (or at exactly zero loss) above 0 and rising (SC onset); variance ``amplification``
    above 1 and rising. Once a collapse or an amplification stops growing, the cadence relaxes.

    Example:
        >>> near_event({"eos_ratio": 0.85}, {}), near_event({"amplification": 2.0}, {"amplification": 3.0})
        (True, False)
        >>> near_event({"sc_fraction": 0.2}, {"sc_fraction": 0.1}), near_event({"sc_fraction": 0.9}, {"sc_fraction": 0.9})
        (True, False)
    """
    if metrics.get("eos_ratio", 0.0) >= 0.8:
        return True
    return any(_rising(metrics, previous, key, above) for key, above in
               (("sc_fraction", 0.0), ("zero_loss_fraction", 0.0), ("amplification", 1.0)))


def _rising(metrics: Mapping[str, float], previous: Mapping[str, float], key: str, above: float) -> bool:
    value, before = metrics.get(key), previous.get(key)
    return value is not None and value > above and (before is None or value > before)


class BudgetController:
    """Keeps the time spent measuring under ``budget`` times the training time (see the module docstring).

    The caller reports time (:meth:`charge`: seconds spent measuring or in its hooks) and
    measurements (:meth:`measured`), and asks at the start of each optimizer step which due
    measurements may run (:meth:`plan`). Training time is the clock's time since :meth:`start`
    (plus ``elapsed_before``, restored on resume) minus the time charged.

    Args:
        budget: the fraction of training time measurements may use, in (0, 1); ``None``: no limit
            (every due measurement is admitted; the accounts are still kept).
        clock: the seconds counter (default :func:`time.perf_counter`); tests inject a fake one.
        tighten: near an event a diagnostic gets this much more of the budget and may run this much
            more often than its base cadence.
        min_measurements: when the run's length is known, no cadence is stretched beyond
            ``total steps / min_measurements``, nor, while a diagnostic has fewer measurements, beyond
            ``steps left / measurements missing``.

    Example:
        >>> class Check:  # costs half a training step, due every 10 steps
        ...     deferrable, num_measurements, last_metrics, stretch = True, 0, {}, 1.0
        ...     def expected_cost(self, batch_size=None): return 0.5
        ...     def period(self, step): return 10.0
        ...     def wants(self, step): return step % round(10 * self.stretch) == 0
        ...     def set_stretch(self, s): self.stretch = s
        >>> now = [0.0]
        >>> budget = BudgetController(0.1, clock=lambda: now[0])
        >>> checks = {"check": Check()}
        >>> budget.start(step=0, total_steps=100, diagnostics=checks)
        >>> measured = []
        >>> for step in range(1, 101):
        ...     now[0] += 1.0  # a training step takes 1 s
        ...     if "check" in budget.plan(step, checks):
        ...         now[0] += 0.5; budget.charge(0.5)  # a measurement takes 0.5 s
        ...         checks["check"].num_measurements += 1; budget.measured("check", 0.5, {}); measured.append(step)
        >>> measured, budget.overhead() <= 0.1
        ([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], True)
    """

    def __init__(
        self,
        budget: Optional[float],
        *,
        clock: Optional[Callable[[], float]] = None,
        tighten: float = 4.0,
        min_measurements: int = 4,
    ) -> None:
        if tighten < 1:
            raise ValueError(f"tighten must be >= 1, got {tighten}")
        if min_measurements < 0:
            raise ValueError(f"min_measurements must be >= 0, got {min_measurements}")
        self.allowance = Allowance(budget) if budget is not None else None
        self.budget = budget
        self.clock: Callable[[], float] = clock or time.perf_counter
        self.tighten = float(tighten)
        self.min_measurements = min_measurements
        self.batch_size: Optional[int] = None  # for the diagnostics' expected costs, once known
        self.reset()

    # -- accounts ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start the accounts afresh: time spent, training time, costs, events (a new fit)."""
        self.seconds = 0.0  # charged: this fit and the ones before a resume
        self.measuring_seconds = 0.0  # the part of it spent in measurements (the rest: planning, pilots, hooks)
        self.one_time_seconds = 0.0  # the part spent once, not per step: before the training started, pilots
        self.elapsed_before = 0.0  # clock time of the fit before a resume
        self.costs: Dict[str, float] = {}  # seconds per measurement, once measured
        self.rates: Dict[str, float] = {}  # seconds per expected step, where the expected cost came with it
        self.measurements: Dict[str, int] = {}  # measurements timed in this fit (for the cost model)
        self.near: Dict[str, bool] = {}
        self.previous: Dict[str, Dict[str, float]] = {}
        self.step_seconds = 0.0  # training seconds per step, as of the last plan
        self._fit_start: Optional[float] = None
        self._unstarted = 0.0  # charged before the training started (set-up): inside the fit's clock time
        self._saving_rate = self.budget or 0.0  # (saving_rate: as of the last plan)
        self._start_step = 0
        self._total_steps = math.inf
        self._counts_at_start: Dict[str, int] = {}
        self._admitted: List[str] = []
        self.wanting: List[str] = []  # what wanted to measure at the last plan (after its refresh)
        self._measured = False  # since the last refresh of the cadences
        self._refresh_every = SYNC_EVERY  # (REFRESH_EVERY in one process, from the first plan on)
        self._fits_at = 0.0  # training seconds before which the head of the queue cannot fit
        self.plan_seconds = 0.0  # what one plan costs the caller (planned()), a moving average
        self.aftermath_seconds = 0.0  # charged: what the steps right after measurements took above the typical step
        self._aftermaths = 0  # measurement steps whose aftermath was charged
        self._aftermath_left = 0  # steps still to time after the last measurement
        self._aftermath_timed = 0  # steps timed after it so far
        self._aftermath_mark: Optional[Tuple[float, float]] = None  # (clock, seconds charged) at the last one
        self._aftermath_excess = 0.0
        self._aftermath_mean = 0.0  # charged per measurement, as of the last plan
        self._aside = False  # every measurement left waiting by the last plan cannot fit before the end
        self._train_at_end: Optional[float] = None

    def start(self, step: int, total_steps: float, diagnostics: Mapping[str, Budgeted]) -> None:
        """The training starts (or resumes) after ``step`` steps; ``total_steps`` of them in all (``inf``: unknown)."""
        self._fit_start = self.clock() - self._unstarted  # (else the set-up is charged but not timed)
        self._unstarted = 0.0
        self._start_step = step
        self._total_steps = total_steps - step if math.isfinite(total_steps) and total_steps > 0 else math.inf
        self._counts_at_start = {n: d.num_measurements for n, d in diagnostics.items()}
        self._train_at_end = None
        self.step_seconds = 0.0
        self.one_time_seconds = self.seconds - self.measuring_seconds  # the set-up (and, resumed, the fits before)

    def finish(self) -> None:
        """The training ended: :meth:`unmeasured` weighs the training time up to now (the steps timed
        after the last measurement, if any, are charged first)."""
        self._close_aftermath()
        self._train_at_end = self.training_seconds()

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` spent measuring (or in the caller's hooks) against the budget."""
        self.seconds += seconds
        if self._fit_start is None:
            self._unstarted += seconds

    def training_seconds(self) -> float:
        """Clock time of the fit so far (resumes included) minus the time charged."""
        if self._fit_start is None:
            return 0.0
        return max(self.elapsed_before + self.clock() - self._fit_start - self.seconds, 0.0)

    def elapsed(self) -> float:
        """Clock time of the fit so far, resumes included (for checkpoints)."""
        return self.elapsed_before + (self.clock() - self._fit_start if self._fit_start is not None else 0.0)

    def overhead(self) -> float:
        """Time charged as a fraction of the training time (``nan`` before any training)."""
        train = self.training_seconds()
        return self.seconds / train if train > 0 else math.nan

    # -- the cost model ------------------------------------------------------------------------------
    def expected(self, name: str, diagnostic: Budgeted, steps: Optional[float] = None) -> float:
        """Seconds one measurement of ``name`` is expected to cost (``inf`` before a step was timed);
        ``steps``: what the diagnostic states it costs, if not its ``expected_cost`` now (one it
        stated before a measurement, say)."""
        stated = float(diagnostic.expected_cost(self.batch_size) if steps is None else steps)
        if name in self.rates:
            cost = self.rates[name] * stated
        elif name in self.costs:
            cost = self.costs[name]
        elif self.step_seconds <= 0:  # the prior in steps means nothing before a step was timed
            return math.inf
        else:
            cost = stated * self.step_seconds * self.calibration()
        return cost + self._aftermath_mean

    def next_in_line(self, names: Iterable[str], diagnostics: Mapping[str, Budgeted]) -> Optional[str]:
        """Which of ``names`` the queue of :meth:`plan` puts first: near an event first, then the
        fewest measurements, then the cheapest (``None`` for none).

        Example:
            >>> class Check:
            ...     def __init__(self, steps, count): self.steps, self.num_measurements = steps, count
            ...     def expected_cost(self, batch_size=None): return self.steps
            >>> checks = {"dear": Check(20.0, 0), "cheap": Check(1.0, 0), "done": Check(0.5, 3)}
            >>> budget = BudgetController(0.05)
            >>> budget.step_seconds = 1.0  # (what plan() measures once a training step has run)
            >>> budget.next_in_line(checks, checks), budget.next_in_line(["dear", "done"], checks)
            ('cheap', 'dear')
        """
        return min(names, key=lambda n: self._queue_key(n, diagnostics), default=None)

    def _queue_key(self, name: str, diagnostics: Mapping[str, Budgeted]) -> Tuple[bool, int, float]:
        return not self.near.get(name, False), diagnostics[name].num_measurements, self.expected(name, diagnostics[name])

    def calibration(self) -> float:
        """What the priors measured so far turned out to be worth: the geometric mean, over the
        diagnostics measured with an ``expected_steps``, of the training steps one expected step
        cost (within ``[1/4, 1]``; 1 before any). A diagnostic not yet measured is expected at its
        prior times this: the priors share their unit, a training step, and what makes it cheap
        next to the measurements (a tiny model whose step is mostly the loop's own overhead, say)
        errs the same way for all of them. On the digits MLP the gradient noise and the linear regions
        cost 0.5-0.7x their priors, curvature 0.35x. Never above 1: what makes one diagnostic dearer
        than it stated (a first measurement's one-time work, a prior of its own that is low) says
        nothing of the others, and one expected too dear waits for nothing: softmax collapse at 2-4
        times its stated step on the digits MLP priced the gradient noise (0.5x its prior there) out
        of a 300-step run. One expected too cheap costs once what the allowance then pays back.
        """
        measured = [rate for name, rate in self.rates.items() if self.measurements.get(name, 0)]
        if not measured or self.step_seconds <= 0:
            return 1.0
        logs = [math.log(max(rate / self.step_seconds, 1e-12)) for rate in measured]
        return min(max(math.exp(sum(logs) / len(logs)), 0.25), 1.0)

    def saving_rate(self) -> float:
        """Seconds the allowance grows by per training second: the budget less what dynscope spends
        per step outside measurements (planning, per-step hooks, logging; not the one-time set-up and
        pilots) per training second so far, at least a tenth of the budget. On a small model whose
        step is mostly Lightning's own loop that spending is a good part of the budget (the digits
        MLP: about half of it): a measurement waiting for the allowance to grow by the whole budget
        was planned again at every step, each plan spending more of what it waited for, and a turn
        kept for the laggard at the whole budget's savings was short when it came due. As of the last
        :meth:`plan`, from the numbers it used: under DDP the ranks' averages, so every rank decides alike."""
        return self._saving_rate

    def piloted(self, name: str, seconds_per_step: Optional[float], seconds: float = 0.0) -> None:
        """Before its first measurement, ``name`` timed a pilot, which took ``seconds``: one of its
        expected steps costs ``seconds_per_step`` (``None``: the pilot failed), its prior times this
        until a measurement replaces it. A pilot does not enter :meth:`calibration`, which is what
        measurements taught about the priors, nor the per-step spending of :meth:`saving_rate`."""
        self.one_time_seconds += max(seconds, 0.0)
        self._measured = True  # the next plan refreshes, as after a measurement (on every rank: each ran its pilot)
        if seconds_per_step is None or not (seconds_per_step > 0 and math.isfinite(seconds_per_step)):
            return
        if name not in self.rates:
            self.rates[name] = seconds_per_step

    def planned(self, seconds: float) -> None:
        """A plan (with the caller's work around it) took ``seconds``: a measurement left waiting is
        planned again when the allowance covers it *and* the plan that admits it. Without this, a
        measurement a fraction of a plan's cost short of fitting was planned again at the next step,
        each plan spending what the step saved: on the 85k MLP with collapse expected at 1.0 steps and
        0.95 saved, DynScope planned at nearly every step from step 54 on, its savings fell from 0.045
        to 0.019 steps per step by step 128, and curvature was never measured in 1,000 steps."""
        if seconds > 0 and math.isfinite(seconds):
            self.plan_seconds = seconds if self.plan_seconds <= 0 else 0.75 * self.plan_seconds + 0.25 * seconds

    def measured(self, name: str, seconds: float, metrics: Mapping[str, float],
                 expected_steps: Optional[float] = None) -> None:
        """A measurement of ``name`` took ``seconds`` and returned ``metrics``: learn its cost and events.

        ``expected_steps``: what the diagnostic expected this measurement to cost (its
        ``expected_cost`` just before it). Then the controller learns seconds per expected step, and
        the next measurement is expected to cost that times the diagnostic's new ``expected_cost``:
        a diagnostic whose first measurement is known to cost more (a cold start) says so, and its
        later ones are not expected to cost as much.

        What it learns rises at most ``MAX_COST_JUMP`` times per measurement (all ``seconds`` are
        charged): a full garbage collection that lands in a measurement (0.2 s on the heap torch
        and Lightning fill, 16x a curvature measurement of the 85k MLP) would otherwise make the
        diagnostic wait that many times longer for its next turns.
        """
        count = self.measurements.get(name, 0) + 1
        self.measurements[name] = count
        self.measuring_seconds += seconds

        def learn(store: Dict[str, float], value: float) -> None:  # the second replaces the first (one-time work)
            if store.get(name, 0.0) > 0:  # a pause from outside (a full garbage collection) is not its cost
                value = min(value, MAX_COST_JUMP * store[name])
            store[name] = value if count <= 2 or name not in store else 0.5 * store[name] + 0.5 * value

        learn(self.costs, seconds)
        if expected_steps is not None and expected_steps > 0 and math.isfinite(expected_steps):
            learn(self.rates, seconds / expected_steps)
        self.near[name] = near_event(metrics, self.previous.get(name, {}))
        self.previous[name] = dict(metrics)
        self._measured = True
        self._close_aftermath()  # (the one before, if cut short; several measurements in one step share one)
        self._aftermath_left = AFTERMATH_STEPS

    @property
    def timing_steps(self) -> bool:
        """Whether the caller should call :meth:`step_started` at the start of the next training step."""
        return self._aftermath_left > 0

    def step_started(self) -> None:
        """A training step starts (needed while :attr:`timing_steps`): the ``AFTERMATH_STEPS`` steps after
        a measurement are timed, and what they took above the typical training step (less what was
        charged in them) is charged to the measurement, then expected with every later one. A
        measurement leaves the caches and the allocator cold: on the 85k MLP the next step ran
        10-50% slower than the median (curvature 20-90%), the two after it 3-20%, in all about 0.3-0.6
        steps per measurement that the account did not see (the wall time ran 1-2.7% above it).

        Example:
            >>> now = [0.0]
            >>> budget = BudgetController(0.1, clock=lambda: now[0])
            >>> budget.start(step=0, total_steps=100, diagnostics={})
            >>> now[0] = 63.0; _ = budget.plan(64, {})  # (a refresh) 63 steps of 1 s: the typical step
            >>> budget.measured("check", 0.0, {})
            >>> for seconds in (1.5, 1.2, 1.0, 1.0):  # the three steps after it, then one more start
            ...     budget.step_started(); now[0] += seconds
            >>> round(budget.aftermath_seconds, 6), budget.timing_steps  # 0.5 + 0.2 + 0 charged
            (0.7, False)
        """
        if self._aftermath_left <= 0:
            return
        now, seconds = self.clock(), self.seconds
        if self._aftermath_mark is not None:
            took = (now - self._aftermath_mark[0]) - (seconds - self._aftermath_mark[1])
            # at most a step more: a checkpoint written or data loaded in the step is not the measurement's
            self._aftermath_excess += min(took - self.step_seconds, self.step_seconds) if self.step_seconds > 0 else 0.0
            self._aftermath_left -= 1
            self._aftermath_timed += 1
        self._aftermath_mark = (now, seconds)
        if self._aftermath_left == 0:
            self._close_aftermath()

    def steps_interrupted(self) -> None:
        """The training steps stop being consecutive (an epoch ends, validation runs): the step that
        spans the gap is not timed; the timing goes on from the next one."""
        self._aftermath_mark = None

    def _own_aftermath_mean(self) -> float:
        """Seconds charged per measurement for the steps after it, from this process's accounts."""
        return self.aftermath_seconds / self._aftermaths if self._aftermaths else 0.0

    def _close_aftermath(self) -> None:
        if self._aftermath_timed:
            extra = max(self._aftermath_excess, 0.0)
            self.charge(extra)
            self.measuring_seconds += extra  # (a measurement's cost, not spending per step)
            self.aftermath_seconds += extra
            self._aftermaths += 1
        self._aftermath_left, self._aftermath_timed, self._aftermath_mark, self._aftermath_excess = 0, 0, None, 0.0

    # -- the plan ------------------------------------------------------------------------------------
    def plan(
        self,
        step: int,
        diagnostics: Mapping[str, Budgeted],
        wanting: Optional[Iterable[str]] = None,
        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> List[str]:
        """At the start of optimizer step ``step``: refresh the cadences, return the admitted measurements.

        ``wanting`` are the diagnostics that want to measure after this step (default: asked with
        ``wants(step)``); they are asked again after a refresh of the cadences. Measurements that
        are not deferrable are always admitted. The accounts are refreshed every ``REFRESH_EVERY``
        steps (under DDP every ``SYNC_EVERY``) and after each measurement; the cadences every
        ``REFRESH_EVERY`` steps and after each measurement. ``reduce`` (under DDP: the mean over
        ranks of a float64 tensor) makes every rank take the same decisions: the inputs are averaged
        first, and deferrable measurements are admitted only at refreshes, so that a pending
        measurement does not cost a collective every step.
        """
        names = list(diagnostics)
        wanting = [n for n in names if diagnostics[n].wants(step)] if wanting is None else list(wanting)
        self.wanting = wanting
        if self.allowance is None:
            self._admitted = wanting
            return list(wanting)
        # in one process a waiting measurement is admitted when next_admission says; under DDP only here
        self._refresh_every = SYNC_EVERY if reduce is not None else REFRESH_EVERY
        refresh = step % self._refresh_every == 0 or self._measured
        waiting = reduce is None and self.training_seconds() < self._fits_at  # nothing pending fits yet
        if not refresh and (not wanting or reduce is not None or waiting):
            self._admitted = [n for n in wanting if not diagnostics[n].deferrable]
            return self._admitted
        seconds, training = self.seconds, self.training_seconds()
        per_step_spending = self.seconds - self.measuring_seconds - self.one_time_seconds
        aftermath = self._own_aftermath_mean()
        if reduce is not None:  # the same numbers on every rank, so the same decisions
            k = len(names)
            costs = [self.costs.get(n, -1.0) for n in names]
            rates = [self.rates.get(n, -1.0) for n in names]
            near = [float(self.near.get(n, False)) for n in names]
            synced = reduce(torch.tensor([seconds, training, per_step_spending, aftermath, *costs, *rates, *near],
                                         dtype=torch.float64)).tolist()
            seconds, training, per_step_spending, aftermath = synced[:4]
            costs, rates, near = synced[4 : 4 + k], synced[4 + k : 4 + 2 * k], synced[4 + 2 * k :]
            self.costs = {n: c for n, c in zip(names, costs) if c >= 0}
            self.rates = {n: r for n, r in zip(names, rates) if r >= 0}
            self.near = {n: v > 0 for n, v in zip(names, near)}
        self.step_seconds = training / max(step - 1 - self._start_step, 1)
        self._aftermath_mean = aftermath  # (expected() adds it: under DDP the ranks' mean, as for the costs)
        self.allowance.update(seconds, training)
        spent = max(per_step_spending / training if training > 0 else 0.0, 0.0)
        self._saving_rate = max(self.allowance.budget - spent, 0.1 * self.allowance.budget)
        if refresh and (self._measured or step % REFRESH_EVERY == 0):
            self._measured = False
            self._restretch(step, diagnostics)
            wanting = self.wanting = [n for n in names if diagnostics[n].wants(step)]
        # Near an event first, then the fewest measurements, then the cheapest. The first deferrable
        # one that does not fit holds the queue (the others save up for it), unless it cannot fit
        # before the end of the run: then it steps aside.
        wanting.sort(key=lambda n: self._queue_key(n, diagnostics))
        self._admitted, head = [], None
        reachable = self._reachable(step)
        laggard, reserve = self._reservation(step, diagnostics, wanting, reachable)
        waits: List[float] = []  # seconds of allowance each waiting measurement still lacks
        aside = unknown = False  # one that cannot fit before the end; one whose cost is not known yet
        for n in wanting:
            need = self.expected(n, diagnostics[n])
            if not diagnostics[n].deferrable:
                self._admitted.append(n)
            elif laggard is not None and self._ahead(n, laggard, diagnostics) and self.allowance.left - need < reserve:
                waits.append(need + reserve - self.allowance.left)  # ahead of the laggard: waits for its turn
            elif head is None and self.allowance.admit(need):
                self._admitted.append(n)
            elif head is None and need <= reachable:
                head = n
                waits.append(need - self.allowance.left)
            elif head is None:
                aside, unknown = True, unknown or not math.isfinite(need)
        # the training time at which the first waiting measurement will fit (an untimed first step, or
        # an expectation not yet known: plan again at the next step). When every one left waiting
        # cannot fit before the end of the run, none will until the next refresh re-estimates that:
        # planning at every step (as before) spent, on the digits MLP over 300 steps, the allowance
        # they waited for (262 plans in 300 steps, 17 of the 15 steps the budget saved)
        lacking = min(waits, default=math.nan) + self.plan_seconds
        self._fits_at = training + lacking / self.saving_rate() if math.isfinite(lacking) else 0.0
        self._aside = not math.isfinite(lacking) and aside and not unknown
        return list(self._admitted)

    def admitted(self, name: str) -> bool:
        """Whether the last :meth:`plan` admitted ``name``."""
        return name in self._admitted

    def quiet(self, step: int) -> bool:
        """Whether a step at which no diagnostic newly wants to measure needs no planning (no refresh due)."""
        return self.allowance is None or not (step % self._refresh_every == 0 or self._measured)

    def next_admission(self, step: int, synced: bool = False) -> int:
        """The first step after ``step`` at which a measurement left waiting by :meth:`plan` may be admitted.

        Without ``synced`` (one process): when the allowance will have grown enough for the head of the
        queue, at the training time per step measured so far (at most until the next refresh). Under
        DDP (``synced``) waiting measurements are admitted only at refreshes (the same step on every rank).
        """
        every = SYNC_EVERY if synced else REFRESH_EVERY
        refresh = (step // every + 1) * every
        if self.allowance is None:
            return step + 1
        if synced:
            return refresh
        if self._aside:  # nothing waiting can fit before the end: the next refresh looks again
            return refresh
        gap = self._fits_at - self.training_seconds()
        if gap <= 0 or self.step_seconds <= 0:
            return step + 1
        return int(min(step + max(1, math.ceil(gap / self.step_seconds)), refresh))

    def _count(self, name: str, diagnostics: Mapping[str, Budgeted]) -> int:
        """Measurements of ``name`` in this fit."""
        return diagnostics[name].num_measurements - self._counts_at_start.get(name, 0)

    def _ahead(self, name: str, laggard: str, diagnostics: Mapping[str, Budgeted]) -> bool:
        """Whether ``name`` is measured enough more often than ``laggard`` to wait for its turn: any
        more often, or near an event ``tighten`` times as often."""
        if getattr(diagnostics[name], "mitigating", False):
            return False  # a mitigation waiting for its trigger must not wait for a turn
        count, behind = self._count(name, diagnostics), self._count(laggard, diagnostics)
        if self.near.get(name, False):
            return count >= self.tighten * (behind + 1)
        return count > behind

    def _reservation(self, step: int, diagnostics: Mapping[str, Budgeted], wanting: List[str],
                     reachable: float) -> Tuple[Optional[str], float]:
        """The laggard, and the seconds of the allowance kept for its next measurement.

        The laggard is the deferrable diagnostic with the fewest measurements in this fit (then the
        dearest) among those due now or later that can fit before the end of the run. A diagnostic
        measured more often than the laggard is admitted only if it leaves the allowance enough to
        pay for the laggard when that comes due (what the allowance will have saved by then counts),
        near an event or not: otherwise cheap diagnostics on short cadences (or measured more often
        near an event) spend what an expensive one on a long cadence saves up, and it is measured
        once or twice in a run in which the others are measured many times.
        """
        if self.step_seconds <= 0:
            return None, 0.0
        end = self._start_step + self._total_steps
        best, best_key, best_need, best_due = None, None, 0.0, step
        for name, diagnostic in diagnostics.items():
            next_wanted = getattr(diagnostic, "next_wanted", None)
            if not diagnostic.deferrable or (name not in wanting and next_wanted is None):
                continue
            due = step if name in wanting else next_wanted(step + 1)
            need = self.expected(name, diagnostic)
            if not (math.isfinite(due) and due <= end and math.isfinite(need) and need <= reachable):
                continue
            key = (self._count(name, diagnostics), -need)
            if best_key is None or key < best_key:
                best, best_key, best_need, best_due = name, key, need, due
        if best is None:
            return None, 0.0
        saved = self.saving_rate() * self.step_seconds * max(best_due - step, 0)
        return best, best_need - saved

    def may_fit(self, name: str, diagnostic: Budgeted, step: int, optimism: float = 2.0) -> bool:
        """Whether one measurement of ``name`` could still fit before the end of the run were it
        ``optimism`` times cheaper than expected (as of the last :meth:`plan`: the same on every rank).
        A pilot that times a diagnostic which cannot fit even so is not worth its cost: on the 85k
        MLP over 300 steps curvature's pilot (3-4 of the 15 steps saved) ran for a measurement that
        never could.

        Example:
            >>> class Check:  # states 12 training steps a measurement
            ...     deferrable, num_measurements, last_metrics = True, 0, {}
            ...     def expected_cost(self, batch_size=None): return 12.0
            >>> now = [0.0]
            >>> budget = BudgetController(0.05, clock=lambda: now[0])
            >>> budget.start(step=0, total_steps=100, diagnostics={})
            >>> now[0] = 63.0; _ = budget.plan(64, {})  # (a refresh) 1 s steps, 0.05 s saved a step
            >>> # 5 s reachable by step 100 (3.15 saved, 37 steps of 0.05 to come): 12 s > 2 x 5 s
            >>> budget.may_fit("check", Check(), 64), budget.may_fit("check", Check(), 64, optimism=4.0)
            (False, True)
        """
        if self.allowance is None:
            return True
        return self.expected(name, diagnostic) <= optimism * self._reachable(step)

    def _reachable(self, step: int) -> float:
        """Seconds the allowance can still reach by the end of the run (``inf`` when its length is unknown)."""
        left = self._start_step + self._total_steps - (step - 1)
        if not math.isfinite(left) or self.step_seconds <= 0:
            return math.inf
        return self.allowance.left + self.saving_rate() * self.step_seconds * max(left, 0.0)

    def _restretch(self, step: int, diagnostics: Mapping[str, Budgeted]) -> None:
        if self.step_seconds <= 0:
            return
        rates, weights, floors, ceilings = {}, {}, {}, {}
        reachable = self._reachable(step)
        for name, diagnostic in diagnostics.items():
            period = diagnostic.period(step)
            expected = self.expected(name, diagnostic)
            if period is None or (diagnostic.deferrable and expected > reachable):
                continue  # at epoch ends, or cannot fit before the end of the run: no share of the budget
            rates[name] = expected / period
            near = self.near.get(name, False)
            weights[name] = self.tighten if near else 1.0
            floors[name] = 1.0 / self.tighten if near and diagnostic.deferrable else 1.0
            if diagnostic.deferrable and self.min_measurements and math.isfinite(self._total_steps):
                # at least min_measurements over the run (the allowance still caps the overhead); below 1
                # when the base cadence itself is slower (a log schedule late in the run, a short run).
                # One that is behind (a late first measurement, waiting for savings) is due often enough
                # for its missing ones to fit in what is left of the run, but not more often than its base
                # cadence for that reason alone
                span = self._total_steps / self.min_measurements
                missing = self.min_measurements - self._count(name, diagnostics)
                if missing > 0:
                    span = min(span, max((self._start_step + self._total_steps - step) / missing, period))
                ceilings[name] = span / period
        raw = share_budget(rates, self.allowance.budget * self.step_seconds, weights, floors)
        for name, stretch in raw.items():
            diagnostic = diagnostics[name]
            if diagnostic.deferrable:
                # rounded down: due a little more often than the share affords, so that the allowance,
                # not the rounding, sets the pace (rounded up, up to half the budget went unused)
                stretch = max(power_of_two_at_most(stretch), floors[name])
            else:
                stretch = power_of_two_at_least(stretch)  # never deferred: its cadence alone must fit
            if name in ceilings:
                stretch = min(stretch, power_of_two_at_most(ceilings[name]))
            if not diagnostic.deferrable:
                stretch = max(stretch, diagnostic.stretch)  # only ever slowed down (evenly spaced)
            if stretch != diagnostic.stretch:
                diagnostic.set_stretch(stretch)

    # -- the end of the run --------------------------------------------------------------------------
    def unmeasured(self, diagnostics: Mapping[str, Budgeted]) -> List[str]:
        """One line per step-scheduled diagnostic that made no measurement in this fit, saying why."""
        lines: List[str] = []
        if self.budget is None:
            return lines
        train = self._train_at_end if self._train_at_end is not None else self.training_seconds()
        per_step = self.step_seconds
        for name, diagnostic in diagnostics.items():
            if diagnostic.num_measurements > self._counts_at_start.get(name, 0) or diagnostic.period(1) is None:
                continue
            need = self.expected(name, diagnostic)
            steps = need / per_step if per_step > 0 else math.nan
            saved = self.budget * train / per_step if per_step > 0 else 0.0
            own = (self.seconds - self.measuring_seconds) / per_step if per_step > 0 else 0.0
            lines.append(
                f"dynscope DynScope: {name} was not measured in this run: one measurement is expected to cost "
                f"~{steps:.0f} training steps and budget={self.budget} saved up {saved:.0f} steps' worth over "
                f"the run, shared with the other diagnostics (dynscope's own set-up, planning and logging took "
                f"{own:.0f}); raise budget=, train longer or make it cheaper (fewer HVPs, probes or points: its "
                f"callback's arguments)"
            )
        return lines

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {
            "seconds": self.seconds,
            "measuring_seconds": self.measuring_seconds,
            "elapsed": self.elapsed(),
            "costs": dict(self.costs),
            "rates": dict(self.rates),
            "measurements": dict(self.measurements),
            "near": dict(self.near),
            "previous": {n: dict(m) for n, m in self.previous.items()},
            "aftermath_seconds": self.aftermath_seconds,
            "aftermaths": self._aftermaths,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.seconds = float(state.get("seconds", 0.0))
        self._unstarted = 0.0  # (the set-up charged before the restore is not in the restored seconds)
        self.measuring_seconds = float(state.get("measuring_seconds", self.seconds))  # (older checkpoints: all of it)
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.costs = dict(state.get("costs", {}))
        self.rates = dict(state.get("rates", {}))
        # a checkpoint from before the cost model counted measurements: its costs are warm ones
        self.measurements = dict(state.get("measurements", {n: 2 for n in self.costs}))
        self.near.update(state.get("near", {}))
        self.previous = {n: dict(m) for n, m in state.get("previous", {}).items()}
        self.aftermath_seconds = float(state.get("aftermath_seconds", 0.0))
        self._aftermaths = int(state.get("aftermaths", 0))
        self._aftermath_mean = self._own_aftermath_mean()
