"""Reductions across data-parallel ranks, so that metrics describe the global objective.

**The rule for failures under DDP.** A diagnostic's measurement is a sequence of collectives
(all-reduces) with local computation in between; every rank must run the same collectives in the
same order. So every decision that changes which collectives run (skip a measurement, drop a
diagnostic, retry with a smaller chunk, switch a kernel or a mitigation) is either local and
invisible to the collectives (an out-of-memory retry halves the chunk of a local computation whose
result is reduced once), or agreed across ranks before the next collective of that measurement:

* every reduction carries a failure flag. A rank whose local part fails still joins the reduction
  it was computing for (:meth:`RankReduce.fail`, :func:`on_every_rank`), with the kind of its failure,
  and then every rank raises: the failing rank its own error, the others
  :class:`FailedOnAnotherRank` (skip this measurement) or :class:`DroppedOnAnotherRank` (the
  diagnostic does not apply: drop it). When ranks fail in different ways, the gravest kind wins;
* so inside a measurement all local work that can fail on one rank only (building the
  objective, forward and backward passes on the rank's shard, the user's metric) runs inside such a
  guard, ending in the collective it feeds; between guards only arithmetic on reduced (identical)
  values, which fails on every rank or none;
* :meth:`DiagnosticCallback.run <dynscope.callbacks.base.DiagnosticCallback.run>` ends every
  measurement with one such agreement, so a failure after the last reduction, or in a diagnostic
  without reductions, is also shared. A diagnostic is therefore skipped, or dropped, on every rank or none.

Hooks outside a measurement only touch local state, which every rank changes alike.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

from .protocol import LossProtocolError

T = TypeVar("T")

OK, SKIP, DROP = 0, 1, 2  # what a rank's failure means for the measurement, gravest last


class FailedOnAnotherRank(RuntimeError):
    """A rank's local part of a measurement failed, so every rank skips it."""


class DroppedOnAnotherRank(LossProtocolError):
    """On another rank the diagnostic found that it does not apply, so every rank drops it."""


def failure_kind(error: Optional[BaseException]) -> int:
    """``OK`` (no error), ``DROP`` (the diagnostic does not apply: a loss-protocol error) or ``SKIP``."""
    if error is None:
        return OK
    return DROP if isinstance(error, LossProtocolError) else SKIP


def _flags(error: Optional[BaseException], dtype=torch.float64, device=None) -> torch.Tensor:
    kind = failure_kind(error)
    return torch.tensor([float(kind == SKIP), float(kind == DROP)], dtype=dtype, device=device)


def raise_shared(flags: torch.Tensor, error: Optional[BaseException]) -> None:
    """Raise on every rank when any rank failed: ``flags`` are the reduced ``[skip, drop]`` flags."""
    skip, drop = (float(f) > 0 for f in flags)
    if not (skip or drop):
        if error is not None:  # cannot happen: this rank's own flag is in the sum
            raise error
        return
    if drop and failure_kind(error) != DROP:
        raise DroppedOnAnotherRank("the diagnostic does not apply on another rank") from error
    if error is not None:
        raise error
    raise FailedOnAnotherRank("the local part failed on another rank")


def world_size(trainer) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


class RankReduce:
    """An all-reduce (``"mean"`` or ``"sum"``) over the ranks that also shares failures.

    ``reduce(t)`` returns the reduced ``t``; two flags travel in the same collective, and when
    another rank failed it raises instead. A rank whose computation of ``t`` failed calls
    ``reduce.fail(like, error)`` with a tensor shaped like ``t``: it joins the collective with its
    failure flag and raises ``error``. Every rank must call it the same number of times in the
    same order.
    """

    def __init__(self, strategy, op: str) -> None:
        self.strategy = strategy
        self.op = op

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, None)

    def fail(self, like: torch.Tensor, error: BaseException) -> None:
        self._reduce(torch.zeros_like(like), error)
        raise error  # not reached: _reduce raised it

    def _reduce(self, t: torch.Tensor, error: Optional[BaseException]) -> torch.Tensor:
        # on the strategy's device: NCCL reduces CUDA tensors only, and the budget's and the
        # collapse counters' bookkeeping lives on the CPU
        device = getattr(self.strategy, "root_device", t.device)
        flat = torch.cat([t.detach().reshape(-1), _flags(error, t.dtype, t.device)]).to(device)
        total = self.strategy.reduce(flat, reduce_op=self.op).to(t.device)
        raise_shared(total[-2:], error)
        return total[:-2].reshape(t.shape)


def mean_over_ranks(trainer) -> Optional[RankReduce]:
    """A :class:`RankReduce` averaging a tensor over all ranks (``None`` on a single process)."""
    if world_size(trainer) <= 1:
        return None
    return RankReduce(trainer.strategy, "mean")


def sum_over_ranks(trainer) -> Optional[RankReduce]:
    """A :class:`RankReduce` summing a tensor over all ranks (``None`` on a single process)."""
    if world_size(trainer) <= 1:
        return None
    return RankReduce(trainer.strategy, "sum")


def reduce_computed(reduce: Optional[RankReduce], compute: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``reduce(compute())``; when ``compute`` fails, the rank still joins the reduction (as ``like``)
    and every rank raises. Without ``reduce`` (one process), just ``compute()``."""
    if reduce is None:
        return compute()
    try:
        value = compute()
    except Exception as error:  # noqa: BLE001 - shared with the other ranks, then re-raised
        reduce.fail(like, error)
        raise
    return reduce(value)


def any_rank(trainer, flag: bool, device=None) -> bool:
    """Whether ``flag`` is true on at least one rank; the same answer on every rank.

    A collective under DDP: every rank must call it at the same point.
    """
    if world_size(trainer) <= 1:
        return flag
    device = device if device is not None else getattr(trainer.strategy, "root_device", None)
    total = trainer.strategy.reduce(torch.tensor(float(flag), device=device), reduce_op="sum")
    return float(total) > 0


def on_every_rank(trainer, local: Callable[[], T], device=None) -> T:
    """``local()``, with its failure shared: if it raises on any rank, it raises on every rank.

    A measurement computes a local part, then reduces it over ranks. A rank whose local part
    failed (a non-finite loss on its shard, say) must not leave the others waiting in the
    reduction, so all ranks meet here (one small collective) and skip together, or drop the
    diagnostic together when one rank found that it does not apply (see the module docstring).
    """
    try:
        result, error = local(), None
    except Exception as caught:  # noqa: BLE001 - shared with the other ranks, then re-raised
        result, error = None, caught
    if world_size(trainer) > 1:
        device = device if device is not None else getattr(trainer.strategy, "root_device", None)
        flags = trainer.strategy.reduce(_flags(error, device=device), reduce_op="sum")
        raise_shared(flags, error)
    if error is not None:
        raise error
    return result


SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")


def unsupported_strategy(trainer) -> Optional[str]:
    """Why dynscope cannot measure under the trainer's strategy, or ``None`` when it can.

    dynscope evaluates the full model with ``torch.func.functional_call`` on every rank; under a
    sharded strategy each rank holds only a shard of the parameters.
    """
    strategy = getattr(trainer, "strategy", None)
    names = [cls.__name__ for cls in type(strategy).__mro__] if strategy is not None else []
    for name in names:
        if any(kind.lower() in name.lower() for kind in SHARDED):
            return (
                f"the {type(strategy).__name__} strategy shards the parameters across ranks, which dynscope does not "
                "support (it needs the whole model on every rank: use strategy='ddp' or a single device)"
            )
    return None
