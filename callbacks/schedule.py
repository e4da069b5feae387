"""When a diagnostic runs: every N steps, at log-spaced steps, or at the end of each epoch.

What a "step" is: an optimizer step under automatic optimization (``trainer.global_step``, which
gradient accumulation advances once per accumulated step); a training batch under manual
optimization, where ``global_step`` counts every ``optimizer.step()`` call (two per batch with two
optimizers, so that an even cadence would never fire). Logged values keep ``global_step`` as
their x-axis.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["steps", "log", "epoch"]


def steps_done(trainer, pl_module) -> int:
    """Schedule steps completed so far (see the module docstring); the next batch starts step ``+ 1``."""
    if getattr(pl_module, "automatic_optimization", True):
        return int(trainer.global_step)
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)


class Schedule:
    """Decides at which optimizer steps a diagnostic is due.

    Args:
        kind: ``"steps"`` every ``every_n_steps`` steps, and after the first optimizer step (step 1);
            ``"log"`` at log-spaced steps, ``points_per_decade`` per factor of ten (dense early,
            sparse late: for quantities that evolve over orders of magnitude of steps);
            ``"epoch"`` at the end of each training epoch.
        every_n_steps: the period for ``"steps"``.
        points_per_decade: the density for ``"log"``.

    Attributes:
        stretch: a factor (>= 1) by which an overhead budget slows the schedule down (1 at first).

    Example:
        >>> s = Schedule("log", points_per_decade=4)
        >>> [step for step in range(1, 200) if s.due(step)]
        [1, 2, 4, 6, 10, 18, 32, 57, 100, 178]
    """

    def __init__(self, kind: ScheduleKind = "steps", every_n_steps: int = 50, points_per_decade: int = 10) -> None:
        if kind not in ("steps", "log", "epoch"):
            raise ValueError(f"schedule must be 'steps', 'log' or 'epoch', got {kind!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if points_per_decade < 1:
            raise ValueError(f"points_per_decade must be >= 1, got {points_per_decade}")
        self.kind = kind
        self.every_n_steps = every_n_steps
        self.points_per_decade = points_per_decade
        self.stretch = 1.0

    def due(self, step: int) -> bool:
        """Whether a step-based schedule fires after optimizer step ``step`` (1-based)."""
        if self.kind == "epoch" or step < 1:
            return False
        if self.kind == "steps":
            period = max(1, int(round(self.every_n_steps * self.stretch)))
            return step == 1 or step % period == 0
        density = self.points_per_decade / self.stretch
        return step == 1 or math.floor(density * math.log10(step)) > math.floor(density * math.log10(step - 1))

    def next_due(self, step: int) -> float:
        """The first step ``>= step`` at which the schedule fires (``inf`` at epoch ends).

        Example:
            >>> s = Schedule("log", points_per_decade=4)
            >>> [s.next_due(n) for n in (1, 3, 11, 19, 58)], Schedule("steps", 10).next_due(11)
            ([1, 4, 18, 32, 100], 20)
        """
        if self.kind == "epoch":
            return math.inf
        step = max(int(step), 1)
        if self.due(step):
            return step
        if self.kind == "steps":
            period = max(1, int(round(self.every_n_steps * self.stretch)))
            return -(-step // period) * period
        density = self.points_per_decade / self.stretch
        level = math.floor(density * math.log10(step))
        candidate = max(step, math.ceil(10 ** ((level + 1) / density)) - 2)  # the crossing, give or take rounding
        while not self.due(candidate):
            candidate += 1
        return candidate

    @property
    def at_epoch_end(self) -> bool:
        return self.kind == "epoch"
