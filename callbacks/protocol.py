"""How a LightningModule tells dynscope its loss (and its logits).

dynscope never re-runs ``training_step`` (that would repeat its ``self.log`` calls and side
effects). It asks the module, in this order:

1. ``module.dynscope_loss(batch) -> Tensor[B]``: per-sample losses for any batch structure
   (return a scalar for a loss that is not a mean over samples; then only curvature works).
2. the callback's ``loss_fn=`` argument, ``loss_fn(module(x), y)`` on ``(x, y)`` batches.
3. a ``loss_fn`` or ``criterion`` attribute of the module, used like 2.

Logits (for the softmax-collapse checks) come from ``module.dynscope_logits(batch) -> (logits,
targets)``, or ``module(x)`` and ``y`` on ``(x, y)`` batches.

Any ``self.log``/``self.log_dict`` call made while dynscope evaluates the module is dropped.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import nn

from dynscope.objective import Objective

PROTOCOL_HELP = (
    "tell dynscope the loss in one of three ways: define `dynscope_loss(self, batch)` on the "
    "LightningModule returning per-sample losses; pass `loss_fn=` to the callback (called as "
    "loss_fn(module(x), y) on (x, y) batches); or give the module a `loss_fn` or `criterion` attribute"
)


class LossProtocolError(TypeError):
    """The module does not say how to compute its loss, or the batch does not fit."""


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)


def _describe(batch: Any) -> str:
    """What a batch that is not an ``(x, y)`` pair with a tensor ``x`` is, for error messages."""
    if not isinstance(batch, (tuple, list)):
        return f"a batch of type {type(batch).__name__}"
    if len(batch) != 2:
        return f"a {type(batch).__name__} of length {len(batch)}"
    inputs = batch[0]
    what = f"a {type(inputs).__name__}" + (f" of {len(inputs)}" if isinstance(inputs, (tuple, list, dict)) else "")
    return f"an (x, y) pair whose x is {what}, not a tensor (dynscope would call module(x) with it as one argument)"


def find_loss_fn(module: nn.Module, loss_fn: Optional[Callable] = None) -> Optional[Callable]:
    """The ``loss_fn(outputs, targets)`` to use, or ``None`` when the module defines ``dynscope_loss``."""
    if callable(getattr(module, "dynscope_loss", None)):
        return None
    if loss_fn is not None:
        return loss_fn
    for name in ("loss_fn", "criterion"):
        candidate = getattr(module, name, None)
        if callable(candidate):
            return candidate
    raise LossProtocolError(f"{type(module).__name__} has no loss dynscope can use: {PROTOCOL_HELP}")


def module_objective(
    module: nn.Module,
    batch: Any,
    loss_fn: Optional[Callable] = None,
    *,
    mode: str = "eval",
    param_names=None,
) -> Objective:
    """An :class:`~dynscope.Objective` for ``module`` on ``batch`` following the protocol above."""
    fn = find_loss_fn(module, loss_fn)
    if fn is None:
        return Objective(
            module, sample_loss_fn=lambda m, b: m.dynscope_loss(b), batch=batch, mode=mode, param_names=param_names
        )
    if not _is_pair(batch):
        raise LossProtocolError(
            f"with a loss_fn dynscope calls loss_fn(module(x), y) on (x, y) batches with a tensor x; got "
            f"{_describe(batch)}; for other batch structures define `dynscope_loss(self, batch)` returning "
            "per-sample losses on the LightningModule"
        )
    return Objective(module, fn, tuple(batch), mode=mode, param_names=param_names)


def module_logits(module: nn.Module, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` for ``batch``: ``module.dynscope_logits(batch)`` or ``(module(x), y)``."""
    hook = getattr(module, "dynscope_logits", None)
    if callable(hook):
        out = hook(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise LossProtocolError("dynscope_logits(batch) must return (logits, targets)")
        return out[0], out[1]
    if not _is_pair(batch):
        raise LossProtocolError(
            f"to read logits dynscope needs (x, y) batches with a tensor x, got {_describe(batch)}; or define "
            "`dynscope_logits(self, batch) -> (logits, targets)` on the LightningModule"
        )
    return module(batch[0]), batch[1]


@contextlib.contextmanager
def quiet_logging(module: nn.Module) -> Iterator[None]:
    """Drop ``module.log``/``module.log_dict`` calls made inside (dynscope's own evaluations)."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    for name in ("log", "log_dict"):
        if hasattr(module, name):
            object.__setattr__(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                object.__setattr__(module, name, saved[name])
            else:
                module.__dict__.pop(name, None)
