"""Gradient variance amplification (VarianceAmplification) and the automatic EMA of the weights (AutoEMA).

Block et al. 2023, "Butterfly effects of SGD noise": the definitions are in
:mod:`dynscope.amplification`, ready-made long-horizon metrics in :mod:`dynscope.rollouts`.
"""

from __future__ import annotations

import importlib
import logging
import math
import statistics
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from dynscope.amplification import EMA_WARMUPS, AmplificationWindow, WarmupEMA, evaluate_metric

from ._lightning import lightning_package
from .base import DiagnosticCallback, _detached_copy
from .distributed import mean_over_ranks, on_every_rank, reduce_computed
from .logging import log_scalars, tag
from .protocol import find_loss_fn
from .trigger import Trigger, Triggered

log = logging.getLogger("dynscope")

MetricSpec = Union[Callable[[torch.nn.Module], float], str]
LOSS_SOURCES = ("reference", "train")


def resolve_metric(metric: MetricSpec) -> Callable[[torch.nn.Module], float]:
    """A callable, or ``"package.module:function"`` imported (for LightningCLI YAML)."""
    if callable(metric):
        return metric
    if isinstance(metric, str) and ":" in metric:
        module_name, _, attr = metric.partition(":")
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
        if callable(target):
            return target
    raise TypeError(f"metric must be a callable metric(module) -> float or 'package.module:function', got {metric!r}")


