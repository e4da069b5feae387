"""Gradient variance amplification (GVA): long-horizon metrics that swing while the loss is flat.

Block et al. 2023, "Butterfly effects of SGD noise: error amplification in behavior cloning and
autoregression": minibatch noise that barely moves the one-step training loss can make a
long-horizon metric ``J`` (closed-loop rollout cost, autoregressive generation error) swing
between consecutive iterates. The paper gives no scalar; dynscope uses two:

* :func:`variance_amplification`, from a history of evaluations:
  ``A = (std(dJ) / |mean J|) / (std(dL) / |mean L|)``, ``d`` the difference between
  consecutive evaluations. ``A >> 1``: the metric's relative swing is much larger than the
  loss's.
* :func:`amplification_probe`, from the current parameters alone: the same ratio for steps along
  sampled minibatch-noise directions.

An exponential moving average of the iterates damps the swing: :func:`ema_decay` is its warm-up
schedule, :class:`WarmupEMA` the in-place update (for :class:`torch.optim.swa_utils.AveragedModel`),
:func:`ema_window` compares the metric's swing under the online and the averaged weights over a
window of evaluations (what :class:`dynscope.callbacks.AutoEMA` decides on), and
:class:`AmplificationWindow` keeps that running window during training. The logged metrics are
declared in :data:`METRICS`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .context import measurement
from .metrics import GVA as METRICS  # noqa: F401 - what this diagnostic logs (declared in dynscope.metrics)
from .objective import Objective, batch_size_of, check_finite

LongHorizonMetric = Callable[[nn.Module], float]


def _series(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values: {array[~np.isfinite(array)][:4].tolist()}")
    return array


def relative_swing(values: Sequence[float]) -> float:
    """``std(dv) / |mean v|``: the spread of consecutive changes relative to the level.

    ``std`` is the population standard deviation (``ddof=0``). ``inf`` when the values average
    to exactly zero but change, ``nan`` when they are all zero.

    Example:
        >>> relative_swing([1.0, 3.0, 1.0, 3.0])   # d = [2, -2, 2]: std 2 * sqrt(2) / 3, mean 2
        0.9428090415820634
    """
    v = _series(values, "values")
    if v.size < 3:
        raise ValueError(f"need at least 3 values (2 differences), got {v.size}")
    return _ratio(float(np.std(np.diff(v))), abs(float(np.mean(v))))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0.0:
        return math.nan if numerator == 0.0 else math.inf
    return numerator / denominator


def variance_amplification(
    long_horizon_values: Sequence[float], losses: Sequence[float], window: Optional[int] = None
) -> float:
    """Gradient variance amplification over a window of consecutive evaluations.

    ``A = (std(dJ) / |mean J|) / (std(dL) / |mean L|)`` where ``J`` are the long-horizon metric's
    values, ``L`` the training losses at the same iterates, ``d`` the difference between
    consecutive evaluations and ``std``, ``mean`` are taken over the last ``window`` evaluations
    (all of them when ``window`` is ``None``). ``A`` is about 1 when the metric moves, relatively,
    as much as the loss; ``A >> 1`` is the amplification of Block et al. 2023 ("Butterfly effects
    of SGD noise"). The standard deviations' ``ddof`` cancels in the ratio.

    Zero denominators: when the loss does not change over the window (``std(dL) == 0``) or the
    metric averages to exactly 0, the ratio has a zero denominator and the result is ``inf`` if the
    numerator is positive, ``nan`` if it is 0 as well (nothing moves: undefined). Likewise a zero
    ``|mean L|`` makes the loss's relative swing infinite and ``A = 0`` (or ``nan``).

    Args:
        long_horizon_values: ``J`` at consecutive evaluations (same length as ``losses``).
        losses: ``L`` at the same evaluations.
        window: how many of the most recent evaluations to use (>= 3).

    Raises:
        ValueError: lengths differ, fewer than 3 evaluations, a bad window or non-finite values.

    Example:
        >>> J = [10.0, 12.0, 10.0, 12.0]      # swings by 2 around 11
        >>> L = [1.00, 1.01, 1.00, 1.01]      # swings by 0.01 around 1.005
        >>> round(variance_amplification(J, L), 6)   # (2 / 11) / (0.01 / 1.005)
        18.272727
    """
    j = _series(long_horizon_values, "long_horizon_values")
    loss = _series(losses, "losses")
    if j.size != loss.size:
        raise ValueError(f"long_horizon_values and losses must have the same length, got {j.size} and {loss.size}")
    if window is not None:
        if int(window) != window or window < 3:
            raise ValueError(f"window must be an integer >= 3, got {window!r}")
        j, loss = j[-int(window):], loss[-int(window):]
    if j.size < 3:
        raise ValueError(f"need at least 3 evaluations (2 differences), got {j.size}")
    # A = (std dJ * |mean L|) / (std dL * |mean J|), so a zero |mean L| gives 0 rather than nan.
    numerator = float(np.std(np.diff(j))) * abs(float(np.mean(loss)))
    denominator = float(np.std(np.diff(loss))) * abs(float(np.mean(j)))
    return _ratio(numerator, denominator)


# -- the probe ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`amplification_probe` measured.

    Attributes:
        amplification: ``metric_change / loss_change`` (``inf``/``nan`` rules as in
            :func:`variance_amplification`).
        metric_change: RMS over directions of ``|J(theta + delta) - J(theta)|``, divided by ``|J(theta)|``.
        loss_change: RMS over directions of ``|L(theta + delta) - L(theta)|``, divided by ``|L(theta)|``.
        metric: ``J(theta)``.
        loss: ``L(theta)``, the objective's loss (mean over its whole batch).
        step_norm: mean ``||delta||`` over the directions.
        num_directions: how many noise directions were used.
    """

    amplification: float
    metric_change: float
    loss_change: float
    metric: float
    loss: float
    step_norm: float
    num_directions: int

    @property
    def value(self) -> float:
        """``amplification`` (the headline value, as every result's ``.value``)."""
        return self.amplification


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Run the enclosed code with ``module`` in eval mode, under ``no_grad``, with all RNGs forked.

    The train/eval flag of every submodule is restored afterwards, so evaluating a metric does not
    change training (eval mode: dropout off, BatchNorm uses and keeps its running statistics).
    """
    with measurement(module, "eval"):
        yield module


def evaluate_metric(metric: LongHorizonMetric, module: nn.Module) -> float:
    """``float(metric(module))`` inside :func:`evaluating`; raises ``ValueError`` if not finite."""
    with evaluating(module):
        value = metric(module)
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not math.isfinite(value):
        raise ValueError(f"the long-horizon metric returned {value}; it must be finite (clip it, e.g. max_cost=)")
    return value


@contextlib.contextmanager
def _shifted(model: nn.Module, delta: "OrderedDict[str, torch.Tensor]") -> Iterator[None]:
    """Temporarily add ``delta`` to the named parameters; the exact old values are written back."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in delta}
    try:
        with torch.no_grad():
            for n, d in delta.items():
                params[n].add_(d.to(params[n].dtype))
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


def _minibatches(batch: Any, size: int, count: int, generator: torch.Generator) -> List[Any]:
    n = batch_size_of(batch)
    if not 1 <= size < n:
        raise ValueError(f"minibatch_size must be in [1, {n}) (the objective's batch has {n} samples), got {size}")
    out = []
    for _ in range(count):
        index = torch.randperm(n, generator=generator)[:size]
        out.append(tree_map(lambda t: t[index.to(t.device)] if isinstance(t, torch.Tensor) else t, batch))
    return out


def amplification_probe(
    objective: Objective,
    metric: LongHorizonMetric,
    *,
    lr: float,
    minibatch_size: Optional[int] = None,
    batches: Optional[Sequence[Any]] = None,
    num_directions: int = 8,
    seed: int = 0,
) -> ProbeResult:
    """Variance amplification at the current parameters, without a history of evaluations.

    Samples minibatch-noise directions ``xi_b = g_b - g_bar``: the gradient ``g_b`` of minibatch
    ``b`` minus the mean gradient ``g_bar`` over the ``num_directions`` minibatches. Each is the
    part of an SGD step that the minibatch's noise contributes, so the probe moves the parameters
    by ``delta_b = -lr * xi_b`` (the size of one optimizer step with learning rate ``lr``) and
    reports::

        A = (rms_b |J(theta + delta_b) - J(theta)| / |J(theta)|) / (rms_b |L(theta + delta_b) - L(theta)| / |L(theta)|)

    ``J`` is ``metric(model)`` (evaluated in eval mode under ``no_grad`` with forked RNGs),
    ``L`` the objective's loss on its whole batch.

    What it estimates: consecutive SGD iterates differ by ``-lr (g_bar + xi_t)``; across iterates
    the mean step is common and the fluctuation is ``-lr xi_t``, so to first order
    ``std(dJ) ~ lr * rms(grad J . xi)`` and ``std(dL) ~ lr * rms(grad L . xi)``. The probe
    therefore estimates the history-based :func:`variance_amplification` at the current
    parameters, by finite differences (it also sees curvature along ``xi`` that a first-order
    estimate would miss), for plain SGD steps with no momentum; for other optimizers pass the
    effective step size as ``lr``. It does not see how the noise accumulates over many steps: in
    the behaviour-cloning demo (``dynscope demo gva``) the history-based ratio separates the unstable
    system (about 7) from the stable one (about 1) while the probe gives about 6 for both.

    The model's parameters are shifted in place and written back exactly (bit for bit) after
    each evaluation; gradients come from the objective (``.grad`` is not touched).

    Args:
        objective: the loss; its batch is the data the mean gradient and ``L`` are taken over.
        metric: ``metric(model) -> float``, the long-horizon metric (see :mod:`dynscope.rollouts`).
        lr: the step size (learning rate).
        minibatch_size: sample minibatches of this size from the objective's batch (without
            replacement within a minibatch) ...
        batches: ... or give the minibatches explicitly (``num_directions`` is then their count).
        num_directions: how many minibatches (noise directions) to sample (>= 2).
        seed: seed of the minibatch sampling.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> obj = Objective(model, nn.functional.mse_loss, (x, y))
        >>> probe = amplification_probe(obj, lambda m: float(m.weight.sum() ** 2), lr=0.1, minibatch_size=8)
        >>> probe.num_directions, probe.amplification > 0
        (8, True)
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if batches is None:
        if minibatch_size is None:
            raise ValueError("give minibatch_size (minibatches are sampled from the objective's batch) or batches")
        if num_directions < 2:
            raise ValueError(f"num_directions must be >= 2 (the noise is measured against their mean), got {num_directions}")
        generator = torch.Generator().manual_seed(seed)
        batches = _minibatches(objective.batch, int(minibatch_size), num_directions, generator)
    elif len(batches) < 2:
        raise ValueError(f"need at least 2 minibatches, got {len(batches)}")
    model = objective.model
    names = list(objective.params)
    grads = [_gradient(objective, b) for b in batches]
    mean = OrderedDict((n, sum(g[n] for g in grads) / len(grads)) for n in names)

    base_loss = float(objective.value())
    base_metric = evaluate_metric(metric, model)
    metric_changes, loss_changes, norms = [], [], []
    for g in grads:
        delta = OrderedDict((n, -lr * (g[n] - mean[n])) for n in names)
        norms.append(math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values())))
        with _shifted(model, delta):
            metric_changes.append(evaluate_metric(metric, model) - base_metric)
            loss_changes.append(float(objective.value()) - base_loss)
    rms = lambda v: math.sqrt(sum(x * x for x in v) / len(v))  # noqa: E731
    metric_change = _ratio(rms(metric_changes), abs(base_metric))
    loss_change = _ratio(rms(loss_changes), abs(base_loss))
    if math.isinf(loss_change):
        amplification = 0.0 if math.isfinite(metric_change) else math.nan
    else:
        amplification = _ratio(metric_change, loss_change) if math.isfinite(metric_change) else math.inf
    return ProbeResult(
        amplification=amplification, metric_change=metric_change, loss_change=loss_change, metric=base_metric,
        loss=base_loss, step_norm=sum(norms) / len(norms), num_directions=len(grads),
    )


def _gradient(objective: Objective, batch: Any) -> "OrderedDict[str, torch.Tensor]":
    with objective.measuring():
        params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in objective.params.items())
        loss = check_finite(objective.loss(params, batch), "the minibatch loss")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return OrderedDict((n, torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads))


# -- the EMA that damps it ----------------------------------------------------------------------

EMA_WARMUPS = ("inverse", "polynomial", "none")


def ema_decay(t: int, decay: float = 0.99, warmup: str = "inverse", power: float = 0.75) -> float:
    """The decay of an EMA of the iterates at its ``t``-th update (``t >= 1``; update 0 copies).

    ``theta_bar <- decay_t * theta_bar + (1 - decay_t) * theta``, i.e. ``beta_t = 1 - decay_t`` in
    the notation of the design notes. The warm-up keeps a young average from being dominated by
    the weights it was started from:

    * ``"inverse"``: ``decay_t = min(decay, (1 + t) / (10 + t))``;
    * ``"polynomial"``: ``decay_t = min(decay, 1 - (1 + t) ** -power)``;
    * ``"none"``: ``decay_t = decay``.

    Example:
        >>> ema_decay(1), ema_decay(1000)
        (0.18181818181818182, 0.99)
        >>> ema_decay(3, decay=0.999, warmup="polynomial", power=1.0)
        0.75
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if warmup not in EMA_WARMUPS:
        raise ValueError(f"warmup must be one of {EMA_WARMUPS}, got {warmup!r}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    if t < 1:
        raise ValueError(f"t counts updates after the first (which copies), so t >= 1; got {t}")
    if warmup == "inverse":
        return min(decay, (1.0 + t) / (10.0 + t))
    if warmup == "polynomial":
        return min(decay, 1.0 - (1.0 + t) ** -power)
    return decay


class WarmupEMA:
    """The EMA update with the warm-up schedule of :func:`ema_decay`, as ``multi_avg_fn`` for
    :class:`torch.optim.swa_utils.AveragedModel` (non-float buffers are copied).

    ``averaged <- d_t averaged + (1 - d_t) current`` in place, ``d_t = ema_decay(t, decay, warmup,
    power)`` at the ``t``-th update after the first (which ``AveragedModel`` makes a copy).

    Example:
        >>> import torch
        >>> from torch.optim.swa_utils import AveragedModel
        >>> net = torch.nn.Linear(1, 1, bias=False)
        >>> ema = AveragedModel(net, multi_avg_fn=WarmupEMA(decay=0.5, warmup="none"))
        >>> for value in (1.0, 3.0, 5.0):
        ...     _ = net.weight.data.fill_(value)
        ...     ema.update_parameters(net)
        >>> ema.module.weight.item()   # 1, then 0.5*1 + 0.5*3 = 2, then 0.5*2 + 0.5*5
        3.5
    """

    def __init__(self, decay: float = 0.99, warmup: str = "inverse", power: float = 0.75) -> None:
        ema_decay(1, decay, warmup, power)  # validates
        self.decay, self.warmup, self.power = decay, warmup, power

    @torch.no_grad()
    def __call__(self, averaged: List[torch.Tensor], current: List[torch.Tensor], num_averaged) -> None:
        d = ema_decay(int(num_averaged), self.decay, self.warmup, self.power)
        floats = [(a, c) for a, c in zip(averaged, current) if torch.is_floating_point(a)]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current):
            if not torch.is_floating_point(a):
                a.copy_(c)


# -- the window statistics AutoEMA decides on ------------------------------------------------------------


def change_spread(values: Sequence[float]) -> float:
    """``std(dv)``: the population standard deviation of the consecutive changes (``nan`` with fewer than 2).

    Example:
        >>> change_spread([1.0, 3.0, 1.0, 3.0])   # d = [2, -2, 2]: mean 2/3, std sqrt(32/9)
        1.8856180831641267
    """
    v = [float(x) for x in values]
    d = [b - a for a, b in zip(v, v[1:])]
    return statistics.pstdev(d) if len(d) > 1 else math.nan


@dataclass(frozen=True)
class EMAWindow:
    """The long-horizon metric under the online and the EMA weights over one window of evaluations.

    Attributes:
        swing: relative swing ``std(dJ) / |mean J|`` of the online metric (:func:`relative_swing`).
        swing_ema: the same for the metric at the EMA weights.
        ema_swing_ratio: ``std(dJ_online) / std(dJ_ema)``: how many times steadier the EMA is
            (``inf`` when only the online metric moves, ``nan`` when neither does).
        amplification_ema: :func:`variance_amplification` of the EMA's metric against the losses.
        mean, mean_ema: the metric's mean under the online and the EMA weights.
    """

    swing: float
    swing_ema: float
    ema_swing_ratio: float
    amplification_ema: float
    mean: float
    mean_ema: float

    @property
    def value(self) -> float:
        """``ema_swing_ratio`` (the headline value, as every result's ``.value``)."""
        return self.ema_swing_ratio

    def metrics(self) -> Dict[str, float]:
        """The logged metrics: ``swing``, ``swing_ema``, ``ema_swing_ratio``, ``amplification_ema``."""
        return {"swing": self.swing, "swing_ema": self.swing_ema, "ema_swing_ratio": self.ema_swing_ratio,
                "amplification_ema": self.amplification_ema}

    def steadier(self, factor: float = 3.0, min_swing: float = 0.005, tolerance: float = 0.02,
                 higher_is_better: bool = False) -> bool:
        """Whether evaluating at the EMA pays: it is ``factor`` times steadier, the online metric
        swings by at least ``min_swing``, and the EMA's mean is no worse than ``tolerance |mean J|``.

        Example:
            >>> w = ema_window([10.0, 12.0, 10.0, 12.0], [11.0, 11.2, 11.0, 11.2], [1.0, 1.01, 1.0, 1.01])
            >>> round(w.ema_swing_ratio, 6), w.steadier(factor=3.0), w.steadier(factor=20.0)
            (10.0, True, False)
            >>> w.steadier(tolerance=0.0), w.steadier(tolerance=0.0, higher_is_better=True)   # mean 11.1 vs 11
            (False, True)
        """
        if not self.ema_swing_ratio >= factor or not self.swing >= min_swing:
            return False
        slack = tolerance * abs(self.mean)
        return self.mean_ema >= self.mean - slack if higher_is_better else self.mean_ema <= self.mean + slack


def ema_window(
    long_horizon_values: Sequence[float], long_horizon_values_ema: Sequence[float], losses: Sequence[float]
) -> EMAWindow:
    """Compare the metric's swing under the online and the EMA weights over one window (>= 3 evaluations each).

    ``long_horizon_values`` and ``long_horizon_values_ema`` are ``J`` at the online and at the EMA
    weights at the same evaluations, ``losses`` the training losses there (the amplification of the
    EMA's metric is against the same loss).

    Example:
        >>> w = ema_window([10.0, 12.0, 10.0, 12.0], [11.0, 11.2, 11.0, 11.2], [1.0, 1.01, 1.0, 1.01])
        >>> round(w.swing, 6), round(w.swing_ema, 6), round(w.ema_swing_ratio, 6)   # std(dJ) = 4*sqrt(2)/3, std(dJ_ema) a tenth
        (0.17142, 0.016988, 10.0)
    """
    online, averaged = change_spread(long_horizon_values), change_spread(long_horizon_values_ema)
    ratio = online / averaged if averaged > 0 else (math.inf if online > 0 else math.nan)
    return EMAWindow(
        swing=relative_swing(long_horizon_values), swing_ema=relative_swing(long_horizon_values_ema),
        ema_swing_ratio=ratio, amplification_ema=variance_amplification(long_horizon_values_ema, list(losses)),
        mean=statistics.fmean(long_horizon_values), mean_ema=statistics.fmean(long_horizon_values_ema),
    )


class AmplificationWindow:
    """The running window of evaluations behind variance amplification (as :class:`dynscope.SpikeDetector`
    is for spikes): the last ``size`` values of the long-horizon metric ``J``, the loss ``L``, their
    steps and ``J`` at an EMA of the weights, and the statistics over them.

    :meth:`add` records an evaluation and returns ``metric``, ``loss`` and, over a full window,
    ``amplification``; :meth:`add_ema` then records ``J`` at the EMA weights and returns
    ``metric_ema``, ``swing`` (full window) and the :class:`EMAWindow` metrics (both windows full),
    keeping that :class:`EMAWindow` as ``last_ema``.

    Example:
        >>> w = AmplificationWindow(3)
        >>> for j, loss, j_ema in [(10.0, 1.0, 11.0), (12.0, 1.01, 11.2), (10.0, 1.0, 11.0)]:
        ...     out = w.add(j, loss)
        ...     out.update(w.add_ema(j_ema))
        >>> round(out["amplification"], 6) == round(variance_amplification([10, 12, 10], [1.0, 1.01, 1.0]), 6)
        True
        >>> round(out["ema_swing_ratio"], 6), w.last_ema is not None
        (10.0, True)
    """

    def __init__(self, size: int) -> None:
        if int(size) != size or size < 3:
            raise ValueError(f"window must be an integer >= 3 (two differences at least), got {size!r}")
        self.size = int(size)
        self.metrics: Deque[float] = deque(maxlen=self.size)
        self.losses: Deque[float] = deque(maxlen=self.size)
        self.steps: Deque[Any] = deque(maxlen=self.size)
        self.metrics_ema: Deque[float] = deque(maxlen=self.size)
        self.last_ema: Optional[EMAWindow] = None

    @property
    def full(self) -> bool:
        return len(self.metrics) == self.size

    def add(self, metric: float, loss: float, step: Any = None) -> Dict[str, float]:
        """Record ``J`` and ``L`` of one evaluation; ``amplification`` once the window is full."""
        self.last_ema = None
        self.metrics.append(metric)
        self.losses.append(loss)
        self.steps.append(step)
        out = {"metric": metric, "loss": loss}
        if self.full:
            out["amplification"] = variance_amplification(self.metrics, self.losses)
        return out

    def add_ema(self, metric_ema: float) -> Dict[str, float]:
        """Record ``J`` at the EMA weights for the evaluation just :meth:`add`-ed."""
        self.metrics_ema.append(metric_ema)
        out = {"metric_ema": metric_ema}
        if self.full:
            out["swing"] = relative_swing(self.metrics)
            if len(self.metrics_ema) == self.size:
                self.last_ema = ema_window(self.metrics, self.metrics_ema, self.losses)
                out.update(self.last_ema.metrics())
        return out

    def clear(self) -> None:
        """Start a new window (e.g. when the spacing of the evaluations changes)."""
        for series in (self.metrics, self.losses, self.steps, self.metrics_ema):
            series.clear()
        self.last_ema = None

    def state_dict(self) -> Dict[str, list]:
        return {"metrics": list(self.metrics), "losses": list(self.losses), "steps": list(self.steps),
                "metrics_ema": list(self.metrics_ema)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name in ("metrics", "losses", "steps", "metrics_ema"):
            getattr(self, name).clear()
            getattr(self, name).extend(state.get(name, []))
        self.last_ema = None
