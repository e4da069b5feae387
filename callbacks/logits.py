"""Output-logit divergence (OutputLogits) and the automatic z-loss (AutoZLoss).

Wortsman et al. 2023 (Sec. 3.2); the math is in :mod:`dynscope.logits`, the switchable loss is
:class:`dynscope.nn.CrossEntropy` (its ``z_loss`` coefficient).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from dynscope.logits import LogitStats, output_logit_stats
from dynscope.nn import CrossEntropy

from .base import DiagnosticCallback
from .collapse import measured_logits, switchable_losses, training_precision
from .distributed import on_every_rank, world_size
from .logging import log_scalars, tag
from .protocol import LossProtocolError
from .trigger import Trigger, Triggered


def reduce_logit_stats(trainer, stats: LogitStats, device=None) -> LogitStats:
    """The statistics over every rank's batch (the same on every rank)."""
    if world_size(trainer) <= 1:
        return stats
    gathered = trainer.strategy.all_gather(stats.as_tensor().to(device))
    return LogitStats.from_tensors(gathered.cpu())


class OutputLogits(DiagnosticCallback):
    """``log Z`` of the output logits and its drift: the output-logit divergence of Wortsman et al. 2023.

    Every ``every_n_steps`` optimizer steps it runs the model once more on the step's batch (no
    gradients, RNG forked, eval mode by default), takes the logits from ``dynscope_logits(batch)
    -> (logits, targets)`` or ``(module(x), y)`` (class dimension last: ``[B, V]`` or an LM's
    ``[B, T, V]``; positions with target ``ignore_index`` are left out) and logs
    (``dynscope/logits/...``): ``log_z_mean``, ``log_z_max``, ``log_z_min`` of ``log Z =
    logsumexp_v(z_v)`` over the positions, ``log_z_drift`` (``log_z_mean`` minus its value at the
    first measurement, kept across resumes), ``max_logit`` and ``z_loss`` (``mean((log Z)^2)``).
    Cross-entropy is blind to the level of the logits; a ``log_z_drift`` that keeps growing is
    the divergence the z-loss (:class:`AutoZLoss`) stops. Under DDP the statistics cover all ranks.

    Args:
        every_n_steps: measure every this many optimizer steps.
        ignore_index: target value of positions to leave out.
        Other arguments: see :class:`~dynscope.callbacks.DiagnosticCallback`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from dynscope.callbacks import OutputLogits
        >>> callback = OutputLogits(every_n_steps=10)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    group = "logits"

    def __init__(
        self,
        every_n_steps: int = 10,
        *,
        ignore_index: int = -100,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, schedule=schedule, points_per_decade=points_per_decade,
            fixed_batch=fixed_batch, mode=mode, strict=strict,
        )
        self.ignore_index = ignore_index
        self.reference: Optional[float] = None  # log_z_mean at the first measurement

    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        context, _ = training_precision(trainer)

        def local() -> LogitStats:
            logits, targets = measured_logits(pl_module, batch, self.mode, context)
            if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
                raise LossProtocolError(f"OutputLogits needs class logits [..., V], got {getattr(logits, 'shape', type(logits).__name__)}")
            return output_logit_stats(logits, targets, self.ignore_index)

        stats = reduce_logit_stats(trainer, on_every_rank(trainer, local, pl_module.device), pl_module.device)
        out = stats.metrics()
        if self.reference is None:
            self.reference = stats.log_z_mean
        out["log_z_drift"] = stats.log_z_mean - self.reference
        return out

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["reference"] = self.reference
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.reference = state_dict.get("reference")


def z_loss_targets(pl_module) -> List[CrossEntropy]:
    """Every :class:`dynscope.nn.CrossEntropy` among the module's submodules."""
    return switchable_losses(pl_module)


