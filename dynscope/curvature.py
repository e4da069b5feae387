"""One curvature measurement: Hessian trace, top eigenvalues, stability ratios and directional sharpness.

:func:`measure_curvature` is the framework-free core of :class:`dynscope.callbacks.Curvature`: given
an objective (or its Hessian operator), and optionally the optimizer, its last update and other
minibatches, it returns a :class:`CurvatureResult` whose :meth:`~CurvatureResult.metrics` are the
metrics that callback logs (declared in :data:`METRICS`). The definitions (edge-of-stability ratios
from the optimizer's update rule, batch sharpness, update sharpness) are in the callback's docstring
and :mod:`dynscope.stability`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dynscope import Objective
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> batch = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> res = measure_curvature(Objective(model, nn.functional.cross_entropy, batch), optimizer=opt,
    ...                         num_matvecs=8, eigen_tol=1e-6)
    >>> res.value == res.metrics()["hessian_trace"], sorted(res.per_layer) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    (True, True)
    >>> abs(res.metrics()["eos_ratio"] - 0.1 * res.lambda_max / 2) < 1e-12    # plain SGD: lr * lambda_max / 2
    True
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .eigen import top_eigenvalues
from .gauss_newton import exact_trace as exact_trace_of
from .metrics import CURVATURE as METRICS  # noqa: F401 - what this diagnostic logs (declared in dynscope.metrics)
from .objective import Objective
from .operators import HessianOperator, as_operator
from .params import ParamDict
from .sharpness import directional_sharpness, directional_sharpnesses
from .spectrum import BlockOperator, NegatedOperator, SpectralDensity, spectral_density
from .stability import (IndexOperator, StabilityOperator, StabilityScaling, UnsupportedOptimizer, minibatch_noise_factor,
                        stability_scaling)
from .trace import TraceResult, hessian_trace

__all__ = ["METRICS", "CurvatureResult", "adam_preconditioner", "batch_slice", "density_histogram", "measure_curvature", "objective_at",
           "optimizer_hparams", "optimizer_scaling", "with_batch_statistics"]


# -- small pieces ---------------------------------------------------------------------------------------------

def optimizer_hparams(source) -> Dict[str, Any]:
    """Learning rate and momentum of an optimizer's first param group (``source``: the optimizer, or
    anything with ``optimizers``, e.g. a Lightning trainer: its first optimizer; ``{}`` without one).

    ``kind`` is ``"adam"`` for optimizers with ``betas`` (Adam, AdamW, ...), else ``"sgd"``.
    (Kept for compatibility; the stability ratios use :func:`dynscope.stability_scaling`, which
    reads every param group and the actual update rule.)

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        >>> {k: v for k, v in optimizer_hparams(opt).items() if k != "optimizer"}
        {'lr': 0.1, 'kind': 'sgd', 'momentum': 0.9}
    """
    if hasattr(source, "param_groups"):
        optimizer = source
    else:
        optimizers = getattr(source, "optimizers", None) or []
        if not optimizers:
            return {}
        optimizer = optimizers[0]
    group = optimizer.param_groups[0]
    info: Dict[str, Any] = {"lr": float(group["lr"]), "optimizer": optimizer}
    if "betas" in group:
        info.update(kind="adam", beta1=float(group["betas"][0]), beta2=float(group["betas"][1]), eps=float(group["eps"]))
    else:
        info.update(kind="sgd", momentum=float(group.get("momentum", 0.0) or 0.0))
    return info


def optimizer_scaling(optimizer, model: nn.Module, layout) -> StabilityScaling:
    """:func:`dynscope.stability_scaling` of ``optimizer`` over the parameters of ``model`` in ``layout``
    (raises :class:`dynscope.stability.UnsupportedOptimizer` for update rules without a threshold)."""
    named = dict(model.named_parameters())
    return stability_scaling(optimizer, {n: named[n] for n in layout.names if n in named}, layout)


def adam_preconditioner(model: nn.Module, objective: Objective, info: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """``P^{-1/2}`` flattened in the objective's layout (Adam, with Cohen et al. 2022's bias
    correction ``P = (1 - beta1^t)(sqrt(v_hat) + eps)``); 0 for coordinates Adam never moved.
    ``info`` holds the ``optimizer`` (:func:`optimizer_hparams`). Kept for compatibility:
    :func:`measure_curvature` uses :func:`dynscope.stability_scaling`."""
    try:
        scaling = optimizer_scaling(info["optimizer"], model, objective.layout)
    except UnsupportedOptimizer:
        return None
    if scaling.kind != "adam" or scaling.preconditioner is None:
        return None
    moved = scaling.scale > 0
    return torch.where(moved, scaling.preconditioner.rsqrt(), torch.zeros_like(scaling.preconditioner))


def batch_slice(batch: Any, size: Optional[int]) -> Any:
    """The first ``size`` samples of ``batch``: every tensor whose first dimension is the batch size
    (that of the first tensor in the batch) is sliced along it; other leaves pass through.

    Example:
        >>> import torch
        >>> x, y = batch_slice((torch.zeros(8, 3), torch.arange(8)), 2)
        >>> x.shape, y.tolist()
        (torch.Size([2, 3]), [0, 1])
    """
    if size is None:
        return batch
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not leaves or leaves[0].shape[0] <= size:
        return batch
    full = leaves[0].shape[0]
    return tree_map(lambda t: t[:size] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == full else t, batch)


def objective_at(objective: Objective, params: Mapping[str, torch.Tensor]) -> Objective:
    """The same objective (model, batch, loss) at other parameter values."""
    other = copy.copy(objective)
    other.params = OrderedDict((n, params[n].detach()) for n in objective.layout.names)
    return other


def _batch_norms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """BatchNorm on the batch's statistics (as in training) without touching its running statistics."""
    saved = [(m, m.training, m.track_running_stats) for m in _batch_norms(model)]
    try:
        for m, _, _ in saved:
            m.training, m.track_running_stats = True, False
        yield
    finally:
        for m, training, track in saved:
            m.training, m.track_running_stats = training, track


