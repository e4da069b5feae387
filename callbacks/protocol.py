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

Shapes that cannot be what the user meant raise :class:`LossProtocolError` once, before any loss is
computed on them (the diagnostic is then dropped with that message): regression outputs and targets
that torch would broadcast to ``[B, B]`` (``[B, 1]`` outputs with ``[B]`` targets under
``F.mse_loss``), class-index targets shaped ``[B, 1]`` for a cross-entropy. A ``loss_fn`` with
``reduction="sum"`` is refused at ``setup`` by the diagnostics that need per-sample losses.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
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


def find_loss_fn(module: nn.Module, loss_fn: Optional[Callable] = None, per_sample: bool = False) -> Optional[Callable]:
    """The ``loss_fn(outputs, targets)`` to use, or ``None`` when the module defines ``dynscope_loss``.

    ``per_sample=True`` (for diagnostics that need one loss per sample) also refuses a loss that
    sums over the batch (``reduction="sum"``).
    """
    if callable(getattr(module, "dynscope_loss", None)):
        return None
    found = loss_fn
    if found is None:
        for name in ("loss_fn", "criterion"):
            candidate = getattr(module, name, None)
            if callable(candidate):
                found = candidate
                break
    if found is None:
        raise LossProtocolError(f"{type(module).__name__} has no loss dynscope can use: {PROTOCOL_HELP}")
    if per_sample and _reduction(found) == "sum":
        raise LossProtocolError(
            f"the loss {_name(found)} sums over the batch (reduction='sum'): per-sample metrics need a mean loss; "
            "pass loss_fn= with reduction='mean' (the default) or define `dynscope_loss(self, batch)` returning "
            "per-sample losses"
        )
    return found


def _reduction(fn: Callable) -> Optional[str]:
    if isinstance(fn, functools.partial):
        return fn.keywords.get("reduction") or _reduction(fn.func)
    return getattr(fn, "reduction", None)


def _name(fn: Callable) -> str:
    fn = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(fn, "__name__", None) or type(fn).__name__


def _is_class_loss(fn: Callable) -> bool:
    """Cross-entropy-type losses that take class indices as targets."""
    from dynscope.nn import CrossEntropy

    fn = fn.func if isinstance(fn, functools.partial) else fn
    return fn in (F.cross_entropy, F.nll_loss) or isinstance(fn, (nn.CrossEntropyLoss, nn.NLLLoss, CrossEntropy))


def check_shapes(loss_fn: Callable, outputs: Any, targets: Any) -> None:
    """Raise :class:`LossProtocolError` for outputs and targets the loss cannot mean to combine.

    >>> check_shapes(F.mse_loss, torch.zeros(4, 1), torch.zeros(4, 1))  # fine
    >>> try:
    ...     check_shapes(F.mse_loss, torch.zeros(4, 1), torch.zeros(4))
    ... except LossProtocolError as error:
    ...     print(str(error)[:77])
    mse_loss got outputs [4, 1] and targets [4], which torch broadcasts to [4, 4]
    """
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return
    o, t = list(outputs.shape), list(targets.shape)
    if targets.is_floating_point() or targets.is_complex():
        if o == t:
            return
        try:
            joint = list(torch.broadcast_shapes(outputs.shape, targets.shape))
        except RuntimeError:
            joint = None
        if joint is not None and joint == o:
            return  # targets broadcast over the outputs' feature dimensions: no sample is mixed with another
        raise LossProtocolError(
            f"{_name(loss_fn)} got outputs {o} and targets {t}, which torch "
            + (f"broadcasts to {joint}" if joint is not None else "cannot combine")
            + ": the loss would compare every output with every target, not sample by sample. Give them the same "
            "shape (e.g. `outputs.squeeze(-1)` or `y.unsqueeze(-1)` in the module), or define "
            "`dynscope_loss(self, batch)`"
        )
    if _is_class_loss(loss_fn) and len(o) >= 2 and len(t) == len(o) and t[-1] == 1 and o[1] > 1:
        raise LossProtocolError(
            f"{_name(loss_fn)} got class-index targets shaped {t} for outputs {o}: class targets are [B] "
            "(one index per sample); squeeze them (`y.squeeze(-1)`) in the data or define `dynscope_loss(self, batch)`"
        )


# (loss function id, output-independent batch signature) already checked, per module
_checked: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


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
    objective = Objective(module, fn, tuple(batch), mode=mode, param_names=param_names)
    x, y = batch
    key = (id(fn), tuple(x.shape), x.dtype, tuple(getattr(y, "shape", ())), getattr(y, "dtype", None))
    seen = _checked.setdefault(module, set())
    if key not in seen:  # one forward per new batch shape, through the side-effect-free objective
        with torch.no_grad():
            check_shapes(fn, objective.outputs(), y)
        seen.add(key)
    return objective


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
