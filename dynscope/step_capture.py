"""Per-sample gradient moments from a training step's own forward and backward.

:func:`dynscope.per_sample_moments` runs a forward and a backward of its own; on a small model that
is most of what a measurement costs (0.8 of its 1.7 ms on the 85k MLP, whose training step takes
0.8). The training step computes every layer's input and output gradient anyway: read-only hooks
can record them (:class:`StepCapture`), and the moments then cost the sums of squares alone. Only
where the step's loss is certified to be the objective's (below); otherwise the capture says why
and the caller measures the usual way.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from torch import nn

from .kernel_choice import DEFAULT_MEMORY_CAP
from .objective import Objective
from .persample import GradientMoments, Record, _autocast_on, _graph_uses, _hook_plan, _recorder, moments_from_records

NOT_FINITE = "the step's loss is not finite"  # the one reason that says nothing about the next step

# (model, its module types) -> whether its outputs are the same in train and eval mode (measured once)
_MODE_FREE: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, bool]]" = weakref.WeakKeyDictionary()


class StepCapture:
    """Records one training step of ``objective``'s model and turns it into :class:`~dynscope.persample.GradientMoments`.

    The step must compute ``loss_fn(model(x), y)`` on ``objective``'s batch (the very tensor ``x``)
    with ``loss_fn``'s mean reduction; the capture certifies this before it yields anything:

    * the model was called once, on the batch's input tensor;
    * the loss the step differentiated equals the mean of the objective's per-sample losses of the
      recorded output, and its gradient with respect to that output equals theirs (within
      rounding): a regulariser, a label-smoothing or loss-scaling difference fails one of them;
    * each hooked parameter enters the loss's graph only through the calls the hooks saw, and every
      trainable parameter is hooked (Linear, Conv1d/2d and Embedding layers; others: no capture);
    * no autocast; and, for an ``"eval"`` objective, the model's output in eval mode equals the
      step's (checked once per model: dropout or BatchNorm in train mode fail it).

    The moments are those of the objective at the parameters of the step (before the optimizer
    changes them). ``sum_i g_i`` is the step's own gradient (the parameters' ``.grad``, read by
    :meth:`moments`): it must hold this step's gradient alone (zeroed before the step, no
    accumulation, no data-parallel averaging, not clipped yet); the sums the hooks compute are
    checked against it where the layer's rule materialises per-sample gradients.

    Args:
        objective: the loss and batch of the step, on the model the step trains.
        memory_cap: working memory of the per-layer per-sample gradients of sequence and
            convolution layers, as in :func:`dynscope.per_sample_moments`.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from dynscope import Objective, per_sample_moments
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> objective = Objective(model, F.cross_entropy, (x, y))
        >>> with StepCapture(objective) as capture:  # the training step, as it is
        ...     loss = F.cross_entropy(model(x), y)
        ...     capture.saw_loss(loss)
        ...     loss.backward()
        >>> moments = capture.moments()
        >>> torch.allclose(moments.sq_dev["0.weight"], per_sample_moments(objective).sq_dev["0.weight"], atol=1e-6)
        True
        >>> with StepCapture(objective) as capture:  # a loss with a regulariser is not the objective's
        ...     loss = F.cross_entropy(model(x), y) + 1e-3 * model[0].weight.square().sum()
        ...     capture.saw_loss(loss)
        ...     loss.backward()
        >>> capture.moments() is None, capture.reason
        (True, "the step's loss is not the mean of the per-sample losses of its output")
    """

    def __init__(self, objective: Objective, memory_cap: int = DEFAULT_MEMORY_CAP):
        self.objective = objective
        self.memory_cap = memory_cap
        self.reason: Optional[str] = None  # why no moments (None: none yet, or they came)
        self.plan: "OrderedDict[nn.Module, Dict[str, str]]" = OrderedDict()
        if objective._sample_loss_fn is not None:
            self.reason = "the objective has no loss_fn(outputs, targets)"
        else:
            self.plan = _hook_plan(objective)
            hooked = {n for attrs in self.plan.values() for n in attrs.values()}
            missing = [n for n in objective.params if n not in hooked]
            if missing:
                self.reason = f"no per-sample rule for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        # the objective's parameters as the model holds them: the leaves of the step's graph
        held = dict(objective.model.named_parameters(remove_duplicate=False))
        self._parameters = OrderedDict((n, held[n]) for n in objective.params)
        self._records: Dict[nn.Module, List[Record]] = {m: [] for m in self.plan}
        self._calls: List[tuple] = []  # the model's own calls: (input, output)
        self._output_grad: Optional[torch.Tensor] = None
        self._handles: list = []
        self._loss: Optional[float] = None
        self._uses: Dict[str, int] = {}
        self._paused = False

    # -- recording ---------------------------------------------------------------------------------
    def __enter__(self) -> "StepCapture":
        if self.reason is None:
            layer = _recorder(self._records)
            self._handles = [m.register_forward_hook(self._guarded(layer)) for m in self.plan]
            self._handles.append(self.objective.model.register_forward_hook(self._guarded(self._model_call)))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _guarded(self, hook):
        def run(module, inputs, output):
            if not self._paused:
                hook(module, inputs, output)

        return run

    def _model_call(self, module, inputs, output) -> None:
        self._calls.append((inputs[0] if inputs else None, output))
        if isinstance(output, torch.Tensor) and output.requires_grad:
            def keep(gradient):
                self._output_grad = gradient.detach()

            output.register_hook(keep)

    def saw_loss(self, loss: torch.Tensor) -> None:
        """The loss the step is about to differentiate (call before ``backward``)."""
        if self.reason is not None or not self._handles:
            return
        if _autocast_on():  # autocast's weight cache hides uses from the graph check
            self.reason = "autocast is on"
            return
        self._loss = float(loss.detach())
        uses = _graph_uses(loss)
        self._uses = {n: uses.get(id(p), 0) for n, p in self._parameters.items()}
        if self.objective.mode == "eval" and len(self._calls) == 1 and not self._mode_free():  # (else moments() says why)
            self.reason = "the model's output in train mode is not its output in eval mode (dropout, BatchNorm, ...)"

    def close(self) -> None:
        """Remove the hooks (the context's exit does)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _mode_free(self) -> bool:
        """Whether the model's output is the same in train and eval mode, on this step's output (once per model)."""
        model = self.objective.model
        structure = tuple(type(m) for m in self.objective._module_list() or model.modules())  # (the objective's walk)
        known = _MODE_FREE.setdefault(model, {})
        if structure not in known:
            if not isinstance(self._calls[0][1], torch.Tensor):
                return False
            self._paused = True
            try:
                with torch.no_grad():
                    evaluated = self.objective.outputs()
            finally:
                self._paused = False
            trained = self._calls[0][1].detach()
            known[structure] = isinstance(evaluated, torch.Tensor) and _close(evaluated, trained, 256)
        return known[structure]

    # -- the moments -------------------------------------------------------------------------------
    def moments(self) -> Optional[GradientMoments]:
        """The per-sample gradient moments of the step, or None (then :attr:`reason` says why).

        Call it after the backward and before anything changes the parameters' ``.grad`` (the
        optimizer's step is fine, gradient clipping is not); once.
        """
        self.close()
        grads = OrderedDict((n, p.grad) for n, p in self._parameters.items())
        if self.reason is None:
            self.reason = self._check(grads)
        if self.reason is not None:
            return None
        objective = self.objective
        size = objective.batch_size
        # the step differentiated the mean: per-sample output gradients are size times the recorded
        # ones (which the step no longer needs: scaled in place), and sum_i g_i is size times .grad
        for calls in self._records.values():
            for r in calls:
                if r[1] is not None:  # (an expanded gradient, e.g. of a sum, cannot be written in place)
                    r[1] = r[1].mul_(size) if r[1].is_contiguous() else r[1] * size
        flat = torch.empty(sum(g.numel() for g in grads.values()), dtype=next(iter(grads.values())).dtype,
                           device=next(iter(grads.values())).device)  # one allocation: fresh pages cost
        s1 = OrderedDict()
        for (n, g), part in zip(grads.items(), flat.split([g.numel() for g in grads.values()])):
            s1[n] = torch.mul(g, size, out=part.view(g.shape))
        records, self._records = self._records, {m: [] for m in self.plan}  # (scaled: not to be used again)
        moments, rest = moments_from_records(objective, self.plan, records, self._uses, s1, self.memory_cap)
        if moments is None or rest:
            self.reason = f"the hooks could not account for {rest[0]}" if rest else "the layers' batch dimensions are unknown"
            return None
        return moments

    def _check(self, grads: Dict[str, Optional[torch.Tensor]]) -> Optional[str]:
        if self._loss is None:
            return "no loss was seen (saw_loss before backward)"
        if len(self._calls) != 1:
            return f"the model was called {len(self._calls)} times in the step, not once"
        given, output = self._calls[0]
        if given is not self.objective.batch[0]:
            return "the model was not called on the batch's input tensor"
        if not isinstance(output, torch.Tensor) or self._output_grad is None:
            return "the model's output got no gradient"
        if any(g is None for g in grads.values()):
            return "a parameter got no gradient in the step"
        if len({(g.dtype, g.device) for g in grads.values()}) > 1:
            return "the gradients differ in dtype or device"
        with torch.enable_grad():
            out = output.detach().requires_grad_(True)
            mean = self.objective.losses_of(out, self.objective.batch[1]).mean()
            (expected,) = torch.autograd.grad(mean, out)
        value, eps = float(mean.detach()), float(torch.finfo(mean.dtype).eps)
        if not math.isfinite(self._loss):
            return NOT_FINITE
        if not abs(value - self._loss) <= 64 * eps * max(abs(value), abs(self._loss)):
            return "the step's loss is not the mean of the per-sample losses of its output"
        if not _close(expected, self._output_grad, 64):
            return "the step's loss has another gradient with respect to the model's output"
        return None


def _close(a: torch.Tensor, b: torch.Tensor, ulps: int) -> bool:
    """Finite and equal up to ``ulps`` units of rounding of the largest magnitude of either."""
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    scale = max(float(a.abs().max()), float(b.abs().max())) if a.numel() else 0.0
    return math.isfinite(scale) and float((a - b).abs().max() if a.numel() else 0.0) <= ulps * float(torch.finfo(a.dtype).eps) * scale