def with_batch_statistics(objective: Objective) -> Objective:
    """The same objective with BatchNorm normalising by the batch (dropout off, in ``"eval"`` mode):
    the gradients Adam's statistics come from. A bias right before BatchNorm has no gradient there,
    while in eval mode (running statistics) it has curvature: measured there, ``P^-1 H`` would be
    off by Adam's ``1/eps`` along it."""
    other = copy.copy(objective)
    if objective._sample_loss_fn is not None:
        inner = objective._sample_loss_fn

        def sample_loss(m, b):
            with batch_statistics(m):
                return inner(m, b)

        other._sample_loss_fn = sample_loss
    else:
        forward = objective.forward_fn

        def forward_fn(m, x):
            with batch_statistics(m):
                return forward(m, x)

        other.forward_fn = forward_fn
    return other


def density_histogram(density: SpectralDensity, bins: int = 64) -> Optional[Dict[str, Any]]:
    """The spectral density as a histogram of eigenvalue counts over ``bins`` equal bins between its
    extreme nodes: TensorBoard's ``add_histogram_raw`` fields (``min``, ``max``, ``num``, ``sum``,
    ``sum_squares``, ``bucket_limits``, ``bucket_counts``); None without nodes.

    Example:
        >>> from dynscope import spectral_density
        >>> h = density_histogram(spectral_density(torch.diag(torch.tensor([1.0, 1.0, 3.0])), 2, 3), bins=2)
        >>> [round(x, 6) for x in h["bucket_limits"]], [round(c, 6) for c in h["bucket_counts"]], round(h["sum"], 6)
        ([2.0, 3.0], [2.0, 1.0], 5.0)
    """
    nodes = density.nodes[density.weights > 0]
    if nodes.numel() == 0:
        return None
    low, high = float(nodes.min()), float(nodes.max())
    if high <= low:
        high = low + max(abs(low), 1.0) * 1e-6
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    counts = density.histogram(edges.tolist())
    return dict(min=low, max=high, num=float(density.size), sum=density.moment(1) * density.size,
                sum_squares=density.moment(2) * density.size, bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist())


# -- the result -------------------------------------------------------------------------------------------------

