"""Loss-spike forensics: a robust spike rule and the "opposing signals" along the sharpest direction.

Rosenfeld & Risteski 2023, "Outliers with opposing signals have an outsized effect on neural
network optimization": loss spikes come from small groups of samples whose gradients point in
opposite directions along the top Hessian eigenvector; the step along that sharp direction
overshoots for one group and the loss of the other jumps. :func:`opposing_signals` computes, on
one batch at the current weights: the top Hessian eigenvalue and eigenvector ``v`` (Lanczos on
batched HVPs), each sample's gradient projection ``g_i . v`` (one forward-mode pass over the
per-sample losses; ``v`` oriented so that the batch gradient's projection is >= 0) and the samples
with the largest projections of either sign.

:class:`SpikeDetector` is the rule: a loss is a spike when it exceeds the median of the last
``window`` losses by more than ``k`` robust standard deviations (``1.4826 * MAD``, floored at
``1e-3 * |median|`` so that a flat plateau does not make every wiggle a spike) and by more than
``min_jump`` in absolute terms (a loss near zero wiggles by many robust deviations without
anything happening), once ``min_history`` losses are known.

Example:
    >>> d = SpikeDetector(k=6.0, window=20, min_history=5)
    >>> [d.update(x)[0] for x in [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 4.0]]
    [False, False, False, False, False, False, True]
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch
from torch.func import jvp

from .eigen import top_eigenvalues
from .metrics import SPIKES as METRICS  # noqa: F401 - what this diagnostic logs (declared in dynscope.metrics)
from .objective import Objective, check_finite
from .persample import per_sample_grads

__all__ = ["METRICS", "SpikeDetector", "SpikeSnapshot", "opposing_signals", "sample_projections"]


class SpikeDetector:
    """Robust running statistics of a loss and the spike rule (see the module docstring)."""

    def __init__(self, k: float = 6.0, window: int = 50, min_history: int = 20, rel_floor: float = 1e-3,
                 min_jump: float = 0.01) -> None:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if window < 3 or not 3 <= min_history <= window:
            raise ValueError(f"need window >= min_history >= 3, got window={window}, min_history={min_history}")
        self.k, self.window, self.min_history, self.rel_floor = float(k), int(window), int(min_history), float(rel_floor)
        self.min_jump = float(min_jump)
        self.values: Deque[float] = deque(maxlen=self.window)

    def stats(self) -> Tuple[float, float]:
        """``(median, robust std)`` of the window (``nan`` while it is empty)."""
        if not self.values:
            return math.nan, math.nan
        median = statistics.median(self.values)
        mad = statistics.median(abs(v - median) for v in self.values)
        return median, max(1.4826 * mad, self.rel_floor * abs(median), 1e-12)

    def update(self, loss: float) -> Tuple[bool, float]:
        """Judge ``loss`` against the window so far, then add it; ``(is spike, robust z-score)``.

        A non-finite loss counts as a spike (once there is history) and is not added.
        """
        median, scale = self.stats()
        ready = len(self.values) >= self.min_history
        if not math.isfinite(loss):
            return ready, math.inf
        z = (loss - median) / scale if self.values else 0.0
        self.values.append(float(loss))
        return ready and z > self.k and loss - median > self.min_jump, z

    def state_dict(self) -> Dict[str, Any]:
        return {"values": list(self.values)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.values = deque((float(v) for v in state.get("values", [])), maxlen=self.window)


def sample_projections(objective: Objective, direction: "OrderedDict[str, torch.Tensor]") -> torch.Tensor:
    """``g_i . v`` for every sample: the directional derivative of each per-sample loss along ``v``.

    One forward-mode pass (``torch.func.jvp`` of the per-sample losses); models whose ops have no
    forward-mode rule fall back to per-sample gradients (``vmap(grad)``).
    """
    try:
        with objective.measuring():
            _, tangent = jvp(lambda p: objective.sample_losses(p), (objective.params,), (direction,))
        return check_finite(tangent.detach(), "a per-sample gradient projection")
    except (RuntimeError, NotImplementedError):
        grads = per_sample_grads(objective)
        return sum((grads[n].flatten(1) * direction[n].flatten()).sum(1) for n in direction)


@dataclass
class SpikeSnapshot:
    """What :func:`opposing_signals` found on one batch.

    Attributes:
        lambda_max: top Hessian eigenvalue of the batch loss.
        projections: ``[B]`` per-sample gradient projections on the top eigenvector ``v``
            (``v`` oriented so that their mean, the batch gradient's projection, is >= 0).
        losses: ``[B]`` per-sample losses.
        positive, negative: indices of the ``top_k`` largest and most negative projections.
        eigenvector: ``v`` as a flat ``[n]`` tensor.
    """

    lambda_max: float
    projections: torch.Tensor
    losses: torch.Tensor
    positive: List[int]
    negative: List[int]
    eigenvector: torch.Tensor = field(repr=False)
    converged: bool = True

    @property
    def grad_projection(self) -> float:
        """``g . v`` of the batch gradient (the mean of the projections)."""
        return float(self.projections.mean())

    @property
    def opposition(self) -> float:
        """``1 - |sum_i p_i| / sum_i |p_i|``: 0 when all samples pull the same way along ``v``,
        near 1 when large opposing projections cancel (Rosenfeld & Risteski's opposing signals)."""
        total = float(self.projections.abs().sum())
        return 1.0 - abs(float(self.projections.sum())) / total if total > 0 else 0.0

    def metrics(self) -> Dict[str, float]:
        p = self.projections
        return {
            "lambda_max": self.lambda_max,
            "grad_projection": self.grad_projection,
            "opposition": self.opposition,
            "top_positive": float(p.max()),
            "top_negative": float(p.min()),
            "projection_std": float(p.std()) if p.numel() > 1 else 0.0,
        }


def opposing_signals(
    objective: Objective,
    *,
    top_k: int = 5,
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> SpikeSnapshot:
    """The top Hessian eigenpair of ``objective`` and each sample's gradient projection on it.

    ``reduce`` averages HVPs over data-parallel ranks (the eigenvector is then the global one,
    the same on every rank); the projections are of the local samples.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1)
        >>> obj = Objective(model, nn.functional.mse_loss, (torch.randn(8, 3), torch.randn(8, 1)))
        >>> snap = opposing_signals(obj, top_k=2)
        >>> snap.projections.shape, len(snap.positive), snap.grad_projection >= 0
        (torch.Size([8]), 2, True)
    """
    eig = top_eigenvalues(objective, k=1, which="LA", tol=tol, max_iter=max_iter, seed=seed,
                          return_eigenvectors=True, reduce=reduce)
    v = eig.eigenvectors[0].to(objective.dtype)
    direction = objective.layout.unflatten(v)
    projections = sample_projections(objective, direction)
    mean = projections.mean()
    if reduce is not None:
        mean = reduce(mean.reshape(1))[0]
    if float(mean) < 0:
        projections, v = -projections, -v
    with objective.measuring(), torch.no_grad():
        losses = objective.sample_losses().detach()
    k = min(top_k, projections.numel())
    order = torch.argsort(projections)
    return SpikeSnapshot(
        lambda_max=float(eig.value), projections=projections.detach(), losses=losses,
        positive=order.flip(0)[:k].tolist(), negative=order[:k].tolist(), eigenvector=v.detach(),
        converged=bool(eig.converged),
    )
