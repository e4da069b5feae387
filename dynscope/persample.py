"""Per-sample gradients and their first two moments over a batch.

Convention: ``g_i`` is the gradient of sample ``i``'s own loss ``l_i`` (not ``l_i / B``). For a
mean-reduced loss the batch gradient is therefore ``G_B = mean_i g_i``.

Two ways to get them:

* ``vmap``: ``vmap(grad(l_i))`` over the samples (any model torch.func can trace: LayerNorm,
  GELU, attention, embeddings, dropout), chunked so that a chunk's working memory stays under a
  cap. :func:`per_sample_grads` returns them materialised, ``[B, *shape]`` per tensor.
* ``hooks`` (the fast path, used by :func:`per_sample_moments` wherever it applies): one ordinary
  forward and backward of ``sum_i l_i``; forward hooks on ``nn.Linear``, ``nn.Conv1d``/``Conv2d``
  and ``nn.Embedding`` keep each layer's input and its output gradient, from which
  ``sum_i g_i`` and ``sum_i g_i**2`` follow without ever holding ``B x P`` numbers (for a Linear
  layer on ``[B, in]`` inputs: ``sum_i g_i**2 = (dY**2)^T (X**2)``). Layers that see a sequence
  (``[B, T, in]``), convolutions and layers called several times sum their per-sample
  contribution over positions before squaring (per layer, chunked over samples).

  It is valid only when the loss is the mean of independent per-sample losses and nothing mixes
  samples (BatchNorm in train mode does; in eval mode it is fine) and the layer sees the batch as
  its leading dimension. Each hooked tensor's ``sum_i g_i`` is checked against autograd's batch
  gradient; any tensor that fails the check, any parameter of another kind (LayerNorm, attention
  projections used through ``F.multi_head_attention_forward``, free ``nn.Parameter`` s), any
  shared (tied) parameter and any layer inside a sequence-first (``batch_first=False``) module
  falls back to the vmap path for just those tensors. :attr:`GradientMoments.methods` says which
  path each tensor took.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad
from torch.utils._pytree import tree_map

from .hvp import DEFAULT_MEMORY_CAP, activation_numel, is_out_of_memory
from .objective import NotPerSampleError, Objective, check_finite

Method = Literal["auto", "vmap"]


class _LazyTensors(Mapping):
    """A read-only mapping ``name -> tensor`` whose values are computed on first access and kept."""

    def __init__(self, names: Sequence[str], compute: Callable[[str], torch.Tensor]):
        self._names, self._compute, self._done = list(names), compute, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._done:
            if name not in self._names:
                raise KeyError(name)
            self._done[name] = self._compute(name)
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:  # without computing the value (Mapping's default would)
        return name in self._names

    def __reduce__(self):  # pickled (torch.save, multiprocessing) as an OrderedDict: closures do not pickle
        return OrderedDict, (list(self.items()),)


@dataclass
class GradientMoments:
    """Count, mean and summed squared deviations of the per-sample gradients, per tensor (float64).

    ``mean[name]`` is the batch gradient ``G_B = mean_i g_i``; ``sq_dev[name]`` is
    ``sum_i (g_i - G_B)**2`` elementwise, so the unbiased per-coordinate variance is
    ``sq_dev / (count - 1)``. ``methods[name]`` is ``"hooks"`` or ``"vmap"``. ``eps`` is the
    machine epsilon of the dtype the gradients were computed in (0 for exact inputs): variances
    at the level of its rounding noise are treated as zero by :func:`~dynscope.gradient_snr`.
    ``sums[name]`` holds ``(sum_i g_i, sum_i g_i**2)`` in the gradients' dtype for the tensors of
    the hook path; their ``mean`` and ``sq_dev`` are computed from them on first access, and the
    summaries of :mod:`dynscope.noise` read them in cache-sized float64 pieces (:meth:`pieces`)
    without full-size float64 copies.

    Example:
        >>> import torch
        >>> g = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
        >>> m = GradientMoments.from_samples({"w": g})
        >>> m.count, m.mean["w"].tolist(), m.variance()["w"].tolist()
        (2, [2.0, 0.0], [2.0, 0.0])
    """

    count: int
    mean: Mapping[str, torch.Tensor]
    sq_dev: Mapping[str, torch.Tensor]
    methods: Dict[str, str] = field(default_factory=dict)
    eps: float = 0.0
    sums: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_samples(cls, grads: Dict[str, torch.Tensor], method: str = "vmap") -> "GradientMoments":
        """Moments of materialised per-sample gradients ``{name: [B, *shape]}``."""
        return _chunk_moments(grads, method)

    @classmethod
    def from_sums(cls, count: int, sums: Dict[str, torch.Tensor], sq_sums: Dict[str, torch.Tensor], method: str = "hooks"):
        """Moments from ``sum_i g_i`` and ``sum_i g_i**2`` (rounding can make tiny variances 0)."""
        raw = OrderedDict((n, (s, sq_sums[n])) for n, s in sums.items())
        mean = _LazyTensors(raw, lambda n: _mean_from_sums(raw[n][0], count))
        sq_dev = _LazyTensors(raw, lambda n: _sq_dev_from_sums(raw[n][1], mean[n], count))
        return cls(count, mean, sq_dev, {n: method for n in raw}, _eps(next(iter(sq_sums.values()))), raw)

    def pieces(self, name: str, size: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(mean, sq_dev)`` of one tensor as flat pieces of ``size`` elements.

        The default size keeps a piece's temporaries in a CPU core's cache (64Ki elements); on
        other devices the whole tensor is one piece. Where the raw sums exist the pieces come from
        them, in their dtype (float32 at least): ``sq_dev = sum g**2 - count mean**2`` then loses
        to cancellation about what the sums lost to rounding already, so float64 would not be
        more accurate, only slower. Elsewhere they are float64.
        """
        mean = self.mean[name] if name not in self.sums else None
        total = self.sums[name][0].numel() if mean is None else mean.numel()
        device = (self.sums[name][0] if mean is None else mean).device
        step = size or (PIECE if device.type == "cpu" else max(total, 1))
        for start in range(0, total, step):
            part = slice(start, min(total, start + step))
            if mean is not None:
                yield mean.reshape(-1)[part], self.sq_dev[name].reshape(-1)[part]
            else:
                s1, s2 = (t.reshape(-1)[part].to(_compute_dtype(t)) for t in self.sums[name])
                m = s1 / self.count
                yield m, torch.addcmul(s2, m, m, value=-self.count).clamp_min_(0)

    def max_second_moment(self, name: str) -> float:
        """``max_j mean_i g_ij**2`` over the coordinates of one tensor (0 for an empty tensor)."""
        if name in self.sums:
            sq = self.sums[name][1]
            return float(sq.amax()) / self.count if sq.numel() else 0.0
        best = 0.0
        for m, d in self.pieces(name):
            best = max(best, float(torch.addcmul(d, m, m, value=self.count).amax()) / self.count)
        return best

    def variance(self) -> "OrderedDict[str, torch.Tensor]":
        """Unbiased (``ddof=1``) per-coordinate variance of the per-sample gradients."""
        if self.count < 2:
            raise ValueError(f"the variance of per-sample gradients needs at least 2 samples, got {self.count}")
        return OrderedDict((n, d / (self.count - 1)) for n, d in self.sq_dev.items())

    def all_reduced(self, sum_fn: Callable[[torch.Tensor], torch.Tensor]) -> "GradientMoments":
        """The moments of the union of every rank's samples; ``sum_fn`` sums a tensor over ranks.

        One collective: counts, sums and sums of squares travel in a single float64 vector.

        Example:
            >>> import torch
            >>> a = GradientMoments.from_samples({"w": torch.tensor([[1.0], [2.0]])})
            >>> a.all_reduced(lambda t: 2 * t).count  # as if two ranks held the same samples
            4
        """
        names = list(self.mean)
        n = float(self.count)
        sums = [self.mean[k].reshape(-1) * n for k in names]
        squares = [(self.sq_dev[k] + n * self.mean[k] ** 2).reshape(-1) for k in names]
        total = sum_fn(torch.cat([torch.tensor([n], dtype=torch.float64, device=sums[0].device)] + sums + squares))
        count = int(round(float(total[0])))
        flat_sums, flat_sq = total[1:].chunk(2)
        mean, sq_dev, start = OrderedDict(), OrderedDict(), 0
        for k in names:
            shape, size = self.mean[k].shape, self.mean[k].numel()
            s, q = flat_sums[start : start + size], flat_sq[start : start + size]
            mean[k] = (s / count).reshape(shape)
            sq_dev[k] = (q - s * s / count).clamp_min(0).reshape(shape)
            start += size
        return GradientMoments(count, mean, sq_dev, dict(self.methods), self.eps)


