"""Output-logit divergence: the log-partition function ``log Z`` of the output logits and the z-loss.

Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities"
(Sec. 3.2): cross-entropy only sees logit differences, so the overall level of the logits is free
to drift; at high learning rates ``log Z = logsumexp_v(z_v)`` drifts far from 0 and training
becomes unstable. The z-loss of PaLM (Chowdhery et al. 2022), ``1e-4 * (log Z)^2`` per token,
ties ``log Z`` to 0 and fixes it.

Logits here have the class (vocabulary) dimension last: ``[..., V]`` (an LM's ``[B, T, V]``).

Example:
    >>> import torch
    >>> s = output_logit_stats(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    >>> round(s.log_z_mean, 4), round(s.log_z_max, 4), s.max_logit
    (1.41, 2.1269, 2.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .metrics import LOGITS as METRICS  # noqa: F401 - what this diagnostic logs (declared in dynscope.metrics)

__all__ = ["METRICS", "LogitStats", "log_partition", "output_logit_stats", "z_loss"]


def log_partition(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log Z = logsumexp(logits)`` along ``dim``, in float32 at least (float64 stays float64)."""
    wide = torch.promote_types(logits.dtype, torch.float32)
    return torch.logsumexp(logits.to(wide), dim=dim)


@dataclass
class LogitStats:
    """Sums and extremes of ``log Z`` over ``count`` positions (they combine across batches and ranks)."""

    count: float
    log_z_sum: float
    log_z_sq_sum: float
    log_z_max: float
    log_z_min: float
    max_logit: float

    @property
    def log_z_mean(self) -> float:
        return self.log_z_sum / max(self.count, 1.0)

    @property
    def z_loss(self) -> float:
        """``mean((log Z)^2)``: the z-loss per unit coefficient."""
        return self.log_z_sq_sum / max(self.count, 1.0)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.count, self.log_z_sum, self.log_z_sq_sum, self.log_z_max, -self.log_z_min, self.max_logit],
                            dtype=torch.float64)

    @classmethod
    def from_tensors(cls, rows: torch.Tensor) -> "LogitStats":
        """Combine ``[k, 6]`` rows of :meth:`as_tensor` (e.g. gathered from every rank)."""
        rows = rows.reshape(-1, 6).double()
        return cls(float(rows[:, 0].sum()), float(rows[:, 1].sum()), float(rows[:, 2].sum()), float(rows[:, 3].max()),
                   -float(rows[:, 4].max()), float(rows[:, 5].max()))

    def metrics(self) -> Dict[str, float]:
        return {"log_z_mean": self.log_z_mean, "log_z_max": self.log_z_max, "log_z_min": self.log_z_min,
                "max_logit": self.max_logit, "z_loss": self.z_loss}


def output_logit_stats(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, ignore_index: int = -100) -> LogitStats:
    """``log Z`` statistics of class-last logits ``[..., V]``.

    Positions whose integer target equals ``ignore_index`` (padding) are left out when ``targets``
    (shaped ``[...]``) are given.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(f"logits must be a floating-point tensor [..., V], got {getattr(logits, 'shape', type(logits).__name__)}")
    with torch.no_grad():
        z = log_partition(logits.detach()).double().reshape(-1)
        top = logits.detach().amax(-1).double().reshape(-1)
        if targets is not None and isinstance(targets, torch.Tensor) and not targets.is_floating_point() \
                and targets.numel() == z.numel():
            keep = targets.reshape(-1) != ignore_index
            z, top = z[keep], top[keep]
        if z.numel() == 0:
            raise ValueError("no positions to measure (every target is ignore_index)")
        return LogitStats(float(z.numel()), float(z.sum()), float((z * z).sum()), float(z.max()), float(z.min()),
                          float(top.max()))


def z_loss(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, reduction: str = "mean",
           ignore_index: int = -100) -> torch.Tensor:
    """``(log Z)^2`` per position in torch's cross-entropy layout (classes on dim 1, or dim 0 for one sample).

    Reduced like ``F.cross_entropy``: ``"mean"`` over the positions whose index target is not
    ``ignore_index``, ``"sum"``, or ``"none"`` (zero at ignored positions). Multiply by the
    coefficient (PaLM: ``1e-4``) and add it to the loss.

    Example:
        >>> round(float(z_loss(torch.tensor([[0.0, 0.0]]))), 4)   # (log 2)^2
        0.4805
    """
    dim = 1 if logits.dim() > 1 else 0
    sq = log_partition(logits, dim).pow(2)
    keep = None
    if targets is not None and not targets.is_floating_point():
        keep = targets != ignore_index
        sq = torch.where(keep, sq, torch.zeros_like(sq))
    if reduction == "none":
        return sq.to(logits.dtype)
    if reduction == "sum":
        return sq.sum().to(logits.dtype)
    count = keep.sum().clamp(min=1) if keep is not None else sq.numel()
    return (sq.sum() / count).to(logits.dtype)
