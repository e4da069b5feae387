"""The exact Hessian trace of piecewise-linear networks, from the generalised Gauss-Newton matrix.

For a network certified by :func:`dynscope.piecewise.piecewise_linear_reason` (ReLU networks:
every weight enters the output piecewise linearly), ``diag(H) = diag(GGN)``, so

    tr(H) = tr(GGN) = mean_n tr(H_n J_n J_n^T)

with ``J_n`` the ``K x P`` Jacobian of sample ``n``'s ``K`` outputs and ``H_n`` the loss's Hessian in
the outputs: ``diag(p_n) - p_n p_n^T`` for cross-entropy (``p_n`` the softmax), ``2 I / K`` for the
mean squared error. No probes: the trace is exact (``stderr = 0``) at the cost of ``K`` backward
passes, which for a 10-class classifier is less than the 8 Hessian-vector products a tracked
Hutchinson estimate spends, and it is exact where Hutchinson's per-probe spread is several times
the trace (flat, indefinite spectra).

Only the ``K x K`` Gram matrices ``J_n J_n^T`` are formed, per parameter tensor:

* ``nn.Linear`` on ``[B, in]`` inputs, called once: from one forward with hooks and one backward of
  ``K`` one-hot cotangents at once, ``G_n = |a_n|^2 D_n D_n^T`` (weight; ``D_n D_n^T`` for the bias) with
  ``a_n`` the layer's input and ``D_n`` the ``K`` output gradients: no per-sample gradient is ever
  materialised. It needs row ``n`` to be sample ``n`` (a random ``K+1``-th cotangent checks it) and the
  weights read by no other call; the rest of the forward gets a copy of the layer's output, so that an
  in-place ReLU cannot rewrite the recorded one;
* every other tensor: ``vmap(jacrev)`` over the samples, chunked under a memory cap.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .objective import Objective, check_finite
from .persample import _hook_plan, _plain
from .piecewise import NotPiecewiseLinear, _close, certifying, piecewise_linear_reason
from .trace import TraceResult

MAX_OUTPUTS = 256  # outputs per sample (classes) up to which the exact trace is worth its K backward passes
DEFAULT_MEMORY_CAP = 256 * 2**20  # bytes of Jacobian rows held at once on the vmap path


class NotExact(ValueError):
    """The exact trace does not apply to this objective (the message says why)."""


def _is(loss_fn, function: Callable, module: type) -> bool:
    return loss_fn is function or (type(loss_fn) is module and getattr(loss_fn, "reduction", None) == "mean")


def loss_reason(objective: Objective) -> Optional[str]:
    """``None`` if the loss's Hessian in the outputs is known in closed form (mean cross-entropy on
    ``[B, K]`` logits without class weights, mean squared error), otherwise why not."""
    loss_fn = objective.loss_fn
    if _is(loss_fn, F.cross_entropy, nn.CrossEntropyLoss):
        if getattr(loss_fn, "weight", None) is not None:
            return "cross-entropy with class weights"
        targets = objective.batch[1]
        if isinstance(targets, torch.Tensor) and targets.is_floating_point() and targets.dim() != 2:
            return "cross-entropy over positions (soft targets of other than two dimensions)"
        if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
            if targets.dim() != 1:
                return "cross-entropy over positions (targets of more than one dimension)"
            if bool((targets == getattr(loss_fn, "ignore_index", -100)).any()):
                return "cross-entropy with ignored targets"
        return None
    if _is(loss_fn, F.mse_loss, nn.MSELoss):
        return None
    return "the loss is neither cross-entropy nor mean squared error (its Hessian in the outputs is not known)"


def exact_trace_reason(objective: Objective) -> Optional[str]:
    """``None`` if :func:`gauss_newton_trace` gives ``tr(H)`` exactly for this objective, otherwise why not."""
    if not isinstance(objective, Objective):
        return "the target is not an Objective"
    return (loss_reason(objective) if objective._sample_loss_fn is None else None) or piecewise_linear_reason(objective)


@dataclass
class OutputHessian:
    """``H_n / B``, the loss's Hessian in sample ``n``'s ``K`` outputs over the batch size, in factored form:
    ``scale_n (diag(p_n) - p_n p_n^T)`` for cross-entropy (``p_n`` the softmax), ``scale_n I`` for the mean
    squared error (``p`` None). ``scale`` and ``p`` are float64."""

    scale: torch.Tensor  # [B]
    k: int
    p: Optional[torch.Tensor] = None  # [B, K]

    def rows(self, part: slice) -> "OutputHessian":
        return OutputHessian(self.scale[part], self.k, None if self.p is None else self.p[part])

    def dense(self) -> torch.Tensor:
        """``[B, K, K]`` float64."""
        if self.p is None:
            return torch.eye(self.k, dtype=torch.float64, device=self.scale.device) * self.scale[:, None, None]
        return (torch.diag_embed(self.p) - self.p[:, :, None] * self.p[:, None, :]) * self.scale[:, None, None]

    def quadratic(self, d: torch.Tensor) -> torch.Tensor:
        """``sum_(c,c') H_n[c, c'] (d_nc . d_nc')`` per sample for ``d`` of shape ``[B, K, m]`` (float64, ``[B]``).

        For cross-entropy this is ``sum_c p_c |d_c - dbar|^2`` with ``dbar = sum_c p_c d_c``: the same
        number as ``sum_c p_c |d_c|^2 - |dbar|^2`` without its cancellation for confident logits, and
        without any ``K x K`` matrix per sample (batched small matrix products are slow on CPU).
        """
        if self.p is None:
            q = d.square().sum((1, 2))
        else:
            p = self.p.to(d.dtype)[:, :, None]
            centred = d - (p * d).sum(1, keepdim=True)
            q = (p * centred.square()).sum((1, 2))
        return q.double() * self.scale


def _output_hessian(objective: Objective, z: torch.Tensor) -> OutputHessian:
    """The loss's Hessian in each sample's outputs, over the batch size (see :class:`OutputHessian`)."""
    b = z.shape[0]
    logits = z.dim() == 2
    z = z.detach().reshape(b, -1).double()
    k = z.shape[1]
    if _is(objective.loss_fn, F.mse_loss, nn.MSELoss):
        if objective.batch[1].numel() != z.numel():
            raise NotExact("mean squared error with broadcast targets")
        return OutputHessian(torch.full((b,), 2.0 / (k * b), dtype=torch.float64, device=z.device), k)
    if not logits:
        raise NotExact("cross-entropy needs [B, K] logits")
    scale = torch.full((b,), 1.0 / b, dtype=torch.float64, device=z.device)
    targets = objective.batch[1]
    if targets.is_floating_point():  # -sum_k q_k log p_k: the Hessian scales with sum_k q_k, 1 only for distributions
        smoothing = float(getattr(objective.loss_fn, "label_smoothing", 0.0))
        mass = targets.detach().reshape(b, -1).double().sum(1)
        scale = scale * ((1.0 - smoothing) * mass + smoothing)
    return OutputHessian(scale, k, torch.softmax(z, 1))


def _linear_plan(objective: Objective) -> "OrderedDict[nn.Module, Dict[str, str]]":
    """Plain ``nn.Linear`` modules whose parameters are measured and held by no other module (the
    per-sample hook path's plan, :func:`dynscope.persample._hook_plan`, for its Linear layers)."""
    return OrderedDict((m, attrs) for m, attrs in _hook_plan(objective).items() if _plain(m, nn.Linear))


class _Uses(TorchFunctionMode):
    """Counts the torch calls that take each of the given tensors as an argument."""

    def __init__(self, tensors):
        super().__init__()
        self.counts = {id(t): 0 for t in tensors}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if id(t) in self.counts:
                self.counts[id(t)] += 1
        return func(*args, **kwargs)


def _hooked_grams(objective: Objective, weights_of: Callable[[torch.Tensor], OutputHessian], certify: bool = False):
    """Forward with hooks on the plain Linear layers and one backward of K one-hot cotangents.

    Returns the output Hessian weights, the traces of the layers it could do and the parameter
    names left for the vmap path (layers called more than once or on more than 2-d inputs).
    """
    plan = _linear_plan(objective)
    records: Dict[nn.Module, List[Tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in plan}

    def keep(module, inputs, output):
        records[module].append((inputs[0], output))
        # the rest of the forward gets a copy: an in-place op after the layer (nn.ReLU(inplace=True),
        # out += identity) would otherwise turn the recorded output into its own result
        return output.clone()

    if nn.modules.module._global_forward_hooks:  # they could replace a layer's output before ours sees it
        plan.clear()
    handles = [m.register_forward_hook(keep, prepend=True) for m in plan]  # the layer's own output, before any hook's
    params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in objective.params.items())
    uses = _Uses(params[name] for attrs in plan.values() for name in attrs.values())
    # the very forward measured is certified too: the cached certificate saw two samples of an earlier model
    certified = certifying(objective, objective.batch[0], params) if certify else contextlib.nullcontext(lambda z: None)
    try:
        # uses innermost: the certificate's own property reads (.requires_grad) are no uses
        with objective.measuring(), torch.enable_grad(), certified as finish, uses:
            z = objective.outputs(params)
            finish(z)
    except NotPiecewiseLinear as refusal:
        raise NotExact(str(refusal)) from None
    finally:
        for h in handles:
            h.remove()
    if not isinstance(z, torch.Tensor):
        raise NotExact(f"the network output is a {type(z).__name__}, not one tensor of logits or predictions")
    z = check_finite(z, "the network output")
    weights = weights_of(z)
    done = OrderedDict()
    # one call on a [B, in] input, and its parameters read by no other call (F.linear(x, layer.weight) elsewhere)
    b, k = z.shape[0], weights.k
    usable = [m for m in plan if len(records[m]) == 1 and records[m][0][0].dim() == 2 and records[m][0][1].requires_grad
              and records[m][0][0].shape[0] == b  # one row per sample (not [B * T, in])
              and all(uses.counts[id(params[name])] == 1 for name in plan[m].values())]
    if usable:
        flat = z.reshape(b, k)
        # the K one-hot cotangents, and a random one: row n of each layer must belong to sample n
        probe = torch.randn(b, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(flat)
        cotangents = torch.cat([torch.eye(k, dtype=flat.dtype, device=flat.device)[:, None, :].expand(k, b, k), probe[None]])
        outs = [records[m][0][1] for m in usable]
        deltas = torch.autograd.grad(flat, outs, cotangents, is_grads_batched=True, allow_unused=True)
        for m, delta in zip(usable, deltas):
            attrs = plan[m]
            if delta is None:  # the layer does not reach the output
                done.update({name: 0.0 for name in attrs.values()})
                continue
            # in the layer's dtype (float32 at least), summed in float64: the trace's rounding is the model's
            d = delta[:k].permute(1, 0, 2).to(torch.promote_types(delta.dtype, torch.float32))  # [B, K, out]
            if not _close(delta[k], (probe.to(d.dtype)[:, :, None] * d).sum(1)):  # at delta's precision
                continue  # the rows are not the samples in order (a permutation around the layer): vmap
            a = records[m][0][0].detach().to(d.dtype)
            weighted = weights.quadratic(d)  # [B]: <H_n / B, D_n D_n^T>
            if "weight" in attrs:
                done[attrs["weight"]] = float(torch.dot(weighted, (a * a).sum(1).double()))
            if "bias" in attrs:
                done[attrs["bias"]] = float(weighted.sum())
    rest = [n for n in objective.params if n not in done]
    return weights, done, rest


def _jacobian_traces(objective: Objective, names: List[str], weights: OutputHessian, memory_cap: int) -> Dict[str, float]:
    """``sum_n <H_n / B, J_n J_n^T>`` per tensor in ``names``, from ``vmap(jacrev)`` over sample chunks."""
    fixed = {n: p for n, p in objective.params.items() if n not in names}
    b, k = weights.scale.shape[0], weights.k
    inputs = objective.batch[0]

    def outputs(sub, sample):
        one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return objective.outputs({**fixed, **sub}, (one, None)).reshape(-1)

    per_sample = vmap(jacrev(outputs), in_dims=(None, 0))
    sub = OrderedDict((n, objective.params[n]) for n in names)
    numel = sum(p.numel() for p in sub.values())
    chunk = max(1, min(b, memory_cap // max(1, 3 * k * numel * objective.params[names[0]].element_size())))
    totals = dict.fromkeys(names, 0.0)
    with objective.measuring():
        for start in range(0, b, chunk):
            part = tree_map(lambda t: t[start : start + chunk] if isinstance(t, torch.Tensor) else t, inputs)
            try:
                jac = per_sample(sub, part)
            except RuntimeError as error:  # vmap: data-dependent control flow, .item(), in-place writes, random ops
                raise NotExact(f"the per-sample Jacobians could not be taken with vmap ({str(error)[:200]})") from error
            w = weights.rows(slice(start, start + chunk)).dense()
            for n, j in jac.items():  # a K x K Gram per sample: one GEMM over the long rows
                j = j.reshape(j.shape[0], k, -1)
                totals[n] += float((w * (j @ j.transpose(1, 2)).double()).sum())
    return totals


def gauss_newton_trace(
    objective: Objective,
    *,
    check: bool = True,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> TraceResult:
    """The trace of the generalised Gauss-Newton matrix, per parameter tensor and in total, exactly.

    For a piecewise-linear network (checked first unless ``check=False``, and again on the measured
    forward pass itself) this is ``tr(H)``: see the module docstring. Raises :class:`NotExact` when
    the loss's output Hessian is not known in closed form, the network is not certified, it has more
    than ``MAX_OUTPUTS`` outputs per sample, or ``vmap`` cannot take its per-sample Jacobians.

    Args:
        objective: an :class:`dynscope.Objective` with a cross-entropy or mean-squared-error loss.
        check: certify ``tr(H) = tr(GGN)`` first (with ``False`` the result is ``tr(GGN)`` for any
            network: a positive semi-definite curvature of its own).
        memory_cap: bytes of Jacobian rows held at once on the vmap path.

    Returns:
        A :class:`dynscope.TraceResult` with ``stderr = 0``, ``num_matvecs = 0`` and ``method = "exact"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.func import functional_call, hessian
        >>> from dynscope import Objective
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)).double()
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,))
        >>> obj = Objective(net, nn.functional.cross_entropy, (x, y))
        >>> params = dict(net.named_parameters())
        >>> h = hessian(lambda p: nn.functional.cross_entropy(functional_call(net, p, (x,)), y))(params)
        >>> exact = sum(float(h[n][n].reshape(p.numel(), p.numel()).diagonal().sum()) for n, p in params.items())
        >>> abs(gauss_newton_trace(obj).value - exact) < 1e-10 * exact
        True
    """
    if check:
        reason = exact_trace_reason(objective)
    else:
        reason = loss_reason(objective) if objective._sample_loss_fn is None else "the objective is built from sample_loss_fn"
    if reason is not None:
        raise NotExact(reason)

    def weights_of(z: torch.Tensor) -> OutputHessian:
        if z.reshape(z.shape[0], -1).shape[1] > MAX_OUTPUTS:
            raise NotExact(f"more than {MAX_OUTPUTS} outputs per sample")
        return _output_hessian(objective, z)

    weights, traces, rest = _hooked_grams(objective, weights_of, certify=check)
    if rest:
        traces.update(_jacobian_traces(objective, rest, weights, memory_cap))
    per_layer = OrderedDict((n, traces[n]) for n in objective.params)
    value = sum(per_layer.values())
    check_finite(torch.tensor(value), "the Gauss-Newton trace")
    return TraceResult(value=value, stderr=0.0, per_layer=per_layer, num_matvecs=0, method="exact", dof=0)


def exact_trace(
    objective,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> Tuple[Optional[TraceResult], Optional[str]]:
    """``(tr(H) exactly, None)`` where :func:`gauss_newton_trace` applies, else ``(None, why not)``;
    a :class:`NotExact` found only while computing is a ``why not`` too, never raised.

    With ``reduce`` (a :class:`~dynscope.callbacks.distributed.RankReduce`-like mean over data-parallel
    ranks) the ranks agree: the exact trace is used only if it applies on every rank, so all of them
    take the same path; a rank whose computation fails makes every rank raise.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> relu = Objective(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), nn.functional.cross_entropy, batch)
        >>> result, reason = exact_trace(relu)
        >>> result.method, result.stderr, reason
        ('exact', 0.0, None)
        >>> gelu = Objective(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), nn.functional.cross_entropy, batch)
        >>> exact_trace(gelu)
        (None, "'gelu' is not piecewise linear in the parameters")
    """
    if not isinstance(objective, Objective):
        return None, "the target is not an Objective"
    result = reason = None
    try:  # the refusals known beforehand, then those found while computing (output shapes, vmap)
        result = gauss_newton_trace(objective, memory_cap=memory_cap)
    except NotExact as refusal:  # not a failure: on every rank the estimate takes over
        reason = str(refusal)
    except Exception as error:  # noqa: BLE001 - shared with the other ranks, then re-raised
        if reduce is None or getattr(reduce, "fail", None) is None:
            raise
        reduce.fail(torch.zeros(len(objective.params) + 1, dtype=torch.float64, device=objective.device), error)
    if reduce is None:
        return result, reason
    names = list(objective.params)
    local = torch.zeros(len(names) + 1, dtype=torch.float64, device=objective.device)
    if result is not None:
        local = torch.tensor([1.0, *result.per_layer.values()], dtype=torch.float64, device=objective.device)
    total = reduce(local)
    if float(total[0]) < 1.0:
        return None, reason or "the exact trace does not apply on every data-parallel rank"
    per_layer = OrderedDict(zip(names, map(float, total[1:])))
    return TraceResult(value=sum(per_layer.values()), stderr=0.0, per_layer=per_layer, num_matvecs=0, method="exact"), None
