"""DynScope: every dynscope diagnostic in one callback, kept under an overhead budget."""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils._pytree import tree_flatten

from ._lightning import CallbackBase, is_global_zero
from .amplification import AutoEMA, MetricSpec, VarianceAmplification
from .base import DiagnosticCallback
from .budget import Allowance, power_of_two_at_least, share_budget
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
    """What a first measurement is expected to cost, in training steps, before one has been timed.

    An HVP costs about 2.5 training steps on the full batch (``benchmarks/bench_curvature.py``),
    less on a sub-batch (a fifth of it is per-call overhead that does not shrink); the HVPs are
    the trace's, Lanczos' (counted at half its step limit) and two for the sharpness. Per-sample
    gradient moments cost a few steps; a collapse check is one forward pass; linear regions
    evaluate every point's cross-polytope (about two batches' forwards per step, measured on the
    benchmark CNN). After the first measurement DynScope uses measured costs instead. A diagnostic
    may declare its own prior as an ``expected_steps`` attribute.

    Example:
        >>> prior_steps(Curvature(num_matvecs=16, eigen_max_iter=30))
        82.5
        >>> prior_steps(Curvature(num_matvecs=8, eigen_max_iter=20, sub_batch=32), batch_size=128)
        20.0
    """
    declared = getattr(child, "expected_steps", None)
    if declared is not None:  # a diagnostic may declare its own prior
        return float(declared)
    if isinstance(child, Curvature):
        matvecs = child.num_matvecs + (child.eigen_max_iter / 2 if child.eigen else 0) + (2 if child.sharpness else 0)
        fraction = 1.0
        if child.sub_batch is not None and batch_size:
            fraction = 0.2 + 0.8 * min(1.0, child.sub_batch / batch_size)
        return 2.5 * matvecs * fraction
    if isinstance(child, GradientNoise):
        return 4.0
    if isinstance(child, LinearRegions):
        points = child.num_points + child.num_test_points + child.num_random_points
        per_batch = batch_size or 64
        return max(1.0, points * (2 * child.num_directions + 1) * len(child.radii) / (2 * per_batch))
    if isinstance(child, VarianceAmplification):
        return 3.0
    return 1.0


SYNC_EVERY = 16  # the cadences are refreshed (under DDP from inputs averaged over ranks) at least this often


def near_event(metrics: Dict[str, float], previous: Dict[str, float]) -> bool:
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