class AutoZLoss(Triggered, OutputLogits):
    """Adds the z-loss ``coefficient * (log Z)^2`` to the module's :class:`dynscope.nn.CrossEntropy`
    when ``log Z`` drifts.

    Measures everything :class:`OutputLogits` does (same tags) and, while not yet switched on,
    checks after each measurement whether ``|log_z_drift| >= threshold`` for ``patience``
    consecutive checks. Then every ``CrossEntropy`` in the module gets ``z_loss = coefficient``
    (from the next optimizer step on), for the rest of the run. The decision is agreed across ranks
    (any rank's trigger switches every rank at the same step). Logged at every check:
    ``dynscope/mitigation/zloss`` (0, then 1); at the switch a text entry
    ``dynscope/mitigation/events`` saying when, why and with which values. The switch and the
    reference ``log Z`` are part of the checkpoint; a resumed run re-applies the z-loss.

    The opt-in: compute the loss with a ``dynscope.nn.CrossEntropy`` kept on the module
    (``self.criterion = dynscope.nn.CrossEntropy()``; for an LM ``self.criterion(logits.flatten(0, 1),
    targets.flatten())``). Without one, setup raises ``LossProtocolError``.

    Defaults (measured on the ``dynscope demo transformer`` LMs, AdamW, no weight decay):
    ``threshold=5.0`` nats of drift: on a stochastic language (a random Markov chain) ``log Z``
    rises by 0.6-1.4 nats and settles (lr 1e-2 to 1e-1), while on a perfectly predictable language
    it keeps rising, at a speed set by the learning rate: +13 nats in 25 steps at lr 3e-2, +10 in
    300 steps at 3e-3, +6 in 300 steps at 1e-3 (1-layer model); ``patience=3`` checks
    ``every_n_steps=10`` steps apart; ``coefficient=1e-4`` (PaLM). With the z-loss on, ``log Z``
    returns to about 0.

    Args:
        threshold: ``|log_z_drift|`` (nats) that counts as divergence.
        patience: consecutive checks the condition must hold.
        coefficient: the z-loss coefficient set on the losses.
        Other arguments: see :class:`OutputLogits`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from dynscope.callbacks import AutoZLoss
        >>> callback = AutoZLoss(threshold=5.0, coefficient=1e-4)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
        >>> callback.triggered_step is None
        True
    """

    def __init__(
        self,
        threshold: float = 5.0,
        patience: int = 3,
        coefficient: float = 1e-4,
        every_n_steps: int = 10,
        *,
        ignore_index: int = -100,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        super().__init__(
            every_n_steps, ignore_index=ignore_index, schedule=schedule, points_per_decade=points_per_decade,
            fixed_batch=fixed_batch, mode=mode, strict=strict,
        )
        if not threshold > 0:
            raise ValueError(f"threshold must be positive (nats of log Z drift), got {threshold}")
        if not coefficient > 0:
            raise ValueError(f"coefficient must be positive, got {coefficient}")
        self.threshold = float(threshold)
        self.coefficient = float(coefficient)
        self.trigger = Trigger("zloss", patience, conditions=("drift",))

    def check_module(self, trainer, pl_module) -> None:
        if not z_loss_targets(pl_module):
            raise LossProtocolError(
                f"AutoZLoss needs a loss it can add the z-loss to, but {type(pl_module).__name__} holds no "
                "dynscope.nn.CrossEntropy: compute the loss with one kept on the module, e.g. "
                "`self.criterion = dynscope.nn.CrossEntropy()` in __init__"
            )

    def on_train_start(self, trainer, pl_module) -> None:
        if self.active:  # resumed from a checkpoint taken after the switch
            self._apply(pl_module)

    def run(self, trainer, pl_module, batch) -> Dict[str, float]:
        metrics = super().run(trainer, pl_module, batch)
        step = trainer.global_step
        if not self.active:
            drift = metrics.get("log_z_drift")
            fired = self.trigger.check(trainer, {"drift": None if drift is None else abs(drift) >= self.threshold},
                                       pl_module.device)
            if fired is not None:
                self._trigger(trainer, pl_module, step, metrics, fired)
        log_scalars(trainer, {tag("mitigation", "zloss"): float(self.active)}, step)
        return metrics

    def _trigger(self, trainer, pl_module, step: int, metrics: Dict[str, float], fired: str) -> None:
        reason = (f"output-logit divergence: |log_z_drift| >= {self.threshold:g} for {self.trigger.held}"
                  if fired == "drift" else fired)  # else ANOTHER_RANK
        self.trigger.fire(step, reason, metrics, ("log_z_drift", "log_z_mean", "log_z_max", "max_logit"))
        count = self._apply(pl_module)
        action = f"added the z-loss {self.coefficient:g}*logZ^2 to {count} CrossEntropy loss{'es' if count != 1 else ''}"
        # run() logs the 0/1 scalar
        self.trigger.announce(trainer, f"{reason}; {action} (from step {step + 1} on)", scalar=False)

    def _apply(self, pl_module) -> int:
        losses = z_loss_targets(pl_module)
        for loss in losses:
            loss.z_loss = self.coefficient
        return len(losses)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(self.trigger.state_dict(), streak=self.trigger.streaks["drift"])
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.trigger.load_state_dict(state_dict)
        self.trigger.streaks["drift"] = int(state_dict.get("streak", 0))


__all__ = ["AutoZLoss", "OutputLogits", "reduce_logit_stats", "z_loss_targets"]