class VarianceAmplification(DiagnosticCallback):
    """Logs a long-horizon metric, the training loss, and their variance amplification.

    Every ``every_n_steps`` optimizer steps (after the step), logged under ``dynscope/gva/``:

    * ``metric``: ``J = metric(module)``, evaluated in eval mode under ``torch.no_grad`` with all
      RNGs forked and every submodule's train/eval flag restored, so it does not change training;
    * ``loss``: the loss ``L`` compared against (``loss=``):

      - ``"reference"`` (default): the mean loss on a fixed reference set, the first
        ``reference_batches`` training batches (kept), evaluated at the current weights through
        dynscope's loss protocol in ``mode`` (see :mod:`dynscope.callbacks.protocol`). The data is
        the same at every evaluation, so ``dL`` is purely the iterate-to-iterate change, as in the
        definition. Evaluations start once the reference set is complete.
      - ``"train"``: the mean of the training-step losses (``training_step``'s output) since the
        previous evaluation. Needs no loss protocol, but batch-to-batch sampling noise adds to
        ``std(dL)`` and biases the amplification low.
    * ``amplification``: :func:`dynscope.variance_amplification` over the last ``window``
      evaluations, ``(std(dJ)/|mean J|) / (std(dL)/|mean L|)``, from the first full window on (not
      logged while undefined: both series flat).

    Under DDP ``J`` and ``L`` are averaged over ranks, so every rank sees the same values. The
    window is part of the checkpoint state.

    Args:
        metric: ``metric(module) -> float``, e.g. ``functools.partial(dynscope.rollouts.rollout_cost,
            dynamics=..., x0=..., horizon=50)``; or ``"package.module:function"`` (YAML).
        every_n_steps: period of the evaluations, in optimizer steps (``schedule="steps"``).
        window: evaluations per amplification estimate (>= 3).
        loss: ``"reference"`` or ``"train"`` (above).
        reference_batches: size of the reference set, in training batches.
        loss_fn: ``loss_fn(module(x), y)`` for the reference loss when the module has no
            ``dynscope_loss``/``loss_fn``/``criterion``.
        schedule: ``"steps"`` or ``"epoch"`` (evaluate at each epoch's end). Log-spaced schedules
            are refused: differences of unevenly spaced iterates are not comparable.
        mode: the mode of the reference loss, ``"eval"`` or ``"train"``.
        strict: re-raise errors inside the diagnostic instead of warning once and skipping.

    Example:
        >>> import functools, torch, pytorch_lightning as pl
        >>> from dynscope.rollouts import linear_dynamics, rollout_cost
        >>> from dynscope.callbacks import VarianceAmplification
        >>> A, B = torch.tensor([[1.1, 0.3], [0.0, 0.9]]), torch.tensor([[0.0], [1.0]])
        >>> cost = functools.partial(rollout_cost, dynamics=linear_dynamics(A, B),
        ...                          x0=torch.randn(16, 2), horizon=30, max_cost=1e4)
        >>> callback = VarianceAmplification(metric=cost, every_n_steps=10, window=20)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    group = "gva"

    def __init__(
        self,
        metric: MetricSpec,
        every_n_steps: int = 10,
        window: int = 20,
        *,
        loss: str = "reference",
        reference_batches: int = 1,
        loss_fn: Optional[Callable] = None,
        schedule: str = "steps",
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        if schedule not in ("steps", "epoch"):
            raise ValueError(
                f"schedule must be 'steps' or 'epoch' (consecutive evaluations must be evenly spaced), got {schedule!r}"
            )
        super().__init__(every_n_steps=every_n_steps, schedule=schedule, loss_fn=loss_fn, mode=mode, strict=strict)
        if int(window) != window or window < 3:
            raise ValueError(f"window must be an integer >= 3 (two differences at least), got {window!r}")
        if loss not in LOSS_SOURCES:
            raise ValueError(f"loss must be one of {LOSS_SOURCES}, got {loss!r}")
        if reference_batches < 1:
            raise ValueError(f"reference_batches must be >= 1, got {reference_batches}")
        self.metric = resolve_metric(metric)
        self.window = int(window)
        self.loss = loss
        self.reference_batches = reference_batches
        self.every_n_steps = every_n_steps
        self.history = AmplificationWindow(self.window)  # the evaluations and their statistics
        self._reference: List[Any] = []
        self._train_losses: List[float] = []

    @property
    def metrics(self) -> deque:
        """The long-horizon metric at the window's evaluations."""
        return self.history.metrics

    @property
    def losses(self) -> deque:
        """The loss at the window's evaluations."""
        return self.history.losses

    @property
    def steps(self) -> deque:
        """The global steps of the window's evaluations."""
        return self.history.steps

    @property
    def state_key(self) -> str:
        # several instances can share a trainer (and a checkpoint) when their settings differ
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, window=self.window, loss=self.loss, reference_batches=self.reference_batches
        )

    def check_module(self, trainer, pl_module) -> None:
        if self.loss == "reference":
            find_loss_fn(pl_module, self.loss_fn)

    # -- when ----------------------------------------------------------------------------------------
    deferrable = False  # differences of unevenly spaced iterates are not comparable
    idle_between_measurements = False  # collects reference batches / training losses (and updates the EMA)

    def scheduled(self, step: int) -> bool:
        return step % (self.every_n_steps * int(self.schedule.stretch)) == 0

    def expected_cost(self, batch_size: Optional[int] = None) -> float:
        """One evaluation in training steps: the metric and the reference loss, about 3."""
        declared = getattr(self, "expected_steps", None)
        return 3.0 if declared is None else float(declared)

    def set_stretch(self, stretch: float) -> None:
        """Slow down by a power of two (evenly spaced evaluations); a new spacing starts a new window."""
        factor = 2 ** max(0, math.ceil(math.log2(max(stretch, 1.0)) - 1e-9))
        if factor != self.schedule.stretch:
            self.schedule.stretch = float(factor)
            self.history.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.loss == "reference" and len(self._reference) < self.reference_batches:
            self._reference.append(_detached_copy(batch))
        if self.loss == "train":
            value = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(value, torch.Tensor):
                self._train_losses.append(float(value.detach()))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # -- what ------------------------------------------------------------------------------------------
    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        def local():
            loss = self._loss(pl_module)
            return None if loss is None else (evaluate_metric(self.metric, pl_module), loss)

        values = on_every_rank(trainer, local, pl_module.device)
        if values is None:
            return {}
        j, loss = values
        reduce = mean_over_ranks(trainer)
        if reduce is not None:
            both = reduce(torch.tensor([j, loss], dtype=torch.float64, device=pl_module.device))
            j, loss = (float(v) for v in both)
        return self.history.add(j, loss, trainer.global_step)

    def _loss(self, pl_module) -> Optional[float]:
        if self.loss == "train":
            if not self._train_losses:
                return None
            value = sum(self._train_losses) / len(self._train_losses)
            self._train_losses = []
            return value
        if len(self._reference) < self.reference_batches:
            return None
        values = [float(self.objective(pl_module, b).value()) for b in self._reference]
        return sum(values) / len(values)

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(
            metrics=list(self.metrics), losses=list(self.losses), steps=list(self.steps),
            reference=[_detached_copy(b) for b in self._reference], train_losses=list(self._train_losses),
        )
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history.load_state_dict(state_dict)  # metrics, losses, steps (and AutoEMA's metrics_ema)
        self._reference = list(state_dict.get("reference", []))
        self._train_losses = list(state_dict.get("train_losses", []))


