"""One mitigation trigger: named conditions, patience, agreement across ranks, the event.

:class:`AutoStableMax`, :class:`AutoEMA` and :class:`AutoZLoss` compose a :class:`Trigger` rather than
each keeping its own streak counters, rank agreement and event bookkeeping; a new mitigation does the same.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from .dashboard import log_mitigation_event
from .distributed import any_rank

ANOTHER_RANK = "another rank's check fired"


class Trigger:
    """When a mitigation switches on: the first named condition to hold for ``patience`` consecutive checks.

    Each condition keeps its own streak: at a check, ``True`` extends it, ``False`` resets it, and
    ``None`` (not measured at this check) leaves it as it is; a check where every condition is
    ``None`` (a failed measurement) does not count. :meth:`check` also agrees across ranks (a
    collective under DDP: call it at the same checks on every rank while not :attr:`active`), so
    every rank fires at the same step; :meth:`fire` records when, why and the values;
    :meth:`announce` logs the scalar ``dynscope/mitigation/<mitigation>`` and the text entry
    ``dynscope/mitigation/events``. :meth:`state_dict` goes into the callback's checkpoint state.

    Args:
        mitigation: the name in ``dynscope/mitigation/<mitigation>`` and in the event text.
        patience: consecutive checks a condition must hold (>= 1).
        conditions: the condition names, in the order they are tried when several fire at once.
        unit: what one check is called in the reason text (``"check"``, ``"evaluation"``).

    Example (inside a mitigation callback's ``run``, after measuring ``metrics``)::

        if not self.trigger.active:
            hits = {"large_logits": None if "max_logit" not in metrics else metrics["max_logit"] > self.threshold}
            fired = self.trigger.check(trainer, hits, pl_module.device)
            if fired is not None:
                reason = f"max_logit > {self.threshold:g} for {self.trigger.held}" if fired != ANOTHER_RANK else fired
                self.trigger.fire(trainer.global_step, reason, metrics)
                ...  # act
                self.trigger.announce(trainer, f"{reason}; z-loss switched on")

    The streaks alone, without a trainer:

        >>> trigger = Trigger("ema", patience=2, conditions=("steadier",))
        >>> [trigger.update({"steadier": hit}) for hit in (True, False, True, None, True)]
        [None, None, None, None, 'steadier']
        >>> trigger.held
        '2 consecutive checks'
    """

    def __init__(self, mitigation: str, patience: int, conditions: Sequence[str], unit: str = "check") -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.mitigation = mitigation
        self.patience = int(patience)
        self.conditions = tuple(conditions)
        self.unit = unit
        self.streaks: Dict[str, int] = {name: 0 for name in self.conditions}
        self.active = False
        self.triggered_step: Optional[int] = None
        self.reason: Optional[str] = None
        self.trigger_values: Optional[Dict[str, float]] = None

    @property
    def held(self) -> str:
        """``"<patience> consecutive checks"``, for the reason text."""
        return f"{self.patience} consecutive {self.unit}{'s' if self.patience > 1 else ''}"

    def update(self, hits: Mapping[str, Optional[bool]]) -> Optional[str]:
        """Advance the streaks by one check; the condition that has now held ``patience`` checks, or ``None``."""
        if all(hits.get(name) is None for name in self.conditions):
            return None
        for name in self.conditions:
            hit = hits.get(name)
            if hit is not None:
                self.streaks[name] = self.streaks[name] + 1 if hit else 0
        return next((name for name in self.conditions if self.streaks[name] >= self.patience), None)

    def check(self, trainer, hits: Mapping[str, Optional[bool]], device=None) -> Optional[str]:
        """:meth:`update`, agreed over ranks: the local condition that fired, :data:`ANOTHER_RANK`, or ``None``."""
        fired = self.update(hits)
        if any_rank(trainer, fired is not None, device) and fired is None:
            return ANOTHER_RANK
        return fired

    def fire(self, step: int, reason: str, values: Mapping[str, Any], keys: Optional[Sequence[str]] = None) -> None:
        """Switch on: record the step, the reason and the float ``values`` (those named in ``keys``, if given)."""
        self.active = True
        self.triggered_step = int(step)
        self.reason = reason
        names = list(values) if keys is None else [k for k in keys if k in values]
        self.trigger_values = {k: float(values[k]) for k in names}

    def announce(self, trainer, text: str, values: Optional[Mapping[str, float]] = None, scalar: bool = True) -> str:
        """Log the event of the last :meth:`fire` (``text``: why and what was done); returns the event text."""
        return log_mitigation_event(trainer, self.mitigation, True, text,
                                    self.trigger_values if values is None else values, self.triggered_step, scalar=scalar)

    # -- checkpointing (flat keys: ``active``, ``triggered_step``, ``reason``, ``trigger_values``, ``<condition>_streak``)
    def state_dict(self) -> Dict[str, Any]:
        state = dict(active=self.active, triggered_step=self.triggered_step, reason=self.reason,
                     trigger_values=self.trigger_values)
        state.update({f"{name}_streak": n for name, n in self.streaks.items()})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.active = bool(state.get("active", False))
        self.triggered_step = state.get("triggered_step")
        self.reason = state.get("reason")
        self.trigger_values = state.get("trigger_values")
        for name in self.conditions:
            self.streaks[name] = int(state.get(f"{name}_streak", 0))


def _delegate(name: str) -> property:
    """A callback attribute that lives on its ``trigger`` (kept as public attributes of the callbacks)."""
    return property(lambda self: getattr(self.trigger, name), lambda self, value: setattr(self.trigger, name, value),
                    doc=f"The trigger's ``{name}`` (see :class:`~dynscope.callbacks.trigger.Trigger`).")


class Triggered:
    """Mixin: ``active``, ``triggered_step``, ``reason``, ``trigger_values`` and ``patience`` read from ``self.trigger``."""

    # its measurements decide a mitigation: an overhead budget never holds them back for another
    # diagnostic's turn (see dynscope.budget.BudgetController)
    mitigating = True
    active = _delegate("active")
    triggered_step = _delegate("triggered_step")
    reason = _delegate("reason")
    trigger_values = _delegate("trigger_values")
    patience = _delegate("patience")
