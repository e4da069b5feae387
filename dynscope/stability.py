"""Edge-of-stability thresholds derived from the optimizer's actual update rule.

On a quadratic with Hessian ``H`` the optimizer's step is a linear map of ``(theta, momentum)``;
it is stable when that map's spectral radius is below 1. Along an eigendirection with
curvature ``lambda`` (``a = lr * lambda``), torch's update rules give:

* SGD, momentum ``mu``, dampening ``tau``: the buffer is ``b <- mu b + (1 - tau) g``, the step
  ``-lr b``: characteristic polynomial ``z^2 - (1 + mu - (1 - tau) a) z + mu``, stable for
  ``a < (2 + 2 mu) / (1 - tau)`` (Cohen et al. 2021's ``(2 + 2 beta) / lr`` at ``tau = 0``).
  torch ignores dampening when ``mu = 0`` (no buffer).
* SGD with Nesterov: the step is ``-lr (g + mu b)``: polynomial
  ``z^2 - (1 + mu)(1 - a) z + mu (1 - a)``, stable for ``a < (2 + 2 mu) / (1 + 2 mu)``
  (13.57 instead of 38 at ``lr = 0.1``, ``mu = 0.9``).
* L2 ``weight_decay`` of SGD and Adam adds ``wd I`` to the Hessian the step sees.
* Adam (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"): with the
  preconditioner frozen, the step is ``-lr P^{-1} m`` with ``m <- beta1 m + (1 - beta1) g`` and
  ``P = (1 - beta1^t) (sqrt(v_hat) + eps)`` (the first-moment bias correction is part of ``P``).
  This is heavy ball with dampening ``beta1`` on ``P^{-1} H``: stable for
  ``lambda(P^{-1} H) < (2 + 2 beta1) / ((1 - beta1) lr)``. AMSGrad uses ``max_exp_avg_sq``.
* AdamW (decoupled decay ``theta <- (1 - lr wd) theta`` before the step): with ``r = 1 - lr wd``
  the polynomial's root at ``-1`` moves to ``lr (1 - beta1) lambda = (1 + beta1)(1 + r)``.

Each coordinate ``j`` thus gets a scale ``s_j`` (and a diagonal shift ``d_j`` for L2 decay) such
that the step is stable iff the largest eigenvalue of ``S^{1/2} H S^{1/2} + D`` is below 1: that
largest eigenvalue *is* the stability ratio. Parameter groups with different learning rates get
different ``s_j``; the ratio is then exact when the groups share their momentum settings (the
variables ``S^{-1/2} theta`` follow one heavy-ball recursion) and a per-group approximation
otherwise. Coordinates that the optimizer never moves (no state, or an Adam second moment that is
exactly zero: a parameter that never received a gradient) get ``s_j = 0``.

Example:
    >>> round(sgd_threshold(momentum=0.9, nesterov=True) / 0.1, 2)
    13.57
    >>> round(sgd_threshold(momentum=0.9, dampening=0.5) / 0.1, 2)
    76.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch

from .operators import OperatorWrapper

__all__ = ["StabilityScaling", "adam_threshold", "linear_stability_ratio", "minibatch_noise_factor", "sgd_threshold",
           "stability_scaling", "unwrap_optimizer"]


def sgd_threshold(momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The critical ``a = lr * lambda`` of torch's SGD on a quadratic (see the module docstring)."""
    mu = float(momentum)
    if mu == 0.0:
        return 2.0
    c = 1.0 - float(dampening)
    if c <= 0.0:
        return float("inf")
    if nesterov:
        return (2.0 + 2.0 * mu) / (1.0 + mu + mu * c)
    return (2.0 + 2.0 * mu) / c


