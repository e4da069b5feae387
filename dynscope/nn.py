"""StableMax and a cross-entropy whose normalisation can be switched at run time.

StableMax (Prieto et al. 2025, "Grokking at the edge of numerical stability") replaces the
exponential of softmax by ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` for ``x < 0``:

    StableMax(x)_i = s(x_i) / sum_j s(x_j)

It grows linearly instead of exponentially, so a large logit margin does not round the other
classes' probability mass away (no softmax collapse). Note ``log s(x) = sign(x) log(1 + |x|)``,
so StableMax is the softmax of those transformed logits; unlike softmax it is not invariant to
shifting the logits.

Everything here is computed in float64 and returned in the input's dtype (float64 inputs stay
float64), so the loss has the dtype the usual cross-entropy would have; gradients flow back
through the float64 computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossEntropy", "StableMaxCrossEntropy", "log_stablemax", "stablemax", "stablemax_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")
MODES = ("softmax", "stablemax")


def _check_float(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")


def _log_s(x: torch.Tensor) -> torch.Tensor:
    # The clamps keep the branch torch.where does not select finite (1/(1-x) blows up at x = 1),
    # so its zero gradient is not multiplied by inf.
    positive = torch.log1p(x.clamp(min=0))
    negative = -torch.log1p(-x.clamp(max=0))
    return torch.where(x >= 0, positive, negative)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log StableMax(x)`` along ``dim``, computed in float64, returned in ``x``'s dtype.

    Example:
        >>> log_stablemax(torch.tensor([1.0, -1.0], dtype=torch.float64)).exp()
        tensor([0.8000, 0.2000], dtype=torch.float64)
    """
    _check_float(x, "x")
    s = _log_s(x.double())
    # log(sum_j s_j) from the s_j themselves: s_j >= 1/(1 - x_j) > 0, no overflow for finite x
    return (s - s.exp().sum(dim=dim, keepdim=True).log()).to(x.dtype)


def stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax along ``dim``: ``s(x_i) / sum_j s(x_j)``; float64 inside, ``x``'s dtype out.

    Example:
        >>> stablemax(torch.tensor([1.0, -1.0]))
        tensor([0.8000, 0.2000])
        >>> stablemax(torch.tensor([[0.0, 0.0], [3.0, -3.0]]), dim=1)
        tensor([[0.5000, 0.5000],
                [0.9412, 0.0588]])
    """
    _check_float(x, "x")
    xd = x.double()
    s = torch.where(xd >= 0, xd.clamp(min=0) + 1, 1 / (1 - xd.clamp(max=0)))
    return (s / s.sum(dim=dim, keepdim=True)).to(x.dtype)


def _classes_last(logits: torch.Tensor, targets: torch.Tensor):
    """Torch's cross-entropy layouts -> ``([N, C] logits, [N] targets or [N, C] probabilities)``."""
    if logits.dim() == 0:
        raise ValueError("logits must have a class dimension, got a scalar")
    soft = targets.is_floating_point()
    if logits.dim() == 1:  # one sample: [C] with a scalar index or [C] probabilities
        logits, targets = logits.unsqueeze(0), targets.unsqueeze(0)
    else:  # [N, C, d1, ...] -> [N * d1 * ..., C]
        logits = logits.movedim(1, -1)
        if soft:
            targets = targets.movedim(1, -1)
    expected = logits.shape if soft else logits.shape[:-1]
    if tuple(targets.shape) != tuple(expected):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not fit logits of shape {tuple(logits.shape)} "
            "(torch's cross-entropy layout: logits [N, C, ...] with class indices [N, ...] or probabilities [N, C, ...])"
        )
    c = logits.shape[-1]
    return logits.reshape(-1, c), targets.reshape(-1, c) if soft else targets.reshape(-1)