class AutoEMA(Triggered, VarianceAmplification):
    """Evaluates with an EMA of the weights once it makes the long-horizon metric steadier.

    Measures everything :class:`VarianceAmplification` does (same tags) and keeps, from the first
    optimizer step on, a cheap shadow exponential moving average of the weights, ``theta_bar <-
    decay_t theta_bar + (1 - decay_t) theta`` after every optimizer step, with the warm-up schedule
    of :func:`dynscope.amplification.ema_decay` (``decay``, ``warmup``, ``power``). At each
    evaluation it also evaluates the metric at the EMA weights and, over the last ``window``
    evaluations, compares the metric's iterate-to-iterate swing under the online and the EMA
    weights. It switches evaluation to the EMA when, for ``patience`` consecutive evaluations:

    * the EMA is ``steadier`` times steadier: ``std(dJ_online) / std(dJ_ema) >= steadier``
      (``d``: the change between consecutive evaluations);
    * the online metric does swing: its relative swing ``std(dJ) / |mean J|`` is at least
      ``min_swing`` (a flat metric needs no averaging);
    * the EMA is no worse on average: ``mean J_ema <= mean J + tolerance |mean J|`` (or ``>=``,
      less the tolerance, with ``higher_is_better=True``).

    This asks what the mitigation needs to know: does an EMA of the iterates reduce the swing of
    the long-horizon metric? (The amplification score ``A`` divides by the loss's relative swing,
    which differs between systems for reasons unrelated to the swing, e.g. the state scale; it peaked
    at 0.4-2.6 on behaviour-cloning systems where the EMA cut the swing 5-7x, so a threshold on it
    does not transfer.) ``threshold`` adds the old trigger, ``amplification > threshold`` for
    ``patience`` evaluations (off by default).

    Defaults, measured on behaviour cloning of an LQR expert (``dynscope demo gva``: 4 random
    4-state systems, tanh MLP, ReLU MLP and linear policies, minibatch SGD, 60-step rollout cost,
    1500 steps): ``steadier=3``, ``min_swing=0.005``, ``tolerance=0.02``, ``decay=0.99`` (the average
    spans about 100 steps), ``window=20`` evaluations every 10 steps. On the open-loop unstable
    systems (spectral radius 1.2) it fired on 11 of 12 (steps 220-1320; the EMA was then 7-25x
    steadier at a mean cost within 1%); the twelfth swung by 0.2% only. On the stable ones (0.5) the
    cost's relative swing was 0.0002-0.0015 late in training and it stayed off on 11 of 12; the
    twelfth fired at step 500, while its cost still swung by 5%.

    The averaging is Lightning's ``WeightAveraging`` callback (of the Lightning package whose
    ``Trainer`` runs it) holding a :class:`torch.optim.swa_utils.AveragedModel` with the
    :class:`WarmupEMA` update. Once the EMA is on:

    * validation runs with the EMA weights (swapped in and back out around each validation epoch);
    * when training ends, the EMA weights are copied into the module.

    Checkpoints always hold the online weights as the model's ``state_dict`` (so a checkpoint
    resumed without AutoEMA continues from the online weights, never silently from the EMA); the
    EMA weights, its update count and this callback's state are in the callback's own state and are
    restored on resume (checkpoints in Lightning's weight-averaging layout, ``current_model_state``
    beside EMA weights in ``state_dict``, still load).

    Logged at every evaluation, under ``dynscope/gva/``: ``metric_ema`` (the metric at the EMA
    weights); over a full window: ``swing`` and ``swing_ema`` (relative swings ``std(dJ) / |mean
    J|`` of the online and the EMA metric: ``swing`` is a first-class alarm of its own),
    ``ema_swing_ratio`` (``std(dJ_online) / std(dJ_ema)``) and ``amplification_ema``. Also
    ``dynscope/mitigation/ema`` (0 before, 1 from the triggering evaluation on); at the trigger, a
    text entry ``dynscope/mitigation/events`` with the step, the reason and the values. ``active``,
    ``triggered_step``, ``reason`` and ``trigger_values`` hold the same. The decision is summed over
    ranks, so every rank switches at the same step.

    Cost: one in-place average of the weights per optimizer step, and a second metric evaluation
    per evaluation.

    Args:
        metric: the long-horizon metric (see :class:`VarianceAmplification`).
        threshold: optional amplification trigger (``None``: off).
        patience: consecutive evaluations a condition must hold.
        decay: the EMA's decay after warm-up (the average spans about ``1 / (1 - decay)`` steps).
        warmup: ``"inverse"``, ``"polynomial"`` or ``"none"`` (see ``ema_decay``).
        power: exponent of the ``"polynomial"`` warm-up.
        steadier: how many times smaller the EMA's swing must be.
        min_swing: the online metric's relative swing below which nothing is done.
        tolerance: how much worse (relative to ``|mean J|``) the EMA's mean may be.
        higher_is_better: the metric is a reward (default: a cost, lower is better).
        use_buffers: average the buffers too (Lightning's default) instead of copying them.
        device: where the EMA weights live (default: the module's device), e.g. ``"cpu"``.
        Other arguments: see :class:`VarianceAmplification`.

    Example:
        >>> import torch, pytorch_lightning as pl
        >>> from dynscope.callbacks import AutoEMA
        >>> callback = AutoEMA(metric=lambda m: float(m(torch.ones(1, 2)).abs().sum()), steadier=3.0,
        ...                    patience=3, decay=0.99, warmup="inverse")
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
        >>> callback.active, callback.triggered_step
        (False, None)
    """

    dashboard_groups = ("gva", "mitigation")

    def __init__(
        self,
        metric: MetricSpec,
        threshold: Optional[float] = None,
        patience: int = 3,
        every_n_steps: int = 10,
        window: int = 20,
        decay: float = 0.99,
        warmup: str = "inverse",
        power: float = 0.75,
        *,
        steadier: float = 3.0,
        min_swing: float = 0.005,
        tolerance: float = 0.02,
        higher_is_better: bool = False,
        use_buffers: bool = True,
        device: Optional[str] = None,
        loss: str = "reference",
        reference_batches: int = 1,
        loss_fn: Optional[Callable] = None,
        schedule: str = "steps",
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        super().__init__(
            metric, every_n_steps, window, loss=loss, reference_batches=reference_batches, loss_fn=loss_fn,
            schedule=schedule, mode=mode, strict=strict,
        )
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0 (or None: no amplification trigger), got {threshold}")
        self.trigger = Trigger("ema", patience, conditions=("ema",), unit="evaluation")
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"warmup must be one of {EMA_WARMUPS}, got {warmup!r}")
        if not steadier >= 1:
            raise ValueError(f"steadier must be >= 1, got {steadier}")
        if not min_swing >= 0:
            raise ValueError(f"min_swing must be >= 0, got {min_swing}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.threshold = threshold
        self.steadier = float(steadier)
        self.min_swing = float(min_swing)
        self.tolerance = float(tolerance)
        self.higher_is_better = higher_is_better
        self.update = WarmupEMA(decay, warmup, power)
        self.use_buffers = use_buffers
        self.device = device
        self._averaging = None  # Lightning's WeightAveraging, built in setup
        self._pending_averaging_state: Optional[Dict[str, Any]] = None
        self._pending_average_model: Optional[Dict[str, Any]] = None

    @property
    def metrics_ema(self) -> deque:
        """The metric at the EMA weights at the window's evaluations."""
        return self.history.metrics_ema

    @property
    def ema_module(self) -> Optional[torch.nn.Module]:
        """The module holding the EMA weights (a copy of the LightningModule), once set up."""
        average = getattr(self._averaging, "_average_model", None)
        return None if average is None else average.module

    def _averaged(self) -> bool:
        average = getattr(self._averaging, "_average_model", None)
        return average is not None and int(average.n_averaged) > 0

    # -- Lightning's weight averaging: a shadow from the start, used once triggered ---------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.disabled:
            return
        averaging_cls = lightning_package(trainer).callbacks.WeightAveraging
        self._averaging = averaging_cls(device=self.device, use_buffers=self.use_buffers, multi_avg_fn=self.update)
        self._averaging.setup(trainer, pl_module, stage)
        self._load_pending()

    def _load_pending(self) -> None:
        if self._averaging is None:
            return
        if self._pending_averaging_state is not None:
            self._averaging.load_state_dict(self._pending_averaging_state)
            self._pending_averaging_state = None
        if self._pending_average_model is not None:
            self._averaging._average_model.load_state_dict(self._pending_average_model)
            self._pending_average_model = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._averaging is not None:  # update first, so the evaluation of this step sees this step's EMA
            self._averaging.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.active and self._averaged():
            self._averaging.on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.active and self._averaged():
            self._averaging.on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.active and self._averaged():
            self._averaging.on_train_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        # checkpoints written in Lightning's weight-averaging layout (EMA weights as the state_dict)
        if self._averaging is not None and "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            self._averaging.on_load_checkpoint(trainer, pl_module, checkpoint)

    # -- measuring and deciding --------------------------------------------------------------------
    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        out = super().measure(trainer, pl_module, batch)
        if not out or not self._averaged():
            return out
        # a metric that fails on one rank still joins the reduction: every rank skips alike
        j_ema = float(reduce_computed(
            mean_over_ranks(trainer),
            lambda: torch.tensor(evaluate_metric(self.metric, self.ema_module), dtype=torch.float64, device=pl_module.device),
            torch.zeros((), dtype=torch.float64, device=pl_module.device),
        ))
        out.update(self.history.add_ema(j_ema))
        return out

    def run(self, trainer, pl_module, batch) -> Dict[str, float]:
        metrics = super().run(trainer, pl_module, batch)
        step = trainer.global_step
        if not self.active:
            steadier = self._steadier(metrics)
            fired = self.trigger.check(trainer, self._hits(metrics, steadier), pl_module.device)
            if fired is not None:
                self._trigger(trainer, pl_module, step, self._reason(fired, steadier, metrics), metrics)
                return metrics
        if metrics:
            log_scalars(trainer, {tag("mitigation", "ema"): float(self.active)}, step)
        return metrics

    def _steadier(self, metrics: Dict[str, float]) -> bool:
        window = self.history.last_ema if "ema_swing_ratio" in metrics else None  # this measurement's window
        return window is not None and window.steadier(self.steadier, self.min_swing, self.tolerance,
                                                      self.higher_is_better)

    def _hits(self, metrics: Dict[str, float], steadier: bool) -> Dict[str, Optional[bool]]:
        """One condition: the EMA is steadier, or (with ``threshold``) the amplification exceeds it."""
        if not metrics or ("ema_swing_ratio" not in metrics and "amplification" not in metrics):
            return {}
        a = metrics.get("amplification")
        amplified = self.threshold is not None and a is not None and a > self.threshold  # nan compares False
        return {"ema": steadier or amplified}

    def _reason(self, fired: str, steadier: bool, metrics: Dict[str, float]) -> str:
        if fired != "ema":
            return fired  # another rank's check fired
        checks = f"{self.trigger.held} (window of {self.window})"
        if steadier:
            better = "higher" if self.higher_is_better else "lower"
            return (f"the EMA of the weights is {metrics['ema_swing_ratio']:.3g}x steadier on the metric (>= "
                    f"{self.steadier:g}x; online relative swing {metrics['swing']:.3g} >= {self.min_swing:g}) and no "
                    f"worse on average ({better} is better) for {checks}")
        return f"variance amplification > {self.threshold:g} for {checks}"

    def _trigger(self, trainer, pl_module, step: int, reason: str, metrics: Dict[str, float]) -> None:
        keys = ("ema_swing_ratio", "swing", "swing_ema", "amplification", "metric", "metric_ema", "loss")
        self.trigger.fire(step, reason, metrics, keys)
        if self.metrics_ema:
            self.trigger_values.update(mean_metric=statistics.fmean(self.metrics),
                                       mean_metric_ema=statistics.fmean(self.metrics_ema))
        d = self.update
        self.trigger.announce(
            trainer,
            f"{reason}; evaluation (validation, and the weights at the end of training) uses the EMA of the weights "
            f"from this step on (decay {d.decay:g}, {d.warmup} warm-up, averaged since the first step)",
            dict(self.trigger_values, decay=d.decay),
        )

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        average = getattr(self._averaging, "_average_model", None)
        state.update(
            self.trigger.state_dict(), streak=self.trigger.streaks["ema"], metrics_ema=list(self.metrics_ema),
            averaging=None if self._averaging is None else self._averaging.state_dict(),
            average_model=None if average is None else average.state_dict(),
        )
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.trigger.load_state_dict(state_dict)
        self.trigger.streaks["ema"] = int(state_dict.get("streak", 0))
        self._pending_averaging_state = state_dict.get("averaging")
        self._pending_average_model = state_dict.get("average_model")
        self._load_pending()


__all__ = ["AutoEMA", "MetricSpec", "VarianceAmplification", "WarmupEMA", "resolve_metric"]
