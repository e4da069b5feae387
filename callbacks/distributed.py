"""Reductions across data-parallel ranks, so that metrics describe the global objective."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")


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


class FailedOnAnotherRank(RuntimeError):
    """A rank's local part of a measurement failed, so every rank skips it."""


def on_every_rank(trainer, local: Callable[[], T], device=None) -> T:
    """``local()``, with its failure shared: if it raises on any rank, it raises on every rank.

    A measurement computes a local part, then reduces it over ranks. A rank whose local part
    failed (a non-finite loss on its shard, say) must not leave the others waiting in the
    reduction, so all ranks meet here (one small collective) and skip together.
    """
    try:
        result, error = local(), None
    except Exception as caught:  # noqa: BLE001 - shared with the other ranks, then re-raised
        result, error = None, caught
    if world_size(trainer) > 1 and any_rank(trainer, error is not None, device):
        raise error if error is not None else FailedOnAnotherRank("the local part failed on another rank")
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