@dataclass
class CurvatureResult:
    """What :func:`measure_curvature` measured.

    Attributes:
        trace: the trace estimate (:class:`dynscope.TraceResult`).
        scalars: every other metric by its declared name (``name`` or ``name/<layer>``), in
            measurement order: ``trace_ratio``, ``lambda_max``, stability ratios, sharpness, ...
        density: the spectral density, when asked for.
        eigenvector: the top eigenvector of ``H`` (``[n]``), to warm-start the next measurement
            (None when it came from a tracker or was not computed).
        preconditioned_eigenvector: the same for the stability operator (Adam-type or mixed groups).
    """

    trace: TraceResult
    scalars: Dict[str, float] = field(default_factory=dict)
    density: Optional[SpectralDensity] = None
    eigenvector: Optional[torch.Tensor] = None
    preconditioned_eigenvector: Optional[torch.Tensor] = None

    @property
    def value(self) -> float:
        """The Hessian trace ``tr(H)``."""
        return self.trace.value

    @property
    def stderr(self) -> float:
        """The trace estimate's standard error."""
        return self.trace.stderr

    @property
    def per_layer(self) -> Dict[str, float]:
        """The trace of each parameter tensor's diagonal block (they sum to :attr:`value`)."""
        return self.trace.per_layer

    @property
    def lambda_max(self) -> Optional[float]:
        """The largest Hessian eigenvalue (None when not computed)."""
        return self.scalars.get("lambda_max")

    def metrics(self, per_layer: bool = True) -> Dict[str, float]:
        """The logged metrics (names declared in :data:`METRICS`); ``per_layer``: with ``hessian_trace/<layer>``."""
        out = {"hessian_trace": self.value, "hessian_trace_stderr": self.stderr}
        if per_layer:
            out.update({f"hessian_trace/{name}": v for name, v in self.per_layer.items()})
        out.update(self.scalars)
        return out


# -- the measurement ----------------------------------------------------------------------------------------------

