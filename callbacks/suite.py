"""DynScope: every dynscope diagnostic in one callback, kept under an overhead budget."""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils._pytree import tree_flatten

from dynscope.budget import SYNC_EVERY, Allowance, BudgetController, near_event  # noqa: F401 - public here too

from ._lightning import CallbackBase, is_global_zero
from .amplification import AutoEMA, MetricSpec, VarianceAmplification
from .base import DiagnosticCallback
from .collapse import AutoStableMax, SoftmaxCollapse
from .curvature import Curvature
from .dashboard import write_layout
from .distributed import mean_over_ranks
from .logging import PREFIX, log_scalars
from .noise import GradientNoise
from .protocol import LossProtocolError
from .regions import LinearRegions
from .schedule import steps_done

Options = Union[bool, Dict[str, Any]]
MITIGATIONS = ("stablemax", "orthograd", "ema")
LOG_EVERY = 200  # steps between two logs of the overhead when nothing was measured
LOG_AFTER_MEASUREMENT = 50  # at least this many steps between two logs of it after measurements (each costs writes)

# Base cadences of the suite (the budget stretches them); any of it can be overridden per diagnostic.
DEFAULTS: Dict[str, Dict[str, Any]] = {
    # tracked: warm-started Lanczos to 1% and a trace whose probes carry over (8 HVPs), on a fixed
    # measurement set (16 samples of the first batch) so that consecutive Hessians differ by the
    # training alone; 16 samples keep one measurement at a few training steps
    "curvature": dict(every_n_steps=50, method="tracked", num_matvecs=8, eigen_max_iter=20, sub_batch=16, eval_batches=1),
    "noise": dict(every_n_steps=25),
    "collapse": dict(every_n_steps=10),
    "regions": dict(
        schedule="log", points_per_decade=4, functional=True, num_directions=8, num_points=16, num_test_points=16,
        num_random_points=16,
    ),
    "gva": dict(every_n_steps=10, window=20),
}


def prior_steps(child: DiagnosticCallback, batch_size: Optional[int] = None) -> float:
    """What a first measurement of ``child`` is expected to cost, in training steps: ``child.expected_cost(batch_size)``.

    Kept for compatibility; each diagnostic states its own cost (:meth:`DiagnosticCallback.expected_cost`).

    Example:
        >>> prior_steps(Curvature(num_matvecs=8, eigen_max_iter=20, sub_batch=32), batch_size=128)
        18.0
    """
    return float(child.expected_cost(batch_size))