def minibatch_noise_factor(batch_size: int, num_samples: Optional[int] = None) -> float:
    """``k = (N - B) / (B (N - 1))``: the variance of a mean over ``B`` of ``N`` samples drawn without
    replacement, relative to one sample's (``1 / B`` for ``N`` unknown or infinite).

    Example:
        >>> minibatch_noise_factor(1, 100), minibatch_noise_factor(100, 100), minibatch_noise_factor(4)
        (1.0, 0.0, 0.25)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_samples is None or num_samples <= 1:
        return 1.0 / batch_size
    b = min(batch_size, num_samples)
    return (num_samples - b) / (b * (num_samples - 1))


def linear_stability_ratio(lr: float, lambda_max: float, trace: float, batch_size: int,
                           num_samples: Optional[int] = None, critical: float = 2.0) -> float:
    """Batch-size-aware linear stability ratio of SGD: ``lr ((1 - k) lambda_max + k tr(H)) / a*``.

    Derivation: at an interpolating minimum the SGD step is ``v <- (I - lr H_B) v``. Along the top
    eigenvector ``u`` of ``H``, ``E (u^T (I - lr H_B)^2 u) <= 1`` requires
    ``lr (lambda^2 + Var(u^T H_B u)) <= 2 lambda`` with ``Var(u^T H_B u) = k Var_i(u^T H_i u)``.
    For rank-one per-sample Hessians ``H_i = x_i x_i^T`` with equal ``|x_i|^2 = tr(H)`` (the
    setting of Wu and Su 2023's ``tr(H) <= 2 / lr``), ``E_i (u^T H_i^2 u) = tr(H) lambda``, so the
    condition is ``lr ((1 - k) lambda + k tr(H)) <= 2``. It is Wu and Su's trace bound at
    ``B = 1`` (``k = 1``) and the full-batch edge of stability ``lr lambda_max <= 2`` at
    ``B = N`` (``k = 0``); ``critical`` replaces 2 by a momentum method's ``a*``
    (:func:`sgd_threshold`). At the exact mean-square stability boundary of SGD on linear
    regressions (tests/test_stability.py) the ratio is 1.00 at ``B = 1`` and full batch, at most
    1.13 in between, lower (0.5-1.0) when the samples' norms differ (the bound is then loose).

    Example:
        >>> linear_stability_ratio(0.1, lambda_max=10.0, trace=20.0, batch_size=1)     # lr tr(H) / 2
        1.0
        >>> linear_stability_ratio(0.1, lambda_max=10.0, trace=20.0, batch_size=50, num_samples=50)
        0.5
    """
    k = minibatch_noise_factor(batch_size, num_samples)
    return lr * ((1.0 - k) * lambda_max + k * trace) / critical


def adam_threshold(lr: float, beta1: float, weight_decay: float = 0.0, decoupled: bool = False) -> float:
    """The critical eigenvalue of ``P^{-1} H`` for Adam (``decoupled``: AdamW's decay).

    Example:
        >>> adam_threshold(0.01, 0.9)     # (2 + 2 * 0.9) / ((1 - 0.9) * 0.01)
        3800.0000000000005
    """
    r = 1.0 - lr * weight_decay if decoupled else 1.0
    return (1.0 + beta1) * (1.0 + r) / ((1.0 - beta1) * lr)


def unwrap_optimizer(optimizer):
    """The optimizer whose update rule applies, through dynscope's wrappers (OrthoGrad, CoordinateClip)."""
    seen = 0
    while type(optimizer).__module__.startswith("dynscope") and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


@dataclass
class StabilityScaling:
    """Per-coordinate scale ``s`` and shift ``d``: the step is stable iff ``lambda_max(S^1/2 H S^1/2 + D) < 1``.

    Attributes:
        kind: ``"sgd"`` or ``"adam"``.
        scale: ``s`` in the objective's flat layout (float64); 0 where the optimizer does not move.
        shift: ``d`` (L2 weight decay times ``s``), or None.
        threshold: the common threshold on ``lambda_max(H)`` (SGD) or ``lambda_max(P^{-1} H)``
            (Adam) when every measured coordinate shares it; None for mixed groups.
        preconditioner: Adam's ``P`` (flat, with the bias correction), for ``P^{-1} H``.
        uniform: every moved coordinate has the same ``s`` (SGD with one setting): then the
            ratio follows from ``lambda_max(H)`` without another eigen-solve.
        excluded: names of parameters the optimizer does not move (no state or never a gradient).
    """

    kind: str
    scale: torch.Tensor
    shift: Optional[torch.Tensor]
    threshold: Optional[float]
    preconditioner: Optional[torch.Tensor] = None
    uniform: bool = False
    excluded: List[str] = field(default_factory=list)
    weight_decay: float = 0.0
    #: the param group index of each coordinate (flat, -1 where the parameter is in no group)
    groups: Optional[torch.Tensor] = None


class UnsupportedOptimizer(ValueError):
    """The optimizer's update rule has no derived stability threshold here."""


def stability_scaling(optimizer, named_params: Mapping[str, torch.nn.Parameter], layout) -> StabilityScaling:
    """The :class:`StabilityScaling` of ``optimizer`` over the parameters in ``layout``.

    ``named_params`` maps the layout's names to the module's Parameters (to find their param
    group and optimizer state). Raises :class:`UnsupportedOptimizer` for update rules without a
    derivation here (NAdam, RAdam, Adamax, Adagrad, RMSprop, LBFGS, ...: no ratio is logged).

    Example:
        >>> import torch
        >>> from dynscope import ParamLayout
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
        >>> s = stability_scaling(opt, {"w": w}, ParamLayout.from_params({"w": w}))
        >>> round(s.threshold, 2), s.uniform
        (13.57, True)
    """
    optimizer = unwrap_optimizer(optimizer)
    kind = _kind(optimizer)
    by_id = {id(p): n for n, p in named_params.items()}
    pieces: Dict[str, torch.Tensor] = {}
    shifts: Dict[str, torch.Tensor] = {}
    precond: Dict[str, torch.Tensor] = {}
    thresholds, scales, decays = set(), set(), set()
    groups = list(optimizer.param_groups)
    group_of: Dict[str, int] = {}
    for index, group in enumerate(groups):
        if group.get("maximize", False):
            raise UnsupportedOptimizer("maximize=True (gradient ascent) has no edge of stability")
        lr = float(group["lr"])
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                continue
            group_of[name] = index
            if kind == "sgd":
                a = sgd_threshold(group.get("momentum", 0.0) or 0.0, group.get("dampening", 0.0) or 0.0,
                                  bool(group.get("nesterov", False)))
                s = lr / a
                pieces[name] = torch.full(p.shape, s, dtype=torch.float64)
                thresholds.add(a / lr)
                scales.add(s)
                if wd:
                    shifts[name] = torch.full(p.shape, wd * s, dtype=torch.float64)
                decays.add(wd)
                continue
            state = optimizer.state.get(p, {})
            beta1, beta2 = (float(b) for b in group["betas"])
            decoupled = kind == "adamw" or bool(group.get("decoupled_weight_decay", False))
            thr = adam_threshold(lr, beta1, wd, decoupled)
            thresholds.add(thr)
            decays.add(0.0 if decoupled else wd)
            key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
            if key not in state:
                pieces[name] = torch.zeros(p.shape, dtype=torch.float64)
                continue
            step = float(state["step"])
            v = state[key].detach().double().cpu()
            p_hat = (1.0 - beta1**step) * ((v / (1.0 - beta2**step)).sqrt() + float(group["eps"]))
            precond[name] = p_hat
            # never a gradient (v exactly 0): Adam's 1/eps there is no part of the dynamics
            pieces[name] = torch.where(v > 0, 1.0 / (p_hat * thr), torch.zeros_like(v))
            if wd and not decoupled:
                shifts[name] = wd * pieces[name]
    excluded = [n for n in layout.names if n not in pieces or not bool(pieces[n].any())]
    for name in layout.names:
        if name not in pieces:  # not in the optimizer: never moves
            pieces[name] = torch.zeros(layout.shapes_by_name[name], dtype=torch.float64)
    flat = layout.flatten(pieces, batch_dims=0).double()
    shift = None
    if shifts:
        for name in layout.names:
            shifts.setdefault(name, torch.zeros_like(pieces[name]))
        shift = layout.flatten(shifts, batch_dims=0).double()
    pre = None
    if kind != "sgd" and precond:
        for name in layout.names:
            precond.setdefault(name, torch.ones_like(pieces[name]))
        pre = layout.flatten(precond, batch_dims=0).double()
    group_index = layout.flatten(
        {n: torch.full(layout.shapes_by_name[n], group_of.get(n, -1), dtype=torch.float64) for n in layout.names},
        batch_dims=0,
    ).long()
    return StabilityScaling(
        groups=group_index,
        kind="sgd" if kind == "sgd" else "adam",
        scale=flat,
        shift=shift,
        threshold=thresholds.pop() if len(thresholds) == 1 else None,
        preconditioner=pre,
        uniform=kind == "sgd" and len(scales) == 1 and not excluded,
        excluded=excluded,
        weight_decay=decays.pop() if len(decays) == 1 else float("nan"),
    )


def _kind(optimizer) -> str:
    # exact types: subclasses (and NAdam/RAdam, which are not Adam subclasses) may step differently
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) is torch.optim.Adam:
        return "adam"
    if type(optimizer) is torch.optim.AdamW:
        return "adamw"
    raise UnsupportedOptimizer(
        f"{type(optimizer).__name__} has no derived edge-of-stability threshold (supported: SGD with momentum, "
        "dampening or Nesterov; Adam and AdamW, with AMSGrad)"
    )


class IndexOperator(OperatorWrapper):
    """The principal submatrix ``A[idx, idx]`` of an operator (e.g. one param group's coordinates)."""

    def __init__(self, op, index: torch.Tensor) -> None:
        super().__init__(op, size=int(index.numel()))
        self.index = index.to(op.device)

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(vectors.shape[0], self.op.size, dtype=vectors.dtype, device=vectors.device)
        full[:, self.index] = vectors
        return self.op.matmat(full)[:, self.index]


class StabilityOperator(OperatorWrapper):
    """``S^{1/2} A S^{1/2} + D`` for an operator ``A``, a scale ``s`` and a diagonal shift ``d``."""

    def __init__(self, op, scale: torch.Tensor, shift: Optional[torch.Tensor] = None) -> None:
        super().__init__(op)
        self.root = scale.sqrt().to(device=op.device, dtype=op.dtype)
        self.shift = None if shift is None else shift.to(device=op.device, dtype=op.dtype)

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        out = self.op.matmat(vectors * self.root) * self.root
        return out if self.shift is None else out + vectors * self.shift