def measure_curvature(
    target,
    *,
    num_matvecs: int = 32,
    method: str = "hutchinson",
    seed: int = 0,
    probe_seed: Optional[int] = None,
    tracker=None,
    exact_trace: bool = True,
    eigen: bool = True,
    eigen_tol: float = 1e-2,
    eigen_max_iter: int = 60,
    num_eigenvalues: int = 1,
    lambda_min: bool = False,
    layer_eigen: bool = False,
    density: bool = False,
    density_probes: int = 4,
    density_steps: int = 32,
    optimizer=None,
    scaling: Optional[StabilityScaling] = None,
    lr: Optional[float] = None,
    batch_size: Optional[int] = None,
    num_samples: Optional[int] = None,
    sharpness: bool = True,
    before: Optional[Mapping[str, torch.Tensor]] = None,
    unclipped_update: Optional[Mapping[str, torch.Tensor]] = None,
    batches: Optional[Iterable[Objective]] = None,
    gradient_of: Optional[Callable[[Objective], ParamDict]] = None,
    eigenvector: Optional[torch.Tensor] = None,
    preconditioned_eigenvector: Optional[torch.Tensor] = None,
    **operator_kwargs,
) -> CurvatureResult:
    """Hessian trace, top eigenvalues, edge-of-stability ratios and directional sharpness of one objective.

    Args:
        target: a :class:`dynscope.Objective` (its Hessian, a :class:`dynscope.HessianOperator` built
            with ``operator_kwargs``: ``method`` (the HVP kernel), ``chunk_size``, ``memory_cap``,
            ``reduce``), a ``HessianOperator`` (its objective and settings are used for the other
            Hessians: at ``before``, of ``batches``, on batch statistics) or any operator (then
            only what needs no objective: trace, eigenvalues, density, stability ratios).
        num_matvecs, method: the trace estimate (:func:`dynscope.hessian_trace`); ignored with ``tracker``.
        seed: seed of the Lanczos starts (``lambda_min``: ``seed + 1``); ``probe_seed`` (default
            ``seed``): of the trace and spectral-density probes.
        tracker: a :class:`dynscope.tracking.CurvatureTracker`: trace and ``lambda_max`` from it.
        exact_trace: where the network is piecewise linear in every weight (ReLU networks, see
            :mod:`dynscope.piecewise`) and the loss is cross-entropy or mean squared error, take
            ``tr(H) = tr(GGN)`` exactly (:func:`dynscope.gauss_newton.exact_trace`, ``stderr = 0``,
            ``trace.method == "exact"``) instead of estimating it; the tracker then only runs Lanczos.
        eigen, eigen_tol, eigen_max_iter, num_eigenvalues: ``lambda_max`` and the top
            ``num_eigenvalues`` (Lanczos, to relative accuracy ``eigen_tol``).
        lambda_min, layer_eigen, density, density_probes, density_steps: the most negative
            eigenvalue, ``lambda_max/<layer>`` per parameter tensor, the spectral density.
        optimizer: the training optimizer: the stability ratios follow its update rule (raises
            :class:`~dynscope.stability.UnsupportedOptimizer` for rules without one); or pass its
            ``scaling`` (:func:`optimizer_scaling`) instead. ``lr``: for ``trace_ratio`` (default: the
            first param group's).
        batch_size, num_samples: the training batch (global under data parallelism) and data set
            size, for ``linear_stability_ratio`` (SGD with one setting; ``num_samples`` None: unknown).
        sharpness: ``grad_sharpness`` (``batch_sharpness`` too) and, given ``before`` (the
            parameters before the optimizer's last step; the target's are after it),
            ``update_sharpness`` and ``update_sharpness_next``; ``unclipped_update``: the
            wrapped optimizer's own update under CoordinateClip.
        batches: objectives of several minibatches: ``batch_sharpness`` is the mean of their
            ``g_b^T H_b g_b / |g_b|^2`` (default: ``grad_sharpness``).
        gradient_of: the gradient of an objective (default ``Objective.gradient``; e.g. averaged
            over data-parallel ranks).
        eigenvector, preconditioned_eigenvector: warm starts of the Lanczos runs (the previous
            result's).
    """
    if isinstance(target, Objective):
        objective, op = target, HessianOperator(target, **operator_kwargs)
    else:
        op = as_operator(target, **operator_kwargs)
        objective = getattr(op, "objective", None) if isinstance(op, HessianOperator) else None
        if isinstance(op, HessianOperator):
            operator_kwargs = dict(method=op.method, chunk_size=op.chunk_size, memory_cap=op.memory_cap, reduce=op.reduce)

    def hessian(obj: Objective) -> HessianOperator:
        return HessianOperator(obj, **operator_kwargs)

    probe_seed = seed if probe_seed is None else probe_seed
    if scaling is None and optimizer is not None:
        if objective is None:
            raise ValueError("optimizer= needs an objective (its model's parameters); pass scaling= for an operator")
        scaling = optimizer_scaling(optimizer, objective.model, objective.layout)
    if lr is None:
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else math.nan
    uniform_sgd = scaling is not None and scaling.kind == "sgd" and scaling.uniform
    out: Dict[str, float] = {}

    trace = None
    if exact_trace and objective is not None:
        trace, _ = exact_trace_of(objective, reduce=getattr(op, "reduce", None))
    tracked = tracker.measure(op, seed=probe_seed, trace=trace is None) if tracker is not None else None
    if trace is None:
        trace = tracked.trace if tracked is not None else hessian_trace(op, num_matvecs, method=method, seed=probe_seed)
    result = CurvatureResult(trace, out)
    out["trace_ratio"] = lr * trace.value / 2.0

    if eigen:
        if tracked is not None and num_eigenvalues == 1:
            eig = tracked.eigen
        else:
            eig = top_eigenvalues(op, num_eigenvalues, which="LA", tol=eigen_tol, max_iter=eigen_max_iter, seed=seed,
                                  return_eigenvectors=True, start=eigenvector)
            result.eigenvector = eig.eigenvectors[0]
        out["lambda_max"] = eig.value
        out["lambda_max_converged"] = float(eig.converged)
        if num_eigenvalues > 1:
            out.update({f"eigenvalues/{i}": v for i, v in enumerate(eig.eigenvalues)})
        if scaling is not None:
            stab_op = op
            if (scaling.kind == "adam" and objective is not None and objective.mode == "eval"
                    and _batch_norms(objective.model)):
                stab_op = hessian(with_batch_statistics(objective))
            result.preconditioned_eigenvector = _stability(
                out, stab_op, scaling, eig.value, eigen_tol, eigen_max_iter, seed, preconditioned_eigenvector)
            if uniform_sgd and batch_size is not None:
                a_lr = 1.0 / float(scaling.scale[0])  # a* / lr
                k = minibatch_noise_factor(batch_size, num_samples)
                out["linear_stability_ratio"] = ((1.0 - k) * eig.value + k * trace.value + scaling.weight_decay) / a_lr
    if lambda_min:
        low = top_eigenvalues(NegatedOperator(op), which="LA", tol=eigen_tol, max_iter=eigen_max_iter, seed=seed + 1)
        out["lambda_min"] = -low.value
    if layer_eigen:
        for name, block in op.layout.slices().items():
            res = top_eigenvalues(BlockOperator(op, block), which="LA", tol=eigen_tol, max_iter=eigen_max_iter, seed=seed)
            out[f"lambda_max/{name}"] = res.value
    if density:
        dens = result.density = spectral_density(op, density_probes, density_steps, seed=probe_seed)
        out["density_mass_negative"] = dens.mass(high=0.0) - dens.mass(0.0, 0.0)
        out["density_moment2"] = dens.moment(2)

    if sharpness:
        own_gradient = gradient_of is None
        gradient_of = gradient_of or (lambda obj: obj.gradient())
        here = {}  # directions whose sharpness is taken at the target's parameters: one batched call
        if before is not None and objective is not None:
            update = _update_sharpness(out, objective, hessian, before, unclipped_update)
            if update is not None:
                here["update_sharpness_next"] = update
        if objective is not None:
            held = op.gradient() if own_gradient and isinstance(op, HessianOperator) and op.objective is objective else None
            gradient = held if held is not None else gradient_of(objective)  # (the products' graph has it: no backward)
            if any(bool(g.any()) for g in gradient.values()):
                here["grad_sharpness"] = gradient
        if here:
            out.update(zip(here, directional_sharpnesses(op, list(here.values()))))
        sharp = _batch_sharpness(batches, hessian, gradient_of) if batches is not None else out.get("grad_sharpness")
        if sharp is not None:
            out["batch_sharpness"] = sharp
            if uniform_sgd:
                out["batch_sharpness_ratio"] = sharp * float(scaling.scale[0])
    return result