class DynScope(CallbackBase):
    """Every dynscope diagnostic in one callback, with an overhead budget.

    On by default, each with the cadence in :data:`DEFAULTS` (the budget stretches them):
    :class:`Curvature` (``dynscope/curvature/...``), :class:`GradientNoise` (``dynscope/noise/...``),
    :class:`SoftmaxCollapse` (``dynscope/collapse/...``) and :class:`LinearRegions`
    (``dynscope/regions/...``, for models with piecewise-linear activations); with ``metric=``
    also :class:`VarianceAmplification` (``dynscope/gva/...``). A diagnostic that does not apply to
    the model (no loss dynscope can use, a loss that is not per sample, outputs that are not class
    logits, no ReLU-type activations) is dropped with one warning; training goes on.

    Mitigations are opt-in: ``mitigate=("stablemax",)`` uses :class:`AutoStableMax` for the
    collapse checks (add ``"orthograd"`` to wrap the optimizer in OrthoGrad too), ``"ema"`` uses
    :class:`AutoEMA` for the variance amplification (needs ``metric``).

    **The budget.** ``budget=0.05`` keeps the time spent in dynscope (every hook, timed) under 5% of
    the training time (wall time of the fit minus dynscope's). The decisions are
    :class:`dynscope.budget.BudgetController`'s (no Lightning there; ``scope.controller``): a due
    measurement runs only when the time saved up allows its expected cost (what the diagnostic
    measured; before its first measurement, its own estimate in training steps:
    ``DiagnosticCallback.expected_cost``), otherwise it waits; and each diagnostic's cadence is
    stretched by a power of two so that their combined cost fits the budget, cheap ones first. Near an event (``eos_ratio`` approaching 1, SC onset,
    amplification rising: :func:`near_event`) a diagnostic gets ``tighten`` times the share and may
    run up to ``tighten`` times more often than its base cadence. Variance amplification keeps
    evenly spaced evaluations: it is never deferred, only slowed down by doubling (which starts a
    new window); epoch-end schedules are not deferred either. Expensive diagnostics may therefore
    run rarely, or not at all in a short run: ``budget=None`` runs every cadence as configured.
    Logged: ``dynscope/overhead`` (the fraction of training time spent in dynscope),
    ``dynscope/overhead/<diagnostic>`` and ``dynscope/overhead/stretch/<diagnostic>``. Under DDP the
    budget's inputs are averaged over ranks, so every rank measures at the same steps.

    Args:
        loss_fn: ``loss_fn(module(x), y)`` for ``(x, y)`` batches, unless the module defines
            ``dynscope_loss`` (see :mod:`dynscope.callbacks.protocol`).
        budget: fraction of training time dynscope may use, or ``None`` for no budget.
        curvature, noise, collapse, regions: ``False`` to leave a diagnostic out, or a dict of
            arguments for its callback (merged into :data:`DEFAULTS`).
        metric: the long-horizon metric for variance amplification (a callable ``metric(module)
            -> float`` or ``"package.module:function"``); ``None`` leaves it out.
        gva: arguments for :class:`VarianceAmplification` / :class:`AutoEMA`.
        extra: more diagnostics (``DiagnosticCallback`` instances, by name) to run under the same
            budget; before their first measurement each is expected to cost its ``expected_cost()``
            (training steps; one by default), or, if it has ``pilot(trainer, pl_module, batch, clock,
            batch_size)`` returning the clock's seconds per expected step, what that timed (once, when it
            is next in line: see :meth:`Curvature.pilot`). Every Lightning hook a diagnostic implements reaches it
            (``on_before_backward``, ``on_after_backward`` and ``on_before_zero_grad`` only in the steps it
            measures, unless it sets ``idle_between_measurements = False``).
        mitigate: any of ``"stablemax"``, ``"orthograd"``, ``"ema"``.
        tighten: how much more budget share, and how much faster a cadence, near an event.
        mode: ``"eval"`` or ``"train"`` for the diagnostics that evaluate the loss.
        strict: re-raise errors (a diagnostic that does not apply, a failing measurement) instead
            of warning and going on.
        min_measurements: how many measurements each deferrable diagnostic should get over the
            run (when the trainer knows its length): its cadence is never stretched beyond
            ``total steps / min_measurements`` (nor, while it has fewer, beyond the steps left over
            the measurements missing), a due measurement of the diagnostic with the fewest
            measurements so far is admitted first and the others wait behind it (unless it cannot
            fit before the end of the run), so expensive diagnostics are not crowded out by cheap
            ones. The budget still caps the overhead: a diagnostic that did not fit at all is named
            at the end of the fit, with the reason (:meth:`unmeasured`).
        clock: the seconds counter the budget runs on (default :func:`time.perf_counter`); shared
            with the diagnostics' cost accounting. Tests pass a fake clock to drive the budget
            independently of machine load.

    Example:
        >>> import pytorch_lightning as pl
        >>> import torch.nn.functional as F
        >>> from dynscope.callbacks import DynScope
        >>> scope = DynScope(loss_fn=F.cross_entropy, budget=0.05, mitigate=("stablemax",))
        >>> sorted(scope.callbacks)
        ['collapse', 'curvature', 'noise', 'regions']
        >>> trainer = pl.Trainer(callbacks=[scope], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        loss_fn: Optional[Callable] = None,
        *,
        budget: Optional[float] = 0.05,
        curvature: Options = True,
        noise: Options = True,
        collapse: Options = True,
        regions: Options = True,
        metric: Optional[MetricSpec] = None,
        gva: Optional[Dict[str, Any]] = None,
        extra: Optional[Dict[str, DiagnosticCallback]] = None,
        mitigate: Sequence[str] = (),
        tighten: float = 4.0,
        mode: str = "eval",
        strict: bool = False,
        clock: Optional[Callable[[], float]] = None,
        min_measurements: int = 4,
    ) -> None:
        mitigate = (mitigate,) if isinstance(mitigate, str) else tuple(mitigate)
        unknown = [m for m in mitigate if m not in MITIGATIONS]
        if unknown:
            raise ValueError(f"mitigate takes any of {MITIGATIONS}, got {unknown}")
        if "ema" in mitigate and metric is None:
            raise ValueError("mitigate=('ema',) needs metric=: the EMA is switched on by its variance amplification")
        if "orthograd" in mitigate and "stablemax" not in mitigate:
            raise ValueError("'orthograd' is applied with the StableMax switch: use mitigate=('stablemax', 'orthograd')")
        if tighten < 1:
            raise ValueError(f"tighten must be >= 1, got {tighten}")
        if min_measurements < 0:
            raise ValueError(f"min_measurements must be >= 0, got {min_measurements}")
        self.loss_fn = loss_fn
        self.mitigate = mitigate
        self.strict = strict
        self.budget = budget
        self.controller = BudgetController(budget, clock=clock, tighten=tighten, min_measurements=min_measurements)
        common = dict(mode=mode, strict=strict)
        built: Dict[str, DiagnosticCallback] = OrderedDict()
        if curvature is not False:
            built["curvature"] = Curvature(loss_fn=loss_fn, **common, **_options("curvature", curvature, Curvature))
        if noise is not False:
            built["noise"] = GradientNoise(loss_fn=loss_fn, **common, **_options("noise", noise, GradientNoise))
        if collapse is not False:
            kind = AutoStableMax if "stablemax" in mitigate else SoftmaxCollapse
            orthograd = {"orthograd": True} if "orthograd" in mitigate else {}
            built["collapse"] = kind(loss_fn=loss_fn, **common, **orthograd, **_options("collapse", collapse, kind))
        if regions is not False:
            built["regions"] = LinearRegions(strict=strict, **_options("regions", regions, LinearRegions))
        if metric is not None:
            kind = AutoEMA if "ema" in mitigate else VarianceAmplification
            built["gva"] = kind(metric, loss_fn=loss_fn, **common, **_options("gva", gva or {}, kind))
        for name, child in (extra or {}).items():
            if name in built or not isinstance(child, DiagnosticCallback):
                raise ValueError(f"extra takes new names for DiagnosticCallback instances, got {name!r}: {child!r}")
            built[name] = child
        self.callbacks = built
        self._names = {id(child): name for name, child in built.items()}
        self.clock: Callable[[], float] = self.controller.clock
        for child in built.values():
            child.clock = self.clock
            if budget is not None:
                child.budget_gate = self._gate
        self._hooks = _forwarded_hooks(built)
        self._planned = -1
        self._quiet_until = 0  # steps before this one need no planning: nothing due, no refresh
        self._active: List[DiagnosticCallback] = []  # the diagnostics with work in this optimizer step
        self._logged_at = -(10**9)
        self._counts: Dict[str, int] = {}
        self._spent: Dict[str, float] = {}  # hook seconds of each diagnostic at its last measurement
        self._expected_steps: Dict[str, float] = {}  # what each admitted measurement was expected to cost
        self._hook_seconds: Dict[str, float] = {}  # seconds in each diagnostic's hooks (all of them)
        self._reduce = None

    # -- the budget (dynscope.budget.BudgetController keeps the accounts and decides) ----------------------
    @property
    def allowance(self) -> Optional[Allowance]:
        return self.controller.allowance

    @property
    def min_measurements(self) -> int:
        return self.controller.min_measurements

    @property
    def tighten(self) -> float:
        return self.controller.tighten

    @property
    def seconds(self) -> float:
        """Seconds spent in dynscope's hooks, this fit and the ones before a resume."""
        return self.controller.seconds

    @seconds.setter
    def seconds(self, value: float) -> None:
        self.controller.seconds = value

    @property
    def elapsed_before(self) -> float:
        return self.controller.elapsed_before

    @property
    def costs(self) -> Dict[str, float]:
        """Seconds per measurement of each diagnostic, once measured."""
        return self.controller.costs

    @property
    def near(self) -> Dict[str, bool]:
        return self.controller.near

    def training_seconds(self) -> float:
        """Wall time of the fit so far (resumes included) minus the time spent in dynscope."""
        return self.controller.training_seconds()

    def overhead(self) -> float:
        """Time in dynscope as a fraction of the training time (``nan`` before any training)."""
        return self.controller.overhead()

    def unmeasured(self) -> List[str]:
        """One line per diagnostic that made no measurement in this fit, saying why."""
        live = {n: c for n, c in self.callbacks.items() if not c.disabled}
        return self.controller.unmeasured(live)

    def _gate(self, child: DiagnosticCallback, step: int) -> bool:
        name = self._names[id(child)]
        go = step != self._planned or self.controller.admitted(name)  # an epoch-end schedule: not deferred
        if go:  # what this measurement is expected to cost, for the cost model (it may differ the next time)
            self._expected_steps[name] = child.expected_cost(self.controller.batch_size)
        return go

    def _after_measurements(self, trainer, children: Optional[List[DiagnosticCallback]] = None) -> None:
        """Tell the controller what each diagnostic that measured spent and found; log the overhead
        now and then (0.2-0.3 ms a log). Charged to the budget."""
        start = self.clock()
        measured = False
        for name, child in self.callbacks.items():
            if children is not None and child not in children:
                continue
            count = child.num_measurements
            if count == self._counts.get(name, 0):
                continue
            measured = True
            # the cost of a measurement: everything the diagnostic did since the last one (snapshots
            # before the optimizer step and other per-step work included, not only its measure())
            spent = self._hook_seconds.get(name, 0.0)
            self.controller.measured(name, spent - self._spent.get(name, 0.0), child.last_metrics,
                                     expected_steps=self._expected_steps.pop(name, None))
            self._counts[name] = count
            self._spent[name] = spent
        step = trainer.global_step
        if (measured and step - self._logged_at >= LOG_AFTER_MEASUREMENT) or step - self._logged_at >= LOG_EVERY:
            self._log(trainer)
        self.controller.charge(self.clock() - start)

    def _log(self, trainer) -> None:
        train = self.training_seconds()
        if train <= 0:
            return
        self._logged_at = trainer.global_step
        scalars = {f"{PREFIX}/overhead": self.seconds / train}
        for name, child in self.callbacks.items():
            scalars[f"{PREFIX}/overhead/{name}"] = child.seconds_spent / train
            scalars[f"{PREFIX}/overhead/stretch/{name}"] = child.schedule.stretch
        log_scalars(trainer, scalars, trainer.global_step)


    # -- the children -------------------------------------------------------------------------------
    def _each(self, hook: str, *args, only: Optional[List[DiagnosticCallback]] = None, **kwargs) -> None:
        """Call ``hook`` on every diagnostic (or those in ``only``); one that raises is dropped with a
        warning (unless strict, or it is a mitigation that was asked for)."""
        start = self.clock()
        try:
            for name, child in list(self.callbacks.items()):
                if only is not None and child not in only:
                    continue
                before = self.clock()
                try:
                    getattr(child, hook)(*args, **kwargs)
                    if child.disabled:  # it dropped itself (and said why): leave it out of the run
                        self.callbacks.pop(name, None)
                except Exception as error:  # noqa: BLE001 - a diagnostic must not end the user's run
                    mitigation = (name == "collapse" and "stablemax" in self.mitigate) or (
                        name == "gva" and "ema" in self.mitigate
                    )
                    if hook != "on_exception" and (mitigation or (self.strict and not _does_not_apply(error))):
                        raise
                    self._drop(name, error)
                finally:
                    self._hook_seconds[name] = self._hook_seconds.get(name, 0.0) + self.clock() - before
        finally:
            self.controller.charge(self.clock() - start)

    def _drop(self, name: str, error: BaseException) -> None:
        why = "does not apply to this model" if _does_not_apply(error) else "failed"
        warnings.warn(
            f"dynscope DynScope: {name} {why} and is left out of this run: {type(error).__name__}: {error}",
            RuntimeWarning, stacklevel=3,
        )
        self.callbacks.pop(name, None)

    # -- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            # A new fit starts new accounts (a resume restores them after this, in load_state_dict),
            # before the set-up below is charged to them (it was reset away: 2-3 ms uncounted per fit)
            self.reset_budget()
        self._each("setup", trainer, pl_module, stage)
        if stage == "fit":
            start = self.clock()
            write_layout(trainer, ("overhead",))
            self.controller.charge(self.clock() - start)

    def reset_budget(self) -> None:
        """Start the budget's accounts afresh: time spent, training time, costs, stretches.

        Called at the start of every ``fit`` (before a checkpoint's state is restored), so that a
        DynScope reused for a second ``fit`` does not weigh the time spent in the first one against
        the training time of the second.
        """
        self.controller.reset()
        self._hook_seconds = {}
        self._spent = {}
        self._expected_steps = {}
        self._piloted: set = set()
        self._planned = -1
        self._quiet_until = 0
        self._active = []
        self._logged_at = -(10**9)
        for child in self.callbacks.values():
            child.seconds_spent = 0.0
            child.set_stretch(1.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._reduce = mean_over_ranks(trainer)
        start = steps_done(trainer, pl_module)
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - a loader without a length: the run's length is unknown
            total = math.inf
        self.controller.start(start, total, self.callbacks)
        self._counts = {n: c.num_measurements for n, c in self.callbacks.items()}
        self._spent = dict(self._hook_seconds)
        self._each("on_train_start", trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        start = self.clock()
        step = steps_done(trainer, pl_module) + 1
        if step != self._planned:  # the first micro-batch of an optimizer step
            self._planned = step
            if self.controller.timing_steps:  # the few steps after a measurement: their extra time is its
                self.controller.step_started()
            if step < self._quiet_until and self.controller.quiet(step):  # nothing due, nothing to refresh
                if self._active:  # (after a plan every diagnostic that is not idle is in it)
                    self._active = [c for c in self._active if not c.idle_between_measurements]
            else:
                self._plan(trainer, pl_module, batch, batch_idx, step, start)
                return
        self.controller.charge(self.clock() - start)
        if self._active:
            self._each("on_train_batch_start", trainer, pl_module, batch, batch_idx, only=self._active)

    def _plan(self, trainer, pl_module, batch, batch_idx, step: int, start: float) -> None:
        """The first micro-batch of a step that needs planning: ask the controller, call the diagnostics."""
        began, piloted = start, False
        if self.controller.batch_size is None:
            self._learn_batch_size(batch)
        wanting = [name for name, child in self.callbacks.items() if child.wants(step)]
        admitted = self.controller.plan(step, self.callbacks, wanting, reduce=self._reduce)
        if self.budget is not None and self.controller.step_seconds > 0 and self.controller.wanting:
            # the queue as planned, then once more with what a pilot timed (a refresh: the same on every rank)
            piloted = self._pilot(trainer, pl_module, batch, self.controller.wanting, step)
            if piloted:
                admitted = self.controller.plan(step, self.callbacks, wanting, reduce=self._reduce)
        wanting = self.controller.wanting
        budgeted = self.budget is not None
        # A pending measurement the budget did not admit has nothing to do in this step: skipped.
        planning = [
            c for n, c in self.callbacks.items()
            if not c.idle_between_measurements or (n in wanting and (not budgeted or n in admitted or not c._pending))
        ]
        self.controller.charge(self.clock() - start)
        if planning:
            self._each("on_train_batch_start", trainer, pl_module, batch, batch_idx, only=planning)
        # Diagnostics idle between measurements are not called again in a step without one.
        self._active = [c for c in planning if not c.idle_between_measurements or c.will_measure(step)]
        # The next step that needs planning: a schedule comes due, or a waiting measurement may fit.
        start = self.clock()
        waiting = [c for c in self.callbacks.values() if c._pending and not c.will_measure(step)]
        due = [c.next_wanted(step + 1) for c in self.callbacks.values() if c not in waiting]
        if waiting:
            due.append(self.controller.next_admission(step, synced=self._reduce is not None))
        self._quiet_until = min(due, default=math.inf)
        end = self.clock()
        self.controller.charge(end - start)
        if not admitted and not piloted:  # what planning again costs a measurement that waits
            self.controller.planned(end - began)

    def _pilot(self, trainer, pl_module, batch, wanting: List[str], step: int) -> bool:
        """Before its first measurement, a diagnostic that can time a pilot (:meth:`Curvature.pilot`)
        does so when it is next in line among the due ones (:meth:`BudgetController.next_in_line`, the
        budget's own queue order): the budget then expects what it costs on this model, not a guess, at the
        moment that decides whether it waits. Cheaper diagnostics measure first without waiting for
        it, and a short run does not pay for pilots of diagnostics it never reaches, nor of one that
        could not fit before its end at half its expected cost (:meth:`BudgetController.may_fit`). The pilot's time
        is charged to the budget with the plan's; a pilot that fails leaves the stated cost in place.
        Returns whether a pilot ran (the plan is then made again, with what it timed)."""
        controller = self.controller
        name = controller.next_in_line((n for n in wanting if n in self.callbacks and self.callbacks[n].deferrable),
                                       self.callbacks)
        if name is None:
            return False
        child = self.callbacks[name]
        pilot = getattr(child, "pilot", None)
        if pilot is None or name in self._piloted or name in controller.rates:
            return False
        if not controller.may_fit(name, child, step):  # out of reach even at half its expected cost
            return False
        before, rate = self.clock(), None
        try:
            rate = pilot(trainer, pl_module, batch, self.clock, controller.batch_size)
        except Exception:  # noqa: BLE001 - a pilot only informs the schedule; the measurement reports
            if self.strict:
                raise
            self._piloted.add(name)
        finally:  # (charged to the budget with the rest of the plan)
            spent = self.clock() - before
            child.seconds_spent += spent
            controller.piloted(name, rate, seconds=spent)
        if rate is not None:
            self._piloted.add(name)
        return True  # (whatever it gave: under DDP every rank then plans again, as the others do)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._active:
            self._each("on_before_optimizer_step", trainer, pl_module, optimizer, only=self._active)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active:
            self._each("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx, only=self._active)
            self._after_measurements(trainer, self._active)
        elif self._planned - self._logged_at >= LOG_EVERY:  # (the step number, without asking the trainer)
            start = self.clock()
            self._log(trainer)
            self.controller.charge(self.clock() - start)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.controller.steps_interrupted()  # (the next step comes after the epoch's end, maybe validation)
        self._each("on_train_epoch_end", trainer, pl_module)
        self._after_measurements(trainer)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.controller.steps_interrupted()
        self._each("on_validation_epoch_start", trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._each("on_validation_epoch_end", trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._each("on_train_end", trainer, pl_module)
        self._log(trainer)
        self.controller.finish()
        if self.budget is not None and is_global_zero(trainer):
            for line in self.unmeasured():
                warnings.warn(line, RuntimeWarning, stacklevel=2)

    def _learn_batch_size(self, batch) -> None:
        """Expected costs that depend on the batch size (sub-batch curvature, regions) use it once known."""
        leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() >= 1]
        if leaves:
            self.controller.batch_size = int(leaves[0].shape[0])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        self._each("on_save_checkpoint", trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        self._each("on_load_checkpoint", trainer, pl_module, checkpoint)

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"callbacks": {name: child.state_dict() for name, child in self.callbacks.items()},
                **self.controller.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for name, state in state_dict.get("callbacks", {}).items():
            if name in self.callbacks:
                self.callbacks[name].load_state_dict(state)
        self.controller.load_state_dict(state_dict)


# The other Lightning hooks go to the diagnostics that implement them (timed and guarded like the rest).
FORWARDED = (
    "on_fit_start", "on_fit_end", "teardown", "on_exception", "on_sanity_check_start", "on_sanity_check_end",
    "on_train_epoch_start", "on_validation_start", "on_validation_end", "on_validation_batch_start",
    "on_validation_batch_end", "on_test_start", "on_test_end", "on_test_epoch_start", "on_test_epoch_end",
    "on_test_batch_start", "on_test_batch_end", "on_predict_start", "on_predict_end", "on_predict_epoch_start",
    "on_predict_epoch_end", "on_predict_batch_start", "on_predict_batch_end", "on_before_backward",
    "on_after_backward", "on_before_zero_grad",
)


def _forwarded_hooks(children: Dict[str, DiagnosticCallback]) -> Dict[str, List[DiagnosticCallback]]:
    """For each forwarded hook, the diagnostics that implement it (the others are not called)."""
    return {hook: [c for c in children.values() if getattr(type(c), hook) is not getattr(CallbackBase, hook)]
            for hook in FORWARDED}


# Hooks of every training step: a diagnostic idle between measurements gets them only in a step it measures
# (each call costs the dispatch and the timing, ~5 us: 0.3% of a 2 ms step)
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_zero_grad")


def _forwarder(hook: str):
    def forward(self, *args, **kwargs) -> None:
        targets = self._hooks.get(hook)
        if targets and hook in STEP_HOOKS:
            targets = [c for c in targets if not getattr(c, "idle_between_measurements", False) or c in self._active]
        if targets:
            self._each(hook, *args, only=targets, **kwargs)

    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = f"``{hook}``, forwarded to the diagnostics that implement it."
    return forward


for _hook in FORWARDED:
    setattr(DynScope, _hook, _forwarder(_hook))


def _does_not_apply(error: BaseException) -> bool:
    """Errors that say a diagnostic cannot measure this model (rather than that it failed)."""
    return isinstance(error, (LossProtocolError, ValueError))


def _options(name: str, given: Options, kind: Optional[type] = None) -> Dict[str, Any]:
    if given is True:
        given = {}
    if not isinstance(given, dict):
        raise TypeError(f"{name} takes True, False or a dict of arguments for its callback, got {given!r}")
    if kind is not None:
        accepted = set(inspect.signature(kind.__init__).parameters) - {"self"}
        unknown = sorted(set(given) - accepted)
        if unknown:
            hint = ""
            if kind is VarianceAmplification and set(unknown) <= set(inspect.signature(AutoEMA.__init__).parameters):
                hint = ": they are options of the EMA mitigation (AutoEMA); add 'ema' to mitigate= to use them"
            elif kind is SoftmaxCollapse and set(unknown) <= set(inspect.signature(AutoStableMax.__init__).parameters):
                hint = ": they are options of the StableMax mitigation (AutoStableMax); add 'stablemax' to mitigate="
            raise ValueError(f"{name}= got unknown options {unknown} for {kind.__name__}{hint}")
    options = {**DEFAULTS[name], **given}
    if name == "curvature" and options.get("method") == "tracked" and not options.get("eigen", True):
        options["method"] = "hutchinson"  # the tracked trace reuses the lambda_max run the user turned off
    return options
