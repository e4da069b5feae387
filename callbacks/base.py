"""The machinery every dynscope diagnostic callback shares.

Scheduling, choosing the batch to measure on, building the objective through the loss protocol,
timing, logging on rank zero, and failure handling: a diagnostic that fails warns once and is
skipped for that step; a configuration problem that would fail at every step (the loss protocol:
:class:`~dynscope.callbacks.LossProtocolError`) is raised at ``setup`` where it can be seen there,
otherwise the diagnostic is dropped with one warning at its first measurement. The user's
training goes on (unless ``strict=True``). Under DDP the outcome of each measurement is agreed
across ranks (one small all-reduce at its end, and a failure flag in every reduction inside it),
so it is skipped, or the diagnostic dropped, on every rank or none (the rule is in
:mod:`dynscope.callbacks.distributed`). A ``torch.compile``'d module is measured through its
original code, leaving the compiled callables untouched (see :func:`eager`).

When: at the first micro-batch of each optimizer step (each training batch under manual
optimization: see :mod:`dynscope.callbacks.schedule`) the callback decides whether it measures
after that step (its schedule says so, or an earlier measurement is still pending, and a budget
gate, if :class:`~dynscope.callbacks.DynScope` set one, admits it). It then measures once, after
the optimizer stepped, on the step's micro-batches joined (gradient accumulation) or its batch.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from dynscope.objective import Objective

from ._lightning import CallbackBase
from .distributed import on_every_rank, unsupported_strategy
from .logging import log_scalars, tag
from .protocol import LossProtocolError, module_objective, quiet_logging
from .schedule import Schedule, ScheduleKind, steps_done


class DiagnosticCallback(CallbackBase):
    """Base class: subclasses set ``group`` and implement :meth:`measure`.

    Args:
        every_n_steps: period of the ``"steps"`` schedule (in optimizer steps).
        schedule: ``"steps"``, ``"log"`` (log-spaced steps) or ``"epoch"`` (each epoch's end).
        points_per_decade: density of the ``"log"`` schedule.
        loss_fn: ``loss_fn(outputs, targets)`` for ``(x, y)`` batches, when the module does not
            define ``dynscope_loss`` (see :mod:`dynscope.callbacks.protocol`).
        fixed_batch: measure on the first training batch seen, every time (comparable values
            across steps) instead of the current training batch.
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"``.
        strict: re-raise errors inside the diagnostic instead of warning once and skipping.
    """

    group = "diagnostic"
    needs_snapshot = False
    deferrable = True  # may run later than scheduled when a budget says so (False: evenly spaced)
    # The batch hooks do nothing in an optimizer step without a measurement (DynScope then skips
    # calling them); a subclass that keeps per-batch state sets this to False.
    idle_between_measurements = True

    def __init__(
        self,
        *,
        every_n_steps: int = 50,
        schedule: ScheduleKind = "steps",
        points_per_decade: int = 10,
        loss_fn: Optional[Callable] = None,
        fixed_batch: bool = False,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        self.schedule = Schedule(schedule, every_n_steps, points_per_decade)
        self.loss_fn = loss_fn
        self.fixed_batch = fixed_batch
        self.mode = mode
        self.strict = strict
        self.seconds_spent = 0.0
        self.num_measurements = 0
        self.last_metrics: Dict[str, float] = {}
        self._last_step = -1
        self._batch: Any = None
        self._warned: set = set()
        self._snapshot_step: Optional[int] = None
        self.disabled = False  # set when the strategy cannot be measured
        self._pending = False  # due, not yet measured (an overhead budget may defer a measurement)
        self._planned_step = -1  # the optimizer step planned for at its first micro-batch
        self._automatic = True  # automatic optimization (else steps are training batches: see .schedule)
        self._run_at: Optional[int] = None  # the optimizer step after which to measure
        self._micro: List[Any] = []  # earlier micro-batches of an accumulated step to measure
        # Set by DynScope: budget_gate(callback, step) -> whether a due measurement may run now.
        self.budget_gate: Optional[Callable[["DiagnosticCallback", int], bool]] = None
        # The seconds counter costs are measured with (DynScope shares its own, injectable, clock).
        self.clock: Callable[[], float] = time.perf_counter

    # -- what subclasses implement -----------------------------------------------------------
    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        """Compute the metrics: a dict ``{metric or metric/layer: value}`` (without the prefix)."""
        raise NotImplementedError

    def before_update(self, trainer, pl_module, batch) -> None:
        """Called before the optimizer step of a step that will be measured (if ``needs_snapshot``)."""

    def check_module(self, trainer, pl_module) -> None:
        """Raise early (at ``setup``) when the module cannot be measured."""

    # -- helpers for subclasses ------------------------------------------------------------------
    def objective(self, pl_module, batch) -> Objective:
        return module_objective(pl_module, batch, self.loss_fn, mode=self.mode)

    def drop(self, reason: str) -> None:
        """Leave this diagnostic out for the rest of the run, saying why once (the run goes on)."""
        self.disabled = True
        self._pending, self._run_at = False, None
        self.warn_once("dropped", f"dropped for the rest of this run: {reason}")

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"dynscope {type(self).__name__}: {message}", RuntimeWarning, stacklevel=2)

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            reason = unsupported_strategy(trainer)
            if reason is not None:
                if self.strict:
                    raise RuntimeError(f"dynscope {type(self).__name__}: {reason}")
                self.warn_once("strategy", f"disabled: {reason}")
                self.disabled = True
                return
            self.check_module(trainer, pl_module)
            from .dashboard import write_layout  # custom-scalars layout, merged across dynscope callbacks

            write_layout(trainer, getattr(self, "dashboard_groups", None) or (self.group,))

    def scheduled(self, step: int) -> bool:
        """Whether the schedule asks for a measurement after optimizer step ``step``."""
        return self.schedule.due(step)

    def wants(self, step: int) -> bool:
        """Whether a measurement is due (or still pending) after optimizer step ``step``."""
        return not (self.disabled or self.schedule.at_epoch_end) and (self._pending or self.scheduled(step))

    def next_wanted(self, step: int) -> float:
        """The first step ``>= step`` at which :meth:`wants` may be true (``inf``: not before an epoch end)."""
        if self.disabled or self.schedule.at_epoch_end:
            return math.inf
        if self._pending or type(self).scheduled is not DiagnosticCallback.scheduled:
            return step  # pending, or a schedule of its own: ask at every step
        return self.schedule.next_due(step)

    def will_measure(self, step: int) -> bool:
        """Whether this callback measures after optimizer step ``step`` (decided at its first micro-batch)."""
        return self._run_at == step

    def set_stretch(self, stretch: float) -> None:
        """Slow the schedule down by ``stretch`` (an overhead budget does this; < 1 speeds it up)."""
        self.schedule.stretch = float(stretch)

    @property
    def stretch(self) -> float:
        """The factor an overhead budget slows the schedule down by (1: the configured cadence)."""
        return self.schedule.stretch

    def period(self, step: int) -> Optional[float]:
        """Steps between two measurements at the configured cadence around ``step`` (``None``: at epoch ends)."""
        schedule = self.schedule
        if schedule.at_epoch_end:
            return None
        if schedule.kind == "log":
            return max(1.0, step * math.log(10) / schedule.points_per_decade)
        return float(schedule.every_n_steps)

    def expected_cost(self, batch_size: Optional[int] = None) -> float:
        """What one measurement is expected to cost, in training steps, before one has been timed.

        A training step is one optimizer step of the user's training (forward, backward and update
        on the full batch of ``batch_size`` samples, when known). An overhead budget
        (:class:`dynscope.budget.BudgetController`) uses this until the first measurement was timed,
        then the measured cost. The default is one step (about one forward pass and some logging);
        diagnostics override it from what they compute, and an ``expected_steps`` attribute set on
        an instance overrides both.
        """
        declared = getattr(self, "expected_steps", None)
        return 1.0 if declared is None else float(declared)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = steps_done(trainer, pl_module) + 1
        if step == self._planned_step:  # a later micro-batch of the same optimizer step
            return
        self._planned_step = step
        self._automatic = getattr(pl_module, "automatic_optimization", True)
        self._micro = []
        self._run_at = None
        if not self.wants(step):
            return
        self._pending = True
        if self.budget_gate is None or self.budget_gate(self, step):
            self._run_at = step
            if self.needs_snapshot:
                self._snapshot_step = step
                self.before_update(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.schedule.at_epoch_end:
            self._batch = batch
            return
        if self._run_at is None:
            return
        if self._automatic and trainer.global_step < self._run_at:  # accumulating: the optimizer has not stepped yet
            self._micro.append(batch)
            return
        batch = join_batches(self._micro + [batch], self.warn_once) if self._micro else batch
        self._micro, self._run_at, self._pending = [], None, False
        self.run(trainer, pl_module, batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.schedule.at_epoch_end and self._batch is not None and not self.disabled:
            if self.budget_gate is None or self.budget_gate(self, trainer.global_step):
                self.run(trainer, pl_module, self._batch)
            self._batch = None

    def run(self, trainer, pl_module, batch) -> Dict[str, float]:
        """Measure now on ``batch`` (or the fixed batch), log, and return the metrics."""
        step = trainer.global_step
        self._last_step = step
        if self.fixed_batch:
            if self._batch is None or self.schedule.at_epoch_end:
                self._batch = _detached_copy(batch)
            batch = self._batch
        start = self.clock()
        try:
            with quiet_logging(pl_module), eager():
                # the outcome (measured, skipped, does not apply) is agreed across ranks: see .distributed
                metrics = on_every_rank(trainer, lambda: self.measure(trainer, pl_module, batch), pl_module.device)
        except LossProtocolError as error:  # a configuration problem: it would fail at every step
            if self.strict:
                raise
            self.drop(str(error))
            metrics = {}
        except Exception as error:  # noqa: BLE001 - a failing diagnostic must not end the run
            if self.strict:
                raise
            self.warn_once(type(error).__name__, f"skipped at step {step}: {type(error).__name__}: {error}")
            metrics = {}
        finally:
            self.seconds_spent += self.clock() - start
        self.num_measurements += 1
        self.last_metrics = metrics
        log_scalars(trainer, {tag(self.group, k): v for k, v in metrics.items()}, step)
        return metrics

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "last_step": self._last_step,
            "seconds_spent": self.seconds_spent,
            "num_measurements": self.num_measurements,
            "stretch": self.schedule.stretch,
            "pending": self._pending,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", -1)
        self.seconds_spent = state_dict.get("seconds_spent", 0.0)
        self.num_measurements = state_dict.get("num_measurements", 0)
        self.schedule.stretch = state_dict.get("stretch", 1.0)
        self._pending = bool(state_dict.get("pending", False))


def eager():
    """Run the enclosed code eagerly, even through ``torch.compile``'d callables, and leave them untouched.

    **Rule: measure through the original, uncompiled module.** A module compiled with
    ``torch.compile`` (Lightning installs the compiled ``forward`` and ``training_step`` on the
    module itself) must not see dynscope's evaluations: under ``functional_call`` and the
    ``torch.func`` transforms they would recompile, fail (the HVP's double backward through
    inductor's donated buffers) or make dynamo skip the frame for good, so that training falls
    back to eager (the speed-up lost; with Dropout other weights). Under the ``"force_eager"``
    stance every compiled callable runs its original Python code and dynamo's caches stay as they are.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def memory_cap_bytes(memory_cap: Optional[int], memory_cap_mb: Optional[float], default: Optional[int],
                     owner: str) -> Optional[int]:
    """The memory cap in bytes from ``memory_cap`` (bytes) or the older ``memory_cap_mb`` (MiB, kept
    as an alias); ``default`` when neither is given. Both, or a cap below one byte, raise."""
    if memory_cap is not None and memory_cap_mb is not None:
        raise ValueError(f"{owner}: give memory_cap (bytes) or memory_cap_mb (MiB), not both")
    if memory_cap_mb is not None:
        memory_cap = int(memory_cap_mb * 2**20)
    if memory_cap is not None and memory_cap < 1:
        raise ValueError(f"{owner}: the memory cap must be at least one byte, got {memory_cap}")
    return default if memory_cap is None else int(memory_cap)


def _detached_copy(batch: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, batch)


def join_batches(batches: List[Any], warn: Callable[[str, str], None]) -> Any:
    """The micro-batches of an accumulated optimizer step as one batch (tensors joined on dim 0).

    Lightning averages the micro-batches' mean losses, which equals the mean loss of the joined
    batch when the micro-batches are of equal size. Batches that cannot be joined (other leaves
    than tensors with a batch dimension, different structures) fall back to the last micro-batch.
    """
    flat = [tree_flatten(b) for b in batches]
    leaves0, spec = flat[0]
    joinable = all(s == spec for _, s in flat) and all(
        isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 for leaves, _ in flat for leaf in leaves
    )
    if not joinable:
        warn("join", "the micro-batches of an accumulated step cannot be joined (tensors with a batch dimension "
                     "expected); measuring on the last micro-batch instead")
        return batches[-1]
    return tree_unflatten([torch.cat(parts) for parts in zip(*(leaves for leaves, _ in flat))], spec)