def _stability(out, op, scaling: StabilityScaling, lambda_max: float, tol: float, max_iter: int, seed: int,
               start: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``eos_ratio``, ``eos_threshold`` (+ per group, ``preconditioned_lambda_max``) into ``out``;
    returns the stability operator's top eigenvector (None when ``lambda_max`` sufficed)."""
    if scaling.kind == "sgd" and scaling.uniform:
        a_lr = 1.0 / float(scaling.scale[0])  # a* / lr
        out["eos_threshold"] = a_lr - scaling.weight_decay
        out["eos_ratio"] = (lambda_max + scaling.weight_decay) / a_lr
        return None
    if not bool(scaling.scale.any()):
        return None
    res = top_eigenvalues(StabilityOperator(op, scaling.scale, scaling.shift), which="LA", tol=tol, max_iter=max_iter,
                          seed=seed, return_eigenvectors=True, start=start)
    out["eos_ratio"] = res.value
    moved = scaling.groups[scaling.scale > 0]
    if moved.numel() and int(moved.min()) != int(moved.max()):  # several groups: each one's own ratio too
        for g in sorted(set(moved.tolist())):
            index = torch.nonzero((scaling.groups == g) & (scaling.scale > 0)).reshape(-1)
            sub = StabilityOperator(IndexOperator(op, index), scaling.scale[index],
                                    None if scaling.shift is None else scaling.shift[index])
            out[f"eos_ratio/group{g}"] = top_eigenvalues(sub, which="LA", tol=tol, max_iter=max_iter, seed=seed).value
    if scaling.threshold is not None:
        if scaling.kind == "adam":
            out["preconditioned_lambda_max"] = res.value * scaling.threshold
            out["eos_threshold"] = scaling.threshold
        elif scaling.weight_decay == scaling.weight_decay:  # SGD groups with one threshold, some params idle
            out["eos_threshold"] = scaling.threshold - scaling.weight_decay
    return res.eigenvectors[0]


def _update_sharpness(out, objective: Objective, hessian, before, unclipped) -> Optional[ParamDict]:
    """``update_sharpness`` (and ``_unclipped``) at ``before`` into ``out``; returns the update, whose
    sharpness at the new parameters the caller takes with the gradient's (None: no update)."""
    names = objective.layout.names
    update = OrderedDict((n, objective.params[n] - before[n]) for n in names if n in before)
    if len(update) < len(names) or not any(bool(u.any()) for u in update.values()):
        return None
    directions = {"update_sharpness": update}
    if unclipped is not None and all(unclipped.get(n) is not None for n in names):
        raw = OrderedDict((n, unclipped[n]) for n in names)
        if any(bool(u.any()) for u in raw.values()):
            directions["update_sharpness_unclipped"] = raw
    out.update(zip(directions, directional_sharpnesses(hessian(objective_at(objective, before)), list(directions.values()))))
    return update


def _batch_sharpness(batches: Iterable[Objective], hessian, gradient_of) -> Optional[float]:
    values = []
    for obj in batches:
        g = gradient_of(obj)
        if any(bool(v.any()) for v in g.values()):
            values.append(directional_sharpness(hessian(obj), g))
    return sum(values) / len(values) if values else None