PIECE = 1 << 16  # elements per piece of the float64 summaries (a core's cache)
BLOCK_ELEMENTS = 1 << 20  # elements per temporary of the per-sample moments


def _mean_from_sums(s1: torch.Tensor, count: int) -> torch.Tensor:
    return s1.to(torch.float64, copy=True).div_(count)


def _sq_dev_from_sums(s2: torch.Tensor, mean: torch.Tensor, count: int) -> torch.Tensor:
    # sum_i g_i**2 - count * mean**2 in float64, in place on the float64 copy of the squares
    return s2.to(torch.float64, copy=True).addcmul_(mean, mean, value=-count).clamp_min_(0)


def _eps(t: torch.Tensor) -> float:
    return float(torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0


def _chunk_moments(chunk: Dict[str, torch.Tensor], method: str) -> GradientMoments:
    first = next(iter(chunk.values()))
    count = int(first.shape[0])
    mean, sq_dev = OrderedDict(), OrderedDict()
    for name, g in chunk.items():
        # two passes in the gradients' dtype, over column blocks whose temporary stays ~1M
        # elements (a [chunk, P] one costs page faults); torch.var_mean over dim 0 is up to
        # 70x slower on CPU
        flat = g.detach().reshape(count, -1)
        avg = flat.mean(0)
        sq = torch.empty_like(avg)
        step = max(1, BLOCK_ELEMENTS // count)
        for start in range(0, flat.shape[1], step):
            cols = slice(start, start + step)
            torch.sum((flat[:, cols] - avg[cols]).square_(), 0, out=sq[cols])
        mean[name] = avg.double().reshape(g.shape[1:])
        sq_dev[name] = sq.double().reshape(g.shape[1:])
    return GradientMoments(count, mean, sq_dev, {n: method for n in chunk}, _eps(first))


def _merge(a: Optional[GradientMoments], b: GradientMoments) -> GradientMoments:
    """Chan et al.'s pairwise update: exact, and stable where sums of squares would cancel."""
    if a is None:
        return b
    n = a.count + b.count
    mean, sq_dev = OrderedDict(), OrderedDict()
    for name in a.mean:
        delta = b.mean[name] - a.mean[name]
        mean[name] = a.mean[name] + delta * (b.count / n)
        sq_dev[name] = a.sq_dev[name] + b.sq_dev[name] + delta.square() * (a.count * b.count / n)
    return GradientMoments(n, mean, sq_dev, {**a.methods, **b.methods}, max(a.eps, b.eps))


def _combine(parts: Sequence[GradientMoments], order: Sequence[str]) -> GradientMoments:
    """Put moments of disjoint parameter sets (same samples) together, in ``order``."""
    owner = {name: part for part in parts for name in part.mean}
    return GradientMoments(
        parts[0].count,
        _LazyTensors(order, lambda n: owner[n].mean[n]),
        _LazyTensors(order, lambda n: owner[n].sq_dev[n]),
        {n: owner[n].methods[n] for n in order},
        max(part.eps for part in parts),
        OrderedDict((n, owner[n].sums[n]) for n in order if n in owner[n].sums),
    )


# -- the vmap path ------------------------------------------------------------------------------


def _slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    return tree_map(
        lambda t: t[start:stop] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size else t, batch
    )


def _in_dims(batch: Any, size: int) -> Any:
    return tree_map(lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == size else None, batch)


def check_per_sample(objective: Objective) -> None:
    """Raise :class:`~dynscope.NotPerSampleError` unless the per-sample decomposition is sound.

    Per-sample gradients describe the batch gradient only when the loss is the mean of one loss
    per sample and no layer mixes samples. This checks that the per-sample losses exist, that
    their mean equals the objective's loss (it does not for ``reduction="sum"``, class-weighted
    cross-entropy or a batch-level loss such as a contrastive one) and that no BatchNorm layer runs
    in train mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> check_per_sample(Objective(nn.Linear(2, 1), nn.MSELoss(), (x, y)))  # fine
        >>> try:
        ...     check_per_sample(Objective(nn.Linear(2, 1), nn.MSELoss(reduction="sum"), (x, y)))
        ... except NotPerSampleError as error:
        ...     print("is not the mean of the per-sample losses" in str(error))
        True
    """
    if objective.mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in objective.model.modules()):
        raise NotPerSampleError(
            "BatchNorm in train mode normalises with statistics of the whole batch, so samples are not "
            "independent and per-sample gradients are undefined; measure with mode='eval'"
        )
    # two separate measuring() blocks: each forks the RNG afresh, so train-mode dropout draws the same masks
    with objective.measuring(), torch.no_grad():
        losses = objective.sample_losses(objective.params)
    if losses.dim() != 1 or losses.shape[0] != objective.batch_size:
        raise NotPerSampleError(
            f"expected one loss per sample (shape [{objective.batch_size}]), got shape {tuple(losses.shape)}"
        )
    with objective.measuring(), torch.no_grad():
        loss = objective.loss(objective.params)
    check_finite(losses.detach(), "the per-sample losses")  # NaN != NaN would read as "not per sample"
    mean, total = float(losses.double().mean()), float(loss)
    # Low-precision losses (bf16-true) round each per-sample loss and the mean: scale the tolerance.
    rel = max(1e-4, 4 * torch.finfo(losses.dtype).eps) if losses.is_floating_point() else 1e-4
    if not math.isclose(mean, total, rel_tol=rel, abs_tol=rel * 1e-2 * max(1.0, float(losses.abs().double().mean()))):
        raise NotPerSampleError(
            f"the loss ({total:.6g}) is not the mean of the per-sample losses ({mean:.6g}): per-sample gradient "
            "metrics need a mean-reduced loss of independent samples (reduction='mean', no class weights, no "
            "batch-level terms); return per-sample losses from sample_loss_fn / dynscope_loss to define them"
        )


def default_sample_chunk(objective: Objective, numel: int, memory_cap: int = DEFAULT_MEMORY_CAP) -> int:
    """Samples per vmap chunk so that its working memory stays under ``memory_cap`` bytes.

    Per sample we budget three gradient-sized tensors (vmap's per-sample gradient, its copy in the
    output, one temporary) and three times the sample's share of the forward activations.
    """
    itemsize = torch.finfo(objective.dtype).bits // 8
    per_sample_act = activation_numel(objective) / objective.batch_size
    per_sample = itemsize * (3 * numel + 3 * per_sample_act)
    return int(max(1, min(objective.batch_size, memory_cap // max(per_sample, 1))))


def _vmap_chunks(
    objective: Objective, names: Sequence[str], chunk_size: Optional[int], memory_cap: int
) -> Iterator[Dict[str, torch.Tensor]]:
    """Per-sample gradients of the tensors ``names`` (the others held fixed), chunk by chunk."""
    params = objective.params
    fixed = OrderedDict((n, p) for n, p in params.items() if n not in names)
    wanted = OrderedDict((n, params[n]) for n in names)
    size = objective.batch_size

    def sample_loss(sub, sample):
        return objective.sample_loss({**fixed, **sub}, sample)

    randomness = "different" if objective.mode == "train" else "error"
    per_sample = torch.vmap(grad(sample_loss), in_dims=(None, _in_dims(objective.batch, size)), randomness=randomness)
    numel = sum(p.numel() for p in wanted.values())
    chunk = chunk_size or default_sample_chunk(objective, numel, memory_cap)
    start = 0
    with objective.measuring():
        while start < size:
            stop = min(size, start + chunk)
            try:
                out = per_sample(wanted, _slice_batch(objective.batch, start, stop, size))
            except Exception as error:  # noqa: BLE001 - only an OOM we can shrink is handled
                if is_out_of_memory(error) and chunk > 1:
                    chunk = max(1, chunk // 2)
                    continue
                raise
            yield OrderedDict((n, check_finite(out[n].detach(), "a per-sample gradient")) for n in names)
            start = stop


def per_sample_grads(
    objective: Objective,
    chunk_size: Optional[int] = None,
    *,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    param_names: Optional[Sequence[str]] = None,
) -> "OrderedDict[str, torch.Tensor]":
    """The gradient of each sample's own loss: ``{name: [B, *param.shape]}``.

    Computed with ``vmap(grad(l_i))`` over the samples, ``chunk_size`` samples at a time (default:
    as many as fit in ``memory_cap`` bytes of working memory; the result itself is ``B x P``).
    ``g_i`` is the gradient of ``l_i`` itself, so the batch gradient of a mean-reduced loss is
    ``g.mean(0)``. In train mode each sample draws its own dropout mask.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> obj = Objective(model, nn.functional.cross_entropy, (torch.randn(6, 3), torch.randint(0, 2, (6,))))
        >>> g = per_sample_grads(obj, chunk_size=4)
        >>> g["0.weight"].shape
        torch.Size([6, 4, 3])
        >>> torch.allclose(g["2.bias"].mean(0), obj.gradient()["2.bias"], atol=1e-6)
        True
    """
    names = list(objective.params) if param_names is None else list(param_names)
    unknown = [n for n in names if n not in objective.params]
    if unknown:
        raise ValueError(f"unknown or frozen parameter names: {unknown}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}")
    chunks = list(_vmap_chunks(objective, names, chunk_size, memory_cap))
    return OrderedDict((n, torch.cat([c[n] for c in chunks])) for n in names)


def _vmap_moments(objective: Objective, names: Sequence[str], chunk_size: Optional[int], memory_cap: int) -> GradientMoments:
    out = None
    for chunk in _vmap_chunks(objective, names, chunk_size, memory_cap):
        out = _merge(out, _chunk_moments(chunk, "vmap"))
    return out


# -- the hook path --------------------------------------------------------------------------------

Record = List[Optional[torch.Tensor]]  # [layer input, gradient of the layer output]


def _plain(module: nn.Module, cls: type) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def _rule(module: nn.Module) -> Optional[Callable]:
    if _plain(module, nn.Linear):
        return _linear_sums
    if (_plain(module, nn.Conv1d) or _plain(module, nn.Conv2d)) and module.groups == 1 and module.padding_mode == "zeros":
        return _conv_sums
    if _plain(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
        return _embedding_sums
    return None


def _hook_plan(objective: Objective) -> "OrderedDict[nn.Module, Dict[str, str]]":
    """Supported layers and, for each, ``{attribute: parameter name}`` of the tensors to hook."""
    model = objective.model
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    name_of = {id(p): n for n, p in model.named_parameters()}
    seq_first = set()
    for module in model.modules():
        # a sequence-first module (or one holding one, like nn.TransformerEncoderLayer) feeds its layers
        # [T, B, ...]: their leading dimension is not the batch
        if any(getattr(m, "batch_first", True) is False for m in (module, *module.children())):
            seq_first.update(id(m) for m in module.modules())
    plan = OrderedDict()
    for module in model.modules():
        if id(module) in seq_first or _rule(module) is None:
            continue
        attrs = {}
        for attr, p in module.named_parameters(recurse=False):
            name = name_of.get(id(p))
            if name in objective.params and uses[id(p)] == 1:
                attrs[attr] = name
        if attrs:
            plan[module] = attrs
    return plan


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> bool:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    return float((a.double() - b.double()).abs().max()) <= rtol * scale


def _chunks(size: int, per_sample_bytes: int, memory_cap: int) -> Iterator[slice]:
    step = int(max(1, min(size, memory_cap // max(per_sample_bytes, 1))))
    for start in range(0, size, step):
        yield slice(start, min(size, start + step))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _linear_sums(module: nn.Linear, records: List[Record], attrs: Dict[str, str], size: int, cap: int):
    """``{attr: (sum_i g_i**2, check)}`` where ``check(autograd sum_i g_i) -> bool``."""
    dtype = _compute_dtype(records[0][1])
    if len(records) == 1 and records[0][0].dim() == 2:
        x, dy = records[0][0].to(dtype), records[0][1].to(dtype)
        out = {}
        if "weight" in attrs:
            hook_rows = dy.T @ x.sum(1)  # cheap check: row sums of sum_i dy_i x_i^T
            out["weight"] = (dy.square().T @ x.square(), lambda s1, r=hook_rows: _close(s1.sum(1), r))
        if "bias" in attrs:
            s1_bias = dy.sum(0)
            out["bias"] = (dy.square().sum(0), lambda s1, r=s1_bias: _close(s1, r))
        return out
    xs = torch.cat([r[0].reshape(size, -1, r[0].shape[-1]) for r in records], 1).to(dtype)
    dys = torch.cat([r[1].reshape(size, -1, r[1].shape[-1]) for r in records], 1).to(dtype)
    itemsize = torch.finfo(dtype).bits // 8
    sums = {a: [0.0, 0.0] for a in attrs}
    for part in _chunks(size, 2 * itemsize * module.weight.numel(), cap):
        if "weight" in attrs:
            g = torch.einsum("bto,bti->boi", dys[part], xs[part])
            sums["weight"][0] = sums["weight"][0] + g.sum(0)
            sums["weight"][1] = sums["weight"][1] + g.square().sum(0)
        if "bias" in attrs:
            g = dys[part].sum(1)
            sums["bias"][0] = sums["bias"][0] + g.sum(0)
            sums["bias"][1] = sums["bias"][1] + g.square().sum(0)
    return {a: (s2, lambda t, s1=s1: _close(t, s1)) for a, (s1, s2) in sums.items()}


def _conv_padding(module: nn.Module, spatial: int) -> List[Tuple[int, int]]:
    kernel, dilation = module.kernel_size, module.dilation
    if module.padding == "valid":
        return [(0, 0)] * spatial
    if module.padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in module.padding]


def _conv_sums(module: nn.Module, records: List[Record], attrs: Dict[str, str], size: int, cap: int):
    one_d = isinstance(module, nn.Conv1d)
    dtype = _compute_dtype(records[0][1])
    pads = _conv_padding(module, 1 if one_d else 2)
    kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    if one_d:
        pads, kernel, stride, dilation = [(0, 0)] + pads, (1,) + kernel, (1,) + stride, (1,) + dilation
    flat_pad = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last dimension first

    def columns(x: torch.Tensor) -> torch.Tensor:  # [b, C*kh*kw, L]
        x = x.unsqueeze(2) if one_d else x
        return F.unfold(F.pad(x, flat_pad), kernel, dilation=dilation, stride=stride)

    weight_numel = module.weight.numel()
    per_sample = torch.finfo(dtype).bits // 8 * (2 * weight_numel + sum(r[0][0].numel() for r in records) * math.prod(kernel))
    sums = {a: [0.0, 0.0] for a in attrs}
    for part in _chunks(size, per_sample, cap):
        cols = torch.cat([columns(r[0][part].to(dtype)) for r in records], 2)
        dys = torch.cat([r[1][part].to(dtype).reshape(cols.shape[0], module.out_channels, -1) for r in records], 2)
        if "weight" in attrs:
            g = torch.einsum("bol,bkl->bok", dys, cols).reshape(-1, *module.weight.shape)
            sums["weight"][0] = sums["weight"][0] + g.sum(0)
            sums["weight"][1] = sums["weight"][1] + g.square().sum(0)
        if "bias" in attrs:
            g = dys.sum(2)
            sums["bias"][0] = sums["bias"][0] + g.sum(0)
            sums["bias"][1] = sums["bias"][1] + g.square().sum(0)
    return {a: (s2, lambda t, s1=s1: _close(t, s1)) for a, (s1, s2) in sums.items()}


def _embedding_sums(module: nn.Embedding, records: List[Record], attrs: Dict[str, str], size: int, cap: int):
    dtype = _compute_dtype(records[0][1])
    vocab, dim = module.weight.shape
    idx = torch.cat([r[0].reshape(size, -1) for r in records], 1)
    dy = torch.cat([r[1].reshape(size, -1, dim) for r in records], 1).to(dtype)
    keep = idx != module.padding_idx if module.padding_idx is not None else torch.ones_like(idx, dtype=torch.bool)
    sample = torch.arange(size, device=idx.device).unsqueeze(1).expand_as(idx)
    keys = (sample * vocab + idx)[keep]
    # per-sample rows: sum the output gradients of equal (sample, token) pairs, then square
    unique, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(unique.numel(), dim, dtype=dtype, device=dy.device).index_add_(0, inverse, dy[keep])
    token = unique % vocab
    s1 = torch.zeros(vocab, dim, dtype=dtype, device=dy.device).index_add_(0, token, rows)
    s2 = torch.zeros(vocab, dim, dtype=dtype, device=dy.device).index_add_(0, token, rows.square())
    return {"weight": (s2, lambda t: _close(t, s1))}


def _hook_moments(objective: Objective, plan, chunk_cap: int) -> Tuple[GradientMoments, List[str]]:
    """Moments of the hooked tensors, and the names left for the vmap path."""
    size = objective.batch_size
    records: Dict[nn.Module, List[Record]] = {m: [] for m in plan}

    def forward_hook(module, inputs, output):
        if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad:
            return
        record: Record = [inputs[0].detach(), None]
        records[module].append(record)

        def keep(gradient):
            record[1] = gradient.detach()

        output.register_hook(keep)

    handles = [m.register_forward_hook(forward_hook) for m in plan]
    try:
        with objective.measuring():
            params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in objective.params.items())
            losses = objective.sample_losses(params)
            if losses.dim() != 1 or losses.shape[0] != size:
                raise NotPerSampleError(f"expected one loss per sample (shape [{size}]), got {tuple(losses.shape)}")
            check_finite(losses.detach(), "the per-sample losses")
            grads = torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    s1 = OrderedDict((n, torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(params.items(), grads))
    done_sums, done_sq = OrderedDict(), OrderedDict()
    for module, attrs in plan.items():
        recs = [r for r in records[module] if r[1] is not None]
        if not recs or any(r[0].shape[0] != size or r[1].shape[0] != size for r in recs):
            continue
        for attr, (s2, check) in _rule(module)(module, recs, attrs, size, chunk_cap).items():
            name = attrs[attr]
            if check(s1[name]):
                done_sums[name], done_sq[name] = s1[name], s2
    rest = [n for n in objective.params if n not in done_sums]
    if not done_sums:
        return None, rest
    return GradientMoments.from_sums(size, done_sums, done_sq, "hooks"), rest


def per_sample_moments(
    objective: Objective,
    method: Method = "auto",
    *,
    chunk_size: Optional[int] = None,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    check: bool = True,
) -> GradientMoments:
    """Mean and summed squared deviations of the per-sample gradients, without keeping ``B x P``.

    Args:
        objective: the loss; must be a mean of independent per-sample losses.
        method: ``"auto"`` (hooks where they apply, vmap for the other tensors) or ``"vmap"``.
        chunk_size: samples per vmap chunk (default: sized to ``memory_cap``).
        memory_cap: bytes of working memory per chunk, for the vmap path and for the hook path's
            per-layer per-sample gradients of sequence, convolution and repeated layers.
        check: first verify the per-sample decomposition (:func:`check_per_sample`; one extra
            forward pass).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> obj = Objective(model, nn.functional.cross_entropy, (torch.randn(8, 3), torch.randint(0, 2, (8,))))
        >>> fast, slow = per_sample_moments(obj), per_sample_moments(obj, "vmap")
        >>> fast.methods["0.weight"], slow.methods["0.weight"]
        ('hooks', 'vmap')
        >>> torch.allclose(fast.sq_dev["0.weight"], slow.sq_dev["0.weight"], atol=1e-6)
        True
    """
    if method not in ("auto", "vmap"):
        raise ValueError(f"method must be 'auto' or 'vmap', got {method!r}")
    if objective.batch_size < 2:
        raise ValueError(f"per-sample gradient statistics need a batch of at least 2 samples, got {objective.batch_size}")
    if check:
        check_per_sample(objective)
    names = list(objective.params)
    parts = []
    rest = names
    if method == "auto":
        plan = _hook_plan(objective)
        if plan:
            hooked, rest = _hook_moments(objective, plan, memory_cap)
            if hooked is not None:
                parts.append(hooked)
    if rest:
        parts.append(_vmap_moments(objective, rest, chunk_size, memory_cap))
    return _combine(parts, names)
