"""Sharing an overhead budget between diagnostics: how often each may run, and whether it may run now.

Two rules, both in seconds of wall time:

* the **allowance** (a token bucket): a due measurement runs only if the time spent in dynscope
  so far plus its expected cost stays within ``budget`` times the training time so far; otherwise
  it waits (stays pending) until the allowance has grown. This is what keeps the overhead under the
  budget at every point of the run, the first measurements included;
* the **cadences** (water-filling): each diagnostic's schedule is stretched by a power of two so
  that their combined cost per training step fits the budget, the cheap ones first, each getting an
  equal share (a diagnostic near an event gets ``tighten`` times the share and may run up to
  ``tighten`` times more often than its base cadence). Stretching keeps measurements evenly spaced
  instead of bunching up behind the allowance.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional


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
