"""Reductions across data-parallel ranks, so that metrics describe the global objective."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def world_size(trainer) -> int:
    return int(getattr(trainer, "world_size", 1) or 1)


def mean_over_ranks(trainer) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A function averaging a tensor over all ranks (``None`` on a single process).

    Every rank must call it the same number of times in the same order.
    """
    if world_size(trainer) <= 1:
        return None
    strategy = trainer.strategy
    return lambda t: strategy.reduce(t.clone(), reduce_op="mean")


def sum_over_ranks(trainer) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A function summing a tensor over all ranks (``None`` on a single process)."""
    if world_size(trainer) <= 1:
        return None
    strategy = trainer.strategy
    return lambda t: strategy.reduce(t.clone(), reduce_op="sum")


def any_rank(trainer, flag: bool, device=None) -> bool:
    """Whether ``flag`` is true on at least one rank; the same answer on every rank.

    A collective under DDP: every rank must call it at the same point.
    """
    reduce = sum_over_ranks(trainer)
    if reduce is None:
        return flag
    return float(reduce(torch.tensor(float(flag), device=device))) > 0