def stablemax_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", ignore_index: int = -100
) -> torch.Tensor:
    """Cross-entropy with StableMax instead of softmax: ``-log StableMax(logits)[target]``.

    Same layouts and semantics as ``F.cross_entropy`` (class dimension 1, class indices or class
    probabilities, ``ignore_index`` for indices, ``"mean"`` averaging over the non-ignored
    targets). Computed in float64; returned in the logits' dtype.

    Example:
        >>> stablemax_cross_entropy(torch.tensor([[1.0, -1.0]]), torch.tensor([0]))  # -log(0.8)
        tensor(0.2231)
    """
    _check_float(logits, "logits")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    out_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    rows, labels = _classes_last(logits, targets)
    logp = log_stablemax(rows.double(), dim=-1)
    if labels.is_floating_point():
        losses = -(labels.double() * logp).sum(-1)
        count = torch.tensor(float(losses.numel()), dtype=torch.float64)
    else:
        labels = labels.long()
        keep = labels != ignore_index
        bad = keep & ((labels < 0) | (labels >= rows.shape[-1]))
        if bool(bad.any()):
            raise ValueError(f"targets must be class indices in [0, {rows.shape[-1]}) or ignore_index={ignore_index}")
        picked = logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
        losses = torch.where(keep, -picked, torch.zeros_like(picked))
        count = keep.sum().double()
    if reduction == "none":
        return losses.reshape(out_shape).to(logits.dtype)
    total = losses.sum()
    return (total if reduction == "sum" else total / count).to(logits.dtype)


class StableMaxCrossEntropy(nn.Module):
    """Cross-entropy with StableMax: a drop-in for ``nn.CrossEntropyLoss`` that cannot softmax-collapse.

    Args:
        reduction: ``"mean"`` (over non-ignored targets), ``"sum"`` or ``"none"``.
        ignore_index: a target index that is left out, as in torch's cross-entropy.

    Computed in float64, returned in the logits' dtype. Reference: Prieto et al. 2025.

    Example:
        >>> loss = StableMaxCrossEntropy(reduction="none")
        >>> loss(torch.tensor([[1.0, -1.0], [1.0, -1.0]]), torch.tensor([0, 1]))  # -log 0.8, -log 0.2
        tensor([0.2231, 1.6094])
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return stablemax_cross_entropy(logits, targets, self.reduction, self.ignore_index)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class CrossEntropy(nn.Module):
    """Cross-entropy whose normalisation (``"softmax"`` or ``"stablemax"``) can be switched at run time.

    Use it as a model's loss; :class:`dynscope.callbacks.AutoStableMax` flips ``mode`` to
    ``"stablemax"`` when softmax collapse sets in. ``"softmax"`` is exactly
    ``F.cross_entropy``; ``"stablemax"`` is :func:`stablemax_cross_entropy`.

    Args:
        mode: ``"softmax"`` or ``"stablemax"``; assignable later (``loss.mode = "stablemax"``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: as in torch's cross-entropy.
        z_loss: coefficient of the z-loss ``z_loss * (logsumexp(logits))^2`` added per sample in
            either mode (PaLM, Wortsman et al. 2023: ``1e-4``; reduced like the loss);
            assignable later: :class:`dynscope.callbacks.AutoZLoss` sets it when ``log Z`` drifts.

    The mode is not part of the module's ``state_dict`` (loading weights saved with a plain
    ``nn.CrossEntropyLoss`` keeps working); AutoStableMax restores it on resume.

    Example:
        >>> loss = CrossEntropy()
        >>> logits, y = torch.tensor([[1.0, -1.0]]), torch.tensor([0])
        >>> loss(logits, y)             # softmax: -log(e / (e + 1/e))
        tensor(0.1269)
        >>> loss.mode = "stablemax"
        >>> loss(logits, y)             # -log(0.8)
        tensor(0.2231)
    """

    def __init__(self, mode: str = "softmax", reduction: str = "mean", ignore_index: int = -100, z_loss: float = 0.0) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.mode = mode
        self.z_loss = float(z_loss)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"CrossEntropy mode must be one of {MODES}, got {value!r}")
        self._mode = value

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._mode == "stablemax":
            loss = stablemax_cross_entropy(logits, targets, self.reduction, self.ignore_index)
        else:
            loss = F.cross_entropy(logits, targets, reduction=self.reduction, ignore_index=self.ignore_index)
        if getattr(self, "z_loss", 0.0):
            from .logits import z_loss

            loss = loss + self.z_loss * z_loss(logits, targets, self.reduction, self.ignore_index)
        return loss

    def extra_repr(self) -> str:
        z = f", z_loss={self.z_loss:g}" if getattr(self, "z_loss", 0.0) else ""
        return f"mode={self._mode!r}, reduction={self.reduction!r}{z}"