def _rising(metrics: Dict[str, float], previous: Dict[str, float], key: str, above: float) -> bool:
    value, before = metrics.get(key), previous.get(key)
    return value is not None and value > above and (before is None or value > before)


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
    the training time (wall time of the fit minus dynscope's): a due measurement runs only when the
    time saved up allows its expected cost (its last measured cost; before the first, an estimate in
    training steps: :func:`prior_steps`), otherwise it waits; and each diagnostic's cadence is
    stretched by a power of two so that their combined cost fits the budget, cheap ones first (see
    :mod:`dynscope.callbacks.budget`). Near an event (``eos_ratio`` approaching 1, SC onset,
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
            budget; before their first measurement each is expected to cost :func:`prior_steps`.
        mitigate: any of ``"stablemax"``, ``"orthograd"``, ``"ema"``.
        tighten: how much more budget share, and how much faster a cadence, near an event.
        mode: ``"eval"`` or ``"train"`` for the diagnostics that evaluate the loss.
        strict: re-raise errors (a diagnostic that does not apply, a failing measurement) instead
            of warning and going on.
        min_measurements: how many measurements each deferrable diagnostic should get over the
            run (when the trainer knows its length): its cadence is never stretched beyond
            ``total steps / min_measurements``, a due measurement of the diagnostic with the fewest
            measurements so far is admitted first and the others wait behind it, so expensive
            diagnostics are not crowded out by cheap ones. The budget still caps the overhead: a
            diagnostic that did not fit at all is named at the end of the fit, with the reason.
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
        self.min_measurements = min_measurements
        self.loss_fn = loss_fn
        self.mitigate = mitigate
        self.tighten = float(tighten)
        self.strict = strict
        self.allowance = Allowance(budget) if budget is not None else None
        self.budget = budget

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
        self._priors = {name: prior_steps(child) for name, child in built.items()}
        self.clock: Callable[[], float] = clock or time.perf_counter
        for child in built.values():
            child.clock = self.clock
            if self.allowance is not None:
                child.budget_gate = self._gate

        self.seconds = 0.0  # in dynscope's hooks, this fit and the ones before a resume
        self.elapsed_before = 0.0  # wall time of the fit before a resume
        self.costs: Dict[str, float] = {}  # seconds per measurement (EMA), once measured
        self.near: Dict[str, bool] = {name: False for name in built}
        self._fit_start: Optional[float] = None
        self._start_step = 0
        self._planned = -1
        self._admitted: List[str] = []
        self._active: List[DiagnosticCallback] = []  # the diagnostics with work in this optimizer step
        self._measured = False  # since the last refresh of the cadences
        self._logged_at = -(10**9)
        self._fits_at = 0.0  # training seconds before which no waiting measurement can be admitted
        self._counts: Dict[str, int] = {}
        self._counts_at_start: Dict[str, int] = {}
        self._spent: Dict[str, float] = {}
        self._step_seconds = 0.0
        self._previous: Dict[str, Dict[str, float]] = {}
        self._total_steps = math.inf  # the run's length, when the trainer knows it
        self._train_at_end: Optional[float] = None  # training seconds when the fit ended
        self._batch_size: Optional[int] = None
        self._reduce = None

    # -- the budget ---------------------------------------------------------------------------------
    def training_seconds(self) -> float:
        """Wall time of the fit so far (resumes included) minus the time spent in dynscope."""
        if self._fit_start is None:
            return 0.0
        return max(self.elapsed_before + self.clock() - self._fit_start - self.seconds, 0.0)

    def overhead(self) -> float:
        """Time in dynscope as a fraction of the training time (``nan`` before any training)."""
        train = self.training_seconds()
        return self.seconds / train if train > 0 else math.nan

    def _expected(self, name: str, step_seconds: float) -> float:
        if name in self.costs:
            return self.costs[name]
        # before any step has been timed the prior means nothing: the measurement waits for one
        return self._priors[name] * step_seconds if step_seconds > 0 else math.inf

    def _gate(self, child: DiagnosticCallback, step: int) -> bool:
        if step != self._planned:  # an epoch-end schedule: not deferred (its time still counts)
            return True
        return self._names[id(child)] in self._admitted

    def _plan(self, trainer, step: int, wanting: List[str]) -> List[str]:
        """At the first micro-batch of each optimizer step: refresh the cadences, admit due measurements.

        The cadences are refreshed every ``SYNC_EVERY`` steps and after each measurement. Under DDP
        the inputs are averaged over ranks first, and deferrable measurements are admitted only at
        those refreshes, so that a pending measurement does not cost a collective every step.
        Returns the diagnostics that want to measure after this step (after a refresh of the cadences).
        """
        refresh = step % SYNC_EVERY == 0 or self._measured
        reduce = self._reduce
        waiting = reduce is None and self.training_seconds() < self._fits_at  # nothing pending fits yet
        if not refresh and (not wanting or reduce is not None or waiting):
            self._admitted = [n for n in wanting if not self.callbacks[n].deferrable]
            return wanting
        names = list(self.callbacks)
        seconds, training = self.seconds, self.training_seconds()
        if reduce is not None:  # the same numbers on every rank, so the same decisions
            costs = [self.costs.get(n, -1.0) for n in names]
            near = [float(self.near.get(n, False)) for n in names]
            synced = reduce(torch.tensor([seconds, training, *costs, *near], dtype=torch.float64)).tolist()
            seconds, training = synced[:2]
            costs, near = synced[2 : 2 + len(names)], synced[2 + len(names) :]
            self.costs = {n: c for n, c in zip(names, costs) if c >= 0}
            self.near = {n: v > 0 for n, v in zip(names, near)}
        steps = max(step - 1 - self._start_step, 1)
        self._step_seconds = training / steps
        self.allowance.update(seconds, training)
        if refresh:
            self._measured = False
            self._restretch(step)
            wanting = [name for name, child in self.callbacks.items() if child.wants(step)]
        # Near an event first, then the diagnostic with the fewest measurements, then the cheapest. The
        # first deferrable one that does not fit holds the queue: the others wait behind it (saving
        # up for it) instead of spending the allowance it needs.
        wanting.sort(key=lambda n: (
            not self.near.get(n, False), self.callbacks[n].num_measurements, self._expected(n, self._step_seconds)
        ))
        self._admitted, head = [], None
        for n in wanting:
            if not self.callbacks[n].deferrable:
                self._admitted.append(n)
            elif head is None and self.allowance.admit(self._expected(n, self._step_seconds)):
                self._admitted.append(n)
            elif head is None:
                head = n
        # The training time at which the measurement at the head of the queue will fit the allowance.
        need = self._expected(head, self._step_seconds) if head is not None else None
        fits = need is not None and math.isfinite(need)  # an untimed first step: plan again at the next
        self._fits_at = training + (need - self.allowance.left) / self.allowance.budget if fits else 0.0
        return wanting

    def _restretch(self, step: int) -> None:
        if self._step_seconds <= 0:
            return
        rates, weights, floors, ceilings = {}, {}, {}, {}
        for name, child in self.callbacks.items():
            if child.schedule.at_epoch_end:
                continue
            period = _base_period(child, step)
            rates[name] = self._expected(name, self._step_seconds) / period
            near = self.near.get(name, False)
            weights[name] = self.tighten if near else 1.0
            floors[name] = 1.0 / self.tighten if near and child.deferrable else 1.0
            if child.deferrable and self.min_measurements and math.isfinite(self._total_steps):
                # at least min_measurements over the run (the allowance still caps the overhead)
                ceilings[name] = max(1.0, self._total_steps / self.min_measurements / period)
        raw = share_budget(rates, self.allowance.budget * self._step_seconds, weights, floors)
        for name, stretch in raw.items():
            child = self.callbacks[name]
            stretch = power_of_two_at_least(stretch)
            if name in ceilings:
                stretch = max(min(stretch, 2.0 ** math.floor(math.log2(ceilings[name]))), floors[name])
            if not child.deferrable:
                stretch = max(stretch, child.schedule.stretch)  # only ever slowed down (evenly spaced)
            if stretch != child.schedule.stretch:
                child.set_stretch(stretch)

    def _after_measurements(self, trainer, children: Optional[List[DiagnosticCallback]] = None) -> None:
        measured = False
        for name, child in self.callbacks.items():
            if children is not None and child not in children:
                continue
            count = child.num_measurements
            if count == self._counts.get(name, 0):
                continue
            measured = self._measured = True
            cost = child.seconds_spent - self._spent.get(name, 0.0)
            self.costs[name] = cost if name not in self.costs else 0.5 * self.costs[name] + 0.5 * cost
            self.near[name] = near_event(child.last_metrics, self._previous.get(name, {}))
            self._previous[name] = dict(child.last_metrics)
            self._counts[name] = count
            self._spent[name] = child.seconds_spent
        step = trainer.global_step
        if (measured and step - self._logged_at >= 10) or step - self._logged_at >= 50:
            self._log(trainer)

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
                try:
                    getattr(child, hook)(*args, **kwargs)
                    if child.disabled:  # it dropped itself (and said why): leave it out of the run
                        self.callbacks.pop(name, None)
                except Exception as error:  # noqa: BLE001 - a diagnostic must not end the user's run
                    mitigation = (name == "collapse" and "stablemax" in self.mitigate) or (
                        name == "gva" and "ema" in self.mitigate
                    )
                    if mitigation or (self.strict and not _does_not_apply(error)):
                        raise
                    self._drop(name, error)
        finally:
            self.seconds += self.clock() - start

    def _drop(self, name: str, error: BaseException) -> None:
        why = "does not apply to this model" if _does_not_apply(error) else "failed"
        warnings.warn(
            f"dynscope DynScope: {name} {why} and is left out of this run: {type(error).__name__}: {error}",
            RuntimeWarning, stacklevel=3,
        )
        self.callbacks.pop(name, None)

    # -- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._each("setup", trainer, pl_module, stage)
        if stage == "fit":
            # A new fit starts new accounts (a resume restores them after this, in load_state_dict).
            self.reset_budget()
            write_layout(trainer, ("overhead",))

    def reset_budget(self) -> None:
        """Start the budget's accounts afresh: time spent, training time, costs, stretches.

        Called at the start of every ``fit`` (before a checkpoint's state is restored), so that a
        DynScope reused for a second ``fit`` does not weigh the time spent in the first one against
        the training time of the second.
        """
        self.seconds = 0.0
        self.elapsed_before = 0.0
        self.costs = {}
        self.near = {name: False for name in self.callbacks}
        self._previous = {}
        self._fit_start = None
        self._planned = -1
        self._admitted = []
        self._active = []
        self._measured = False
        self._logged_at = -(10**9)
        self._fits_at = 0.0
        for child in self.callbacks.values():
            child.seconds_spent = 0.0
            child.set_stretch(1.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._reduce = mean_over_ranks(trainer)
        self._train_at_end = None
        start = steps_done(trainer, pl_module)
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - a loader without a length: the run's length is unknown
            total = math.inf
        self._total_steps = total - start if math.isfinite(total) and total > 0 else math.inf
        self._fit_start = self.clock()
        self._start_step = start
        self._step_seconds = 0.0
        self._counts = {n: c.num_measurements for n, c in self.callbacks.items()}
        self._counts_at_start = dict(self._counts)
        self._spent = {n: c.seconds_spent for n, c in self.callbacks.items()}
        self._each("on_train_start", trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        start = self.clock()
        step = steps_done(trainer, pl_module) + 1
        if step != self._planned:  # the first micro-batch of an optimizer step
            if self._batch_size is None:
                self._learn_batch_size(batch)
            wanting = [name for name, child in self.callbacks.items() if child.wants(step)]
            if self.allowance is not None:
                wanting = self._plan(trainer, step, wanting)
            self._planned = step
            # A pending measurement the budget did not admit has nothing to do in this step: skipped.
            planning = [
                c for n, c in self.callbacks.items()
                if not c.idle_between_measurements or (n in wanting and (
                    self.allowance is None or n in self._admitted or not c._pending))
            ]
            self.seconds += self.clock() - start
            if planning:
                self._each("on_train_batch_start", trainer, pl_module, batch, batch_idx, only=planning)
            # Diagnostics idle between measurements are not called again in a step without one.
            self._active = [c for c in planning if not c.idle_between_measurements or c.will_measure(step)]
            return
        self.seconds += self.clock() - start
        if self._active:
            self._each("on_train_batch_start", trainer, pl_module, batch, batch_idx, only=self._active)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._active:
            self._each("on_before_optimizer_step", trainer, pl_module, optimizer, only=self._active)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active:
            self._each("on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx, only=self._active)
            self._after_measurements(trainer, self._active)
        elif trainer.global_step - self._logged_at >= 50:
            start = self.clock()
            self._log(trainer)
            self.seconds += self.clock() - start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._each("on_train_epoch_end", trainer, pl_module)
        self._after_measurements(trainer)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._each("on_validation_epoch_start", trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._each("on_validation_epoch_end", trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._each("on_train_end", trainer, pl_module)
        self._log(trainer)
        self._train_at_end = self.training_seconds()
        if self.allowance is not None and is_global_zero(trainer):
            for line in self.unmeasured():
                warnings.warn(line, RuntimeWarning, stacklevel=2)

    def unmeasured(self) -> List[str]:
        """One line per diagnostic that made no measurement in this fit, saying why."""
        lines = []
        train = self._train_at_end if self._train_at_end is not None else self.training_seconds()
        for name, child in self.callbacks.items():
            if child.num_measurements > self._counts_at_start.get(name, 0) or child.disabled or child.schedule.at_epoch_end:
                continue
            need = self._expected(name, self._step_seconds)
            steps = need / self._step_seconds if self._step_seconds > 0 else math.nan
            lines.append(
                f"dynscope DynScope: {name} was not measured in this run: one measurement is expected to cost "
                f"~{steps:.0f} training steps and budget={self.budget} saved up "
                f"{self.budget * train / self._step_seconds if self._step_seconds > 0 else 0:.0f} steps' worth over "
                f"the run, shared with the other diagnostics; raise budget=, train longer or make it cheaper "
                f"(e.g. curvature={{'sub_batch': 16}})"
            )
        return lines

    def _learn_batch_size(self, batch) -> None:
        """Priors that depend on the batch size (sub-batch curvature, regions) are refined once it is known."""
        leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() >= 1]
        if leaves:
            self._batch_size = int(leaves[0].shape[0])
            self._priors = {name: prior_steps(child, self._batch_size) for name, child in self.callbacks.items()}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        self._each("on_save_checkpoint", trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        self._each("on_load_checkpoint", trainer, pl_module, checkpoint)

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        elapsed = self.elapsed_before + (self.clock() - self._fit_start if self._fit_start is not None else 0.0)
        return {
            "callbacks": {name: child.state_dict() for name, child in self.callbacks.items()},
            "seconds": self.seconds,
            "elapsed": elapsed,
            "costs": dict(self.costs),
            "near": dict(self.near),
            "previous": {n: dict(m) for n, m in self._previous.items()},
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for name, state in state_dict.get("callbacks", {}).items():
            if name in self.callbacks:
                self.callbacks[name].load_state_dict(state)
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.elapsed_before = float(state_dict.get("elapsed", 0.0))
        self.costs = dict(state_dict.get("costs", {}))
        self.near.update(state_dict.get("near", {}))
        self._previous = {n: dict(m) for n, m in state_dict.get("previous", {}).items()}


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


def _base_period(child: DiagnosticCallback, step: int) -> float:
    """Steps between two measurements at the child's base cadence, around ``step``."""
    schedule = child.schedule
    if schedule.kind == "log":
        return max(1.0, step * math.log(10) / schedule.points_per_decade)
    return float(getattr(child, "every_n_steps", schedule.every_n_steps))


