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
  layer on ``[B, in]`` inputs: ``sum_i g_i**2 = (dY**2)^T (X**2)``, one GEMM, with ``sum_i g_i``
  autograd's own). Layers that see a sequence (``[B, T, in]``), convolutions (one grouped
  weight-gradient kernel with the samples as groups) and layers called several times sum their
  per-sample contribution over positions before squaring (per layer, chunked over samples).
  The spread ``sum_i (g_i - mean)**2`` stays in the gradients' dtype (float32 at least): where
  float32 would cancel (``n mean**2 > sum g**2 / 2``, high SNR) those rows are recomputed in
  float64; materialised per-sample gradients are shifted by the first sample's instead.

  It is valid only when the loss is the mean of independent per-sample losses and nothing mixes
  samples (BatchNorm in train mode does; in eval mode it is fine). Three checks guard it, per
  tensor: the batch dimension of every layer call is the one dimension that shrinks when the same
  model runs on a smaller probe batch (so a sequence-first ``[T, B, ...]`` input with ``T == B`` is
  read on its batch dim, and a batch-independent input is not hooked); every edge into the tensor
  in the loss's autograd graph must be a layer call the hooks saw (a weight also used through
  ``F.linear`` elsewhere is not hooked); and where per-sample gradients are materialised, their sum
  must equal autograd's batch gradient element by element within the summation's rounding bound.
  Tensors that fail, parameters of other kinds (LayerNorm, attention projections used through
  ``F.multi_head_attention_forward``, free ``nn.Parameter`` s) and tensors held by two modules
  (tied weights) go to the vmap path. The probe batch (4 samples) runs once per model and call
  structure (the layers' call shapes on the batch); later measurements reuse its answer.

* ``loop``: where vmap cannot trace the model (data-dependent control flow such as Hugging Face's
  attention-mask checks, ``nn.GRU``), one plain backward per sample, chunked to the memory cap;
  picked automatically when vmap raises on the first chunk. :attr:`GradientMoments.methods` says
  which path each tensor took (``"hooks"``, ``"vmap"`` or ``"loop"``).
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad
from torch.utils._pytree import tree_map

from .hvp import DEFAULT_MEMORY_CAP, activation_numel, is_out_of_memory
from .objective import NonFiniteError, NotPerSampleError, Objective, _named_tensors, check_finite, tensor_names

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
    ``sums[name]`` holds a :class:`RawSums` ``(sum_i (g_i - c), sq_dev, c, max_j mean_i g_ij**2)``
    in the gradients' dtype (float32 at least) for the tensors of the hook path; their float64
    ``mean`` and ``sq_dev`` are computed from them on first access, and the summaries of
    :mod:`dynscope.noise` read them in cache-sized pieces (:meth:`scaled_pieces`) without
    full-size float64 copies.

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
    sums: Dict[str, "RawSums"] = field(default_factory=dict, repr=False)

    @classmethod
    def from_samples(cls, grads: Dict[str, torch.Tensor], method: str = "vmap") -> "GradientMoments":
        """Moments of materialised per-sample gradients ``{name: [B, *shape]}``."""
        return _chunk_moments(grads, method)

    @classmethod
    def from_sums(
        cls,
        count: int,
        sums: Dict[str, torch.Tensor],
        sq_sums: Dict[str, torch.Tensor],
        method: str = "hooks",
        shifts: Optional[Dict[str, torch.Tensor]] = None,
    ):
        """Moments from ``sum_i (g_i - c)`` and ``sum_i (g_i - c)**2`` for a shift ``c`` (default 0).

        A shift near the mean (one sample's gradient) keeps ``sum (g - c)**2 - (sum (g - c))**2 / n``
        free of the cancellation that ruins it in float32 at high signal-to-noise ratios.
        """
        shifts = shifts or {}
        raw = OrderedDict((n, _finalize(s, sq_sums[n], count, shifts.get(n))) for n, s in sums.items())
        return cls._from_raw(count, raw, method, _eps(next(iter(sq_sums.values()))))

    @classmethod
    def _from_raw(cls, count: int, raw: "OrderedDict[str, RawSums]", method: str, eps: float) -> "GradientMoments":
        mean = _LazyTensors(raw, lambda n: _mean_from_sums(raw[n], count))
        sq_dev = _LazyTensors(raw, lambda n: raw[n].sq_dev.to(torch.float64, copy=True))
        return cls(count, mean, sq_dev, {n: method for n in raw}, eps, raw)

    def pieces(self, name: str, size: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(mean, sq_dev)`` of one tensor as flat pieces of ``size`` elements.

        The default size keeps a piece's temporaries in a CPU core's cache (64Ki elements); on
        other devices the whole tensor is one piece. Where the raw sums exist the pieces come from
        them, in their dtype (float32 at least): ``sq_dev = sum g**2 - count mean**2`` then loses
        to cancellation about what the sums lost to rounding already, so float64 would not be
        more accurate, only slower. Elsewhere they are float64.
        """
        for t, scale, sq in self.scaled_pieces(name, size):
            yield (t * scale if scale != 1.0 else t), sq

    def scaled_pieces(self, name: str, size: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, float, torch.Tensor]]:
        """``(t, scale, sq_dev)``: :meth:`pieces` with the mean as ``t * scale`` (one division fewer).

        For the unshifted sums of the hook path ``t`` is ``sum_i g_i`` itself and ``scale`` is
        ``1 / count``; elsewhere ``t`` is the mean and ``scale`` 1.
        """
        raw = self.sums.get(name)
        mean = self.mean[name] if raw is None else None
        flat_t = (mean if raw is None else raw.total).reshape(-1)
        flat_sq = (self.sq_dev[name] if raw is None else raw.sq_dev).reshape(-1)
        total = flat_t.numel()
        step = size or (PIECE if flat_t.device.type == "cpu" else max(total, 1))
        scale = 1.0 / self.count if raw is not None and raw.shift is None else 1.0
        for start in range(0, total, step):
            part = slice(start, min(total, start + step))
            t = flat_t[part]
            if raw is not None and raw.shift is not None:
                t = torch.add(raw.shift.reshape(-1)[part].to(t.dtype), t, alpha=1.0 / self.count)
            yield t, scale, flat_sq[part]

    def max_second_moment(self, name: str) -> float:
        """``max_j mean_i g_ij**2`` over the coordinates of one tensor (0 for an empty tensor)."""
        raw = self.sums.get(name)
        if raw is not None and raw.second is not None:
            return raw.second
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


PIECE = 1 << 16  # elements per piece of the summaries (a core's cache)
BLOCK_ELEMENTS = 1 << 20  # elements per temporary of the per-sample moments
SCRATCH_BYTES = 8 << 20  # largest temporary served from a buffer kept between measurements (CPU)
_SCRATCH = threading.local()


def scratch(slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised temporary from a per-thread CPU buffer kept between calls (fresh elsewhere or when large).

    glibc gives freed heap memory back to the operating system, so fresh temporaries of a few
    hundred KiB cost a page fault per 4 KiB on first touch each time: on the 64-256-256-10 MLP
    800-1,100 faults, about 2 ms, more than a training step. ``slot`` names the use; a slot's
    tensor is valid until that slot is asked for again, so only temporaries come from here.
    """
    views = _SCRATCH.__dict__.setdefault("views", {})
    key = (slot, dtype, device, tuple(shape))
    view = views.get(key)
    if view is not None:
        return view
    numel = math.prod(shape)
    if device.type != "cpu" or numel * torch.empty((), dtype=dtype).element_size() > SCRATCH_BYTES:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = pool[(slot, dtype)] = torch.empty(numel, dtype=dtype)
        for stale in [k for k in views if k[:2] == (slot, dtype)]:  # views of the old buffer
            del views[stale]
    if len(views) > 64:  # shapes that vary from call to call
        views.clear()
    views[key] = view = buf[:numel].view(tuple(shape))
    return view


class RawSums(NamedTuple):
    """One tensor's per-sample moments as the hook path leaves them, in the gradients' dtype (float32 at least).

    ``total = sum_i (g_i - c)``, ``sq_dev = sum_i (g_i - mean)**2`` (non-negative), the shift ``c``
    (None: 0) and ``second = max_j mean_i g_ij**2`` (None: not known).
    """

    total: torch.Tensor
    sq_dev: torch.Tensor
    shift: Optional[torch.Tensor] = None
    second: Optional[float] = None


def _finalize(s1: torch.Tensor, s2: torch.Tensor, count: int, shift: Optional[torch.Tensor] = None) -> RawSums:
    """:class:`RawSums` from ``sum_i (g_i - c)`` and ``sum_i (g_i - c)**2``.

    ``sq_dev = s2 - s1**2 / count`` in their dtype (float32 at least): it loses to cancellation
    about what ``s2`` lost to rounding already (where float32 would cancel, the rules recompute
    in float64 or shift first), so float64 would not be more accurate, only slower.
    """
    dtype = torch.promote_types(_compute_dtype(s1), _compute_dtype(s2))
    s1, s2 = _as(s1, dtype), _as(s2, dtype)
    sq = torch.addcmul(s2, s1, s1, value=-1.0 / count).clamp_min_(0)
    second = None if shift is not None else (float(s2.amax()) / count if s2.numel() else 0.0)
    return RawSums(s1, sq, shift, second)


def _mean_from_sums(raw: RawSums, count: int) -> torch.Tensor:
    mean = raw.total.to(torch.float64, copy=True).div_(count)
    return mean.add_(raw.shift) if raw.shift is not None else mean


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
        # deviations from the first sample, exact where samples agree (Sterbenz): equal per-sample
        # gradients give a spread of exactly 0, not the rounding of their float32 mean
        flat = g.detach().reshape(count, -1)
        avg, sq = torch.empty_like(flat[0]), torch.empty_like(flat[0])
        step = max(1, BLOCK_ELEMENTS // count)
        for start in range(0, flat.shape[1], step):
            cols = slice(start, start + step)
            d = flat[:, cols] - flat[0, cols]
            torch.mean(d, 0, out=avg[cols])
            torch.sum(d.sub_(avg[cols]).square_(), 0, out=sq[cols])
        mean[name] = avg.double().add_(flat[0].double()).reshape(g.shape[1:])
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
    if len(parts) == 1 and list(parts[0].mean) == list(order):  # one path for every tensor: nothing to put together
        return parts[0]
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

    Computed with ``vmap(grad(l_i))`` over the samples (a plain loop over samples for models vmap
    cannot trace), ``chunk_size`` samples at a time (default:
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
    chunks = list(_sample_chunks(objective, names, chunk_size, memory_cap)[1])
    return OrderedDict((n, torch.cat([c[n] for c in chunks])) for n in names)


def _loop_chunks(
    objective: Objective, names: Sequence[str], chunk_size: Optional[int], memory_cap: int
) -> Iterator[Dict[str, torch.Tensor]]:
    """The same per-sample gradients as :func:`_vmap_chunks`, one plain backward per sample.

    For models torch.vmap cannot trace (data-dependent control flow such as Hugging Face's
    attention-mask checks, ``nn.GRU``): each sample runs as a batch of one, so it works for any
    model whose samples are independent; chunks of samples stay under ``memory_cap``.
    """
    size = objective.batch_size
    chunk = chunk_size or max(1, memory_cap // max(1, 2 * torch.finfo(objective.dtype).bits // 8 * sum(
        objective.params[n].numel() for n in names)))
    params = OrderedDict((n, p.detach().requires_grad_(n in set(names))) for n, p in objective.params.items())
    wanted = [params[n] for n in names]
    with objective.measuring():
        for start in range(0, size, chunk):
            rows: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
            for i in range(start, min(size, start + chunk)):
                loss = objective.sample_losses(params, _slice_batch(objective.batch, i, i + 1, size))
                if loss.shape != (1,):
                    raise NotPerSampleError(f"a batch of one sample gave losses of shape {tuple(loss.shape)}")
                grads = torch.autograd.grad(loss[0], wanted, allow_unused=True)
                for n, p, g in zip(names, wanted, grads):
                    rows[n].append(torch.zeros_like(p) if g is None else g.detach())
            yield OrderedDict((n, check_finite(torch.stack(rows[n]), "a per-sample gradient")) for n in names)


def _is_vmap_limitation(error: BaseException) -> bool:
    """An error from vmap's tracing (no batching rule, data-dependent control flow), not from the model."""
    if is_out_of_memory(error) or not isinstance(error, (RuntimeError, NotImplementedError, ValueError, TypeError)):
        return False
    return not isinstance(error, (NotPerSampleError, NonFiniteError))


def _sample_chunks(
    objective: Objective, names: Sequence[str], chunk_size: Optional[int], memory_cap: int
) -> Tuple[str, Iterator[Dict[str, torch.Tensor]]]:
    """``(method, chunks)``: vmap's chunks, or the loop's where vmap cannot trace the model.

    Decided by whether vmap raises on the first chunk, the same on every call (no timing).
    """
    chunks = _vmap_chunks(objective, names, chunk_size, memory_cap)
    try:
        first = next(chunks)
    except StopIteration:
        return "vmap", iter(())
    except Exception as error:  # noqa: BLE001 - what vmap can trace, not how fast
        if not _is_vmap_limitation(error):
            raise
        return "loop", _loop_chunks(objective, names, chunk_size, memory_cap)
    return "vmap", itertools.chain([first], chunks)


def _vmap_moments(objective: Objective, names: Sequence[str], chunk_size: Optional[int], memory_cap: int) -> GradientMoments:
    out = None
    method, chunks = _sample_chunks(objective, names, chunk_size, memory_cap)
    for chunk in chunks:
        out = _merge(out, _chunk_moments(chunk, method))
    return out


# -- the hook path --------------------------------------------------------------------------------

Record = List[Any]  # [layer input, gradient of the layer output(, output shape)]


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
    # a tensor held by two modules (tied weights) gets gradient from both: vmap. One module reachable
    # under two names (an alias) is hooked once and sees all its calls: fine.
    # The Objective's walk of the modules and its names (named_parameters'); the generic named_* walks
    # cost more than the measurement's small ops.
    named = getattr(objective, "_named_modules", None)
    name_of = getattr(objective, "_tensor_names", None)
    if named is None or name_of is None:  # an Objective unpickled from an older version
        named = list(objective.model.named_modules())
        name_of = tensor_names(*_named_tensors(named))
    uses: Counter = Counter()
    modules = []
    for _, module in named:
        for p in module._parameters.values():
            if p is not None:
                uses[id(p)] += 1
        if _rule(module) is not None:
            modules.append(module)
    plan = OrderedDict()
    for module in modules:
        attrs = {}
        for attr, p in module._parameters.items():
            name = None if p is None else name_of.get(id(p))
            if name in objective.params and uses[id(p)] == 1:
                attrs[attr] = name
        if attrs:
            plan[module] = attrs
    return plan


GROUPED_CONV_DEVICES = ("cpu",)  # where a convolution's per-sample weight gradients come from one grouped kernel call
HookSums = Tuple[Any, Optional[torch.Tensor], int]  # RawSums, or _Pending for the spread of all at once
# (the moments, a bound >= sum of |terms| of sum_i g_i (None: sum_i g_i is autograd's own), number of terms)

HOT = 0.5  # recompute in float64 where n * mean**2 exceeds this share of sum g**2 (float32 would cancel)


def _agrees(autograd: torch.Tensor, hooked: torch.Tensor, bound: torch.Tensor, terms: int) -> bool:
    """Whether autograd's batch gradient equals the hooks' ``sum_i g_i`` up to rounding, element by element.

    Exact for what it certifies: any use of the weight the hooks did not see (``F.linear`` on the
    same weight elsewhere) shows up as a difference above the rounding bound of the summation,
    ``16 eps sqrt(terms) sum |terms|`` per element (eps of TF32 for float32 on CUDA). Works in
    cache-sized pieces. (The structural check of :func:`_graph_uses` comes first; this one also
    vouches for the arithmetic of the rules that materialise per-sample gradients.)
    """
    dtype = torch.promote_types(_compute_dtype(autograd), hooked.dtype)
    eps = max(float(torch.finfo(autograd.dtype).eps), float(torch.finfo(_compute_dtype(hooked)).eps))
    if autograd.is_cuda and dtype == torch.float32:
        eps = max(eps, 2.0**-10)
    tiny = float(torch.finfo(autograd.dtype).tiny) * terms
    scale = 16 * eps * math.sqrt(terms)
    a, h, b = autograd.reshape(-1), hooked.reshape(-1), bound.reshape(-1)
    step = PIECE if a.device.type == "cpu" else max(a.numel(), 1)
    for start in range(0, a.numel(), step):
        part = slice(start, start + step)
        diff = a[part].to(dtype) - h[part]
        if not bool((diff.abs_() <= b[part].to(dtype).mul_(scale).add_(tiny)).all()):
            return False
    return True


def _spread_and_hot_rows(s1: torch.Tensor, s2: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``sq = s2 - s1**2 / n`` (in place in ``s2``), the rows where it resolves badly, and ``max s2``.

    A coordinate is hot where ``s1**2 / n > HOT s2``, i.e. ``sq < (1 - HOT) s2``: there ``sq``
    carries the rounding of ``s2`` amplified more than ``1 / (1 - HOT)`` times (every negative
    ``sq`` is hot). Elsewhere ``sq`` is accurate to a few eps of itself and needs no clamping.
    """
    if s2.numel() == 0:
        return s2, torch.zeros(s2.shape[0], dtype=torch.bool, device=s2.device), 0.0
    second = float(s2.amax())
    hot = torch.addcmul(s2, s1, s1, value=-1.0 / (HOT * count)).reshape(s2.shape[0], -1).amin(1).lt(0)
    return s2.addcmul_(s1, s1, value=-1.0 / count), hot, second


def _spread(s1: torch.Tensor, s2: torch.Tensor, count: int, exact: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]) -> RawSums:
    """:class:`RawSums` of ``s1 = sum_i g_i``, ``s2 = sum_i g_i**2`` (``sq`` in place in ``s2``).

    Rows (along dim 0) with a hot coordinate (see :func:`_spread_and_hot_rows`) are recomputed
    by ``exact(rows) -> (s1, s2)`` in float64, the spread rounded once to the sums' dtype.
    """
    if s2.numel() == 0:
        return RawSums(s1, s2, None, 0.0)
    second = float(s2.amax())
    probe = torch.addcmul(s2, s1, s1, value=-1.0 / (HOT * count), out=scratch("hot", s2.shape, s2.dtype, s2.device))
    rows = probe.reshape(s2.shape[0], -1).amin(1).lt(0).nonzero()[:, 0] if float(probe.amin()) < 0 else None
    sq = s2.addcmul_(s1, s1, value=-1.0 / count)
    if rows is not None:
        e1, e2 = exact(rows)
        sq[rows] = e2.addcmul_(e1, e1, value=-1.0 / count).clamp_min_(0).to(sq.dtype)
    return RawSums(s1, sq, None, second / count)


class _Pending(NamedTuple):
    """A tensor's ``s1 = sum_i g_i``, ``s2 = sum_i g_i**2`` and rows recomputation, awaiting :func:`_spread_all`."""

    s1: torch.Tensor
    s2: torch.Tensor
    exact: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def _spread_all(items: Sequence[_Pending], count: int) -> List[RawSums]:
    """:func:`_spread` of several tensors at once: the probes side by side in one buffer, foreach calls.

    The same arithmetic tensor by tensor; on a small model the per-tensor dispatch of four small
    ops per tensor cost more than the ops. The probes live in one scratch buffer (fresh
    temporaries cost page faults, see :func:`scratch`), so one ``amin`` says whether any row is hot.
    """
    live = [p for p in items if p.s2.numel()]
    if len(live) < 2 or len({(p.s2.device, p.s2.dtype) for p in live}) > 1:
        return [_spread(p.s1, p.s2, count, p.exact) for p in items]
    s1s, s2s = [p.s1 for p in live], [p.s2 for p in live]
    seconds = torch.stack(torch._foreach_max(s2s)).tolist()
    flat = scratch("hot", (sum(s.numel() for s in s2s),), s2s[0].dtype, s2s[0].device)
    probes = [part.view(s.shape) for part, s in zip(flat.split_with_sizes([s.numel() for s in s2s]), s2s)]
    for s1, s2, probe in zip(s1s, s2s, probes):  # hot where negative (see _spread_and_hot_rows)
        torch.addcmul(s2, s1, s1, value=-1.0 / (HOT * count), out=probe)
    any_hot = float(flat.amin()) < 0
    torch._foreach_addcmul_(s2s, s1s, s1s, value=-1.0 / count)
    out = {}
    for p, probe, second in zip(live, probes, seconds):
        if any_hot and float(probe.amin()) < 0:
            rows = probe.reshape(probe.shape[0], -1).amin(1).lt(0).nonzero()[:, 0]
            e1, e2 = p.exact(rows)
            p.s2[rows] = e2.addcmul_(e1, e1, value=-1.0 / count).clamp_min_(0).to(p.s2.dtype)
        out[id(p)] = RawSums(p.s1, p.s2, None, second / count)
    return [out[id(p)] if id(p) in out else RawSums(p.s1, p.s2, None, 0.0) for p in items]


class _Shifted:
    """Sums of ``g - c`` and ``(g - c)**2`` over chunks of materialised per-sample gradients.

    The shift ``c`` is the first sample's gradient: near the mean at high SNR, so the squares do not
    cancel in float32 (``sum g**2 - n mean**2`` lost 13% of a layer's GSNR at SNR ~1e4).
    """

    def __init__(self):
        self.s1 = self.s2 = self.shift = None

    def add(self, g: torch.Tensor) -> None:
        if self.shift is None:
            self.shift = g[0].clone()
            self.s1, self.s2 = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
        d = g - self.shift
        self.s1 += d.sum(0)
        self.s2 += d.square_().sum(0)

    def raw(self, count: int) -> RawSums:
        return _finalize(self.s1, self.s2, count, self.shift)


def _chunks(size: int, per_sample_bytes: int, memory_cap: int) -> Iterator[slice]:
    step = int(max(1, min(size, memory_cap // max(per_sample_bytes, 1))))
    for start in range(0, size, step):
        yield slice(start, min(size, start + step))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in _WIDE else torch.promote_types(t.dtype, torch.float32)


_WIDE = (torch.float32, torch.float64)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where the dtype already matches (a dispatch per tensor per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def _linear_sums(module: nn.Linear, records: List[Record], attrs: Dict[str, str], size: int, cap: int, grads) -> Dict[str, HookSums]:
    dtype = _compute_dtype(records[0][1])
    if len(records) == 1 and records[0][0].dim() == 2:
        # sum_i g_i is autograd's (the graph check certified that the hooks saw every use);
        # sum_i g_i**2 = (dY**2)^T (X**2) for the weight, sum_b dY**2 for the bias
        x, dy = _as(records[0][0], dtype), _as(records[0][1], dtype)
        dy2 = torch.square(dy, out=scratch("dy2", dy.shape, dtype, dy.device))
        out = {}
        if "weight" in attrs:
            s2 = dy2.T @ torch.square(x, out=scratch("x2", x.shape, dtype, x.device))

            def weight_rows(rows):
                dy64, x64 = dy[:, rows].double(), x.double()
                return dy64.T @ x64, dy64.square().T @ x64.square()

            out["weight"] = (_Pending(_as(grads[attrs["weight"]], dtype), s2, weight_rows), None, size)
        if "bias" in attrs:
            def bias_rows(rows):
                dy64 = dy[:, rows].double()
                return dy64.sum(0), dy64.square().sum(0)

            out["bias"] = (_Pending(_as(grads[attrs["bias"]], dtype), dy2.sum(0), bias_rows), None, size)
        return out
    xs = _cat([r[0].reshape(size, -1, r[0].shape[-1]) for r in records], 1).to(dtype)
    dys = _cat([r[1].reshape(size, -1, r[1].shape[-1]) for r in records], 1).to(dtype)
    itemsize = torch.finfo(dtype).bits // 8
    sums = {a: _Shifted() for a in attrs}
    bounds = {}
    dy_norms = torch.linalg.vector_norm(dys, dim=1)  # [B, out]; Cauchy-Schwarz over positions, as for convolutions
    if "weight" in attrs:
        bounds["weight"] = dy_norms.T @ torch.linalg.vector_norm(xs, dim=1)
    if "bias" in attrs:
        bounds["bias"] = dy_norms.sum(0) * math.sqrt(dys.shape[1])
    for part in _chunks(size, 2 * itemsize * module.weight.numel(), cap):
        if "weight" in attrs:
            sums["weight"].add(torch.einsum("bto,bti->boi", dys[part], xs[part]))
        if "bias" in attrs:
            sums["bias"].add(dys[part].sum(1))
    terms = xs.shape[0] * xs.shape[1]
    return {a: (t.raw(size), bounds[a], terms) for a, t in sums.items()}


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


def _conv_sums(module: nn.Module, records: List[Record], attrs: Dict[str, str], size: int, cap: int, grads):
    one_d = isinstance(module, nn.Conv1d)
    dtype = _compute_dtype(records[0][1])
    pads = _conv_padding(module, 1 if one_d else 2)
    kernel, stride, dilation = tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation)
    if one_d:
        pads, kernel, stride, dilation = [(0, 0)] + pads, (1,) + kernel, (1,) + stride, (1,) + dilation
    symmetric = all(a == b for a, b in pads)
    padding = tuple(a for a, _ in pads) if symmetric else (0, 0)
    flat_pad = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last dimension first
    shape = (module.out_channels, module.in_channels) + kernel  # the weight as a 2-d convolution's

    def per_sample_weight(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:  # [b, *shape]
        x = x.unsqueeze(2) if one_d else x
        dy = dy.unsqueeze(2) if one_d else dy
        b = x.shape[0]
        if x.device.type not in GROUPED_CONV_DEVICES:  # unfold + batched GEMM: cuDNN's grouped kernel may round in TF32
            cols = F.unfold(F.pad(x, flat_pad), kernel, dilation=dilation, stride=stride)  # [b, C*kh*kw, L]
            return torch.bmm(dy.reshape(b, shape[0], -1), cols.transpose(1, 2)).reshape(b, *module.weight.shape)
        # the weight gradient of the same convolution with the samples as groups: one kernel call,
        # 2-3x faster on CPU than unfold + batched GEMM, and no [b, C*kh*kw, L] columns
        x = x if symmetric else F.pad(x, flat_pad)
        stand_in = torch.empty((b * shape[0],) + shape[1:], dtype=dtype, device=x.device)
        grad = torch.ops.aten.convolution_backward(
            dy.reshape(1, -1, *dy.shape[2:]), x.reshape(1, -1, *x.shape[2:]), stand_in, None, stride, padding,
            dilation, False, (0, 0), b, (False, True, False))[1]
        return grad.reshape(b, *module.weight.shape)

    weight_numel = module.weight.numel()
    per_sample = torch.finfo(dtype).bits // 8 * (3 * weight_numel + sum(r[0][0].numel() + r[1][0].numel() for r in records))
    sums = {a: _Shifted() for a in attrs}
    bounds = {a: 0.0 for a in attrs}
    terms = 0
    for part in _chunks(size, per_sample, cap):
        xs = [r[0][part].to(dtype) for r in records]
        dys = [r[1][part].to(dtype) for r in records]
        flat_dys = _cat([dy.reshape(dy.shape[0], module.out_channels, -1) for dy in dys], 2)  # [b, O, L]
        terms += flat_dys.shape[0] * flat_dys.shape[2]
        # the agreement check's bound on sum_(b,l) |dy_bol x_b,c,l+k| by Cauchy-Schwarz over l (for one
        # kernel offset k the positions l+k are distinct): a GEMM of norms, not one of absolute values
        dy_norms = torch.linalg.vector_norm(flat_dys, dim=2)  # [b, O]
        if "weight" in attrs:
            g = per_sample_weight(xs[0], dys[0])
            for x, dy in zip(xs[1:], dys[1:]):
                g += per_sample_weight(x, dy)
            sums["weight"].add(g)
            x_norms = torch.linalg.vector_norm(_cat([x.reshape(x.shape[0], x.shape[1], -1) for x in xs], 2), dim=2)
            bound = (dy_norms.T @ x_norms).reshape(module.out_channels, module.in_channels, *([1] * len(kernel)))
            bounds["weight"] = bounds["weight"] + bound.expand(*shape).reshape(module.weight.shape)
        if "bias" in attrs:
            sums["bias"].add(flat_dys.sum(2))
            bounds["bias"] = bounds["bias"] + dy_norms.sum(0) * math.sqrt(flat_dys.shape[2])
    return {a: (t.raw(size), bounds[a], terms) for a, t in sums.items()}


def _cat(tensors: List[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _embedding_sums(module: nn.Embedding, records: List[Record], attrs: Dict[str, str], size: int, cap: int, grads):
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
    sq, hot, second = _spread_and_hot_rows(s1, s2, size)
    if bool(hot.any()):  # tokens whose float32 squares would cancel: those rows again in float64
        pick = hot[token]
        rows64, token64 = rows[pick].double(), token[pick]
        s1_64 = torch.zeros(vocab, dim, dtype=torch.float64, device=dy.device).index_add_(0, token64, rows64)
        s2_64 = torch.zeros_like(s1_64).index_add_(0, token64, rows64.square())
        sq[hot] = s2_64[hot].addcmul_(s1_64[hot], s1_64[hot], value=-1.0 / size).clamp_min_(0).to(dtype)
        s1[hot] = s1_64[hot].to(dtype)
    bound = torch.zeros(vocab, dim, dtype=dtype, device=dy.device).index_add_(0, idx[keep], dy[keep].abs())
    raw = RawSums(s1, sq, None, second / size)
    return {"weight": (raw, bound, int(keep.sum()))}


def _graph_uses(root: torch.Tensor) -> Counter:
    """How many edges of the autograd graph of ``root`` lead into each leaf tensor (by ``id``).

    A layer call uses its weight once; any other use (``F.linear(h, layer.weight)`` elsewhere, a
    regulariser) adds an edge the forward hooks never saw.
    """
    uses: Counter = Counter()
    if root.grad_fn is None:
        return uses
    seen, stack = {root.grad_fn}, [root.grad_fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None:
                continue
            if type(node) is _ACCUMULATE_GRAD:  # a leaf: no edges on (getattr on other nodes raises inside)
                uses[id(node.variable)] += 1
            elif node not in seen:
                seen.add(node)
                stack.append(node)
    return uses


_ACCUMULATE_GRAD = type(torch.zeros(1, requires_grad=True).expand(2).grad_fn.next_functions[0][0])


def _autocast_on() -> bool:
    try:
        return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))
    except TypeError:  # torch < 2.4 takes no device
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


PROBE = 4  # samples of the probe batch that tells each layer call's batch dim (any size other than the batch's will do)


def _probe_size(size: int) -> int:
    return min(PROBE, size // 2) if size >= 4 else size - 1


def _call_shapes(objective: Objective, plan, batch: Any) -> Optional[Dict[nn.Module, List[Tuple[torch.Size, torch.Size]]]]:
    """``(input shape, output shape)`` of every call of the planned layers on ``batch`` (None if it fails)."""
    shapes: Dict[nn.Module, List[Tuple[torch.Size, torch.Size]]] = {m: [] for m in plan}

    def forward_hook(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            shapes[module].append((inputs[0].shape, output.shape))
        else:
            shapes[module].append(None)

    handles = [m.register_forward_hook(forward_hook) for m in plan]
    try:
        with objective.measuring(), torch.no_grad():
            objective.sample_losses(objective.params, batch)
    except Exception:  # noqa: BLE001 - no evidence: no layer is hooked, vmap decides
        return None
    finally:
        for h in handles:
            h.remove()
    return shapes


def _batch_dim(full: Tuple[torch.Size, torch.Size], probe: Tuple[torch.Size, torch.Size], size: int, small: int) -> Optional[int]:
    """The one dimension that is the batch in a layer call's input and output, or None.

    Evidence that cannot coincide: the same call on a smaller batch. The batch dimension is the
    only one whose size changes, from ``size`` to ``small``, in input and output alike; a
    dimension that merely equals the batch size (sequence-first ``[T, B, ...]`` with T == B) does
    not change.
    """
    dims = set()
    for a, b in zip(full, probe):
        if len(a) != len(b):
            return None
        changed = [d for d in range(len(a)) if a[d] != b[d]]
        if len(changed) != 1 or a[changed[0]] != size or b[changed[0]] != small:
            return None
        dims.add(changed[0])
    return dims.pop() if len(dims) == 1 else None


_DIMS_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
DIMS_CACHE_SIZE = 8  # call structures remembered per model (sequence lengths that vary from batch to batch)


def _batch_dims(objective: Objective, plan, records) -> Optional[Dict[nn.Module, Optional[List[Optional[int]]]]]:
    """The batch dim of each recorded layer call (None: unknown), from a probe batch; None if the probe fails.

    The probe's answer is remembered per model and call structure (every planned layer's calls
    with their input and output shapes on this batch): the same model making the same calls on
    a batch of the same shapes has the same batch dims, so the probe runs once per structure.
    """
    size = objective.batch_size
    key = (size, tuple((id(m), tuple(None if r[0] is None else (r[0].shape, r[2]) for r in records[m])) for m in plan))
    cache = _DIMS_CACHE.setdefault(objective.model, OrderedDict())
    if key in cache:  # by id: the cache holds no reference to a layer
        cache.move_to_end(key)
        return {m: cache[key][id(m)] for m in plan}
    small = _probe_size(size)
    probe = _call_shapes(objective, plan, _slice_batch(objective.batch, 0, small, size))
    if probe is None:
        return None
    dims: Dict[nn.Module, Optional[List[Optional[int]]]] = {}
    for module in plan:
        calls = records[module]
        if len(calls) != len(probe[module]) or not calls:
            dims[module] = None
            continue
        dims[module] = [None if r[0] is None or p is None else _batch_dim((r[0].shape, r[2]), p, size, small)
                        for r, p in zip(calls, probe[module])]
    cache[key] = {id(m): d for m, d in dims.items()}
    while len(cache) > DIMS_CACHE_SIZE:
        cache.popitem(last=False)
    return dims


def _recorder(records: Dict[nn.Module, List[Record]]) -> Callable:
    """A forward hook that appends each call's ``[input, output gradient (filled in the backward), output shape]``."""

    def forward_hook(module, inputs, output):
        if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            records[module].append([None, None, None])
            return
        record: Record = [inputs[0].detach(), None, output.shape]
        records[module].append(record)
        if not output.requires_grad:
            return

        def keep(gradient):
            record[1] = gradient.detach()

        output.register_hook(keep)

    return forward_hook


def _hook_moments(objective: Objective, plan, chunk_cap: int) -> Tuple[GradientMoments, List[str]]:
    """Moments of the hooked tensors, and the names left for the vmap path."""
    size = objective.batch_size
    records: Dict[nn.Module, List[Record]] = {m: [] for m in plan}
    hook = _recorder(records)
    handles = [m.register_forward_hook(hook) for m in plan]
    try:
        with objective.measuring():
            params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in objective.params.items())
            losses = objective.sample_losses(params)
            if losses.dim() != 1 or losses.shape[0] != size:
                raise NotPerSampleError(f"expected one loss per sample (shape [{size}]), got {tuple(losses.shape)}")
            total = losses.sum()
            if not math.isfinite(float(total.detach())):  # a non-finite loss makes the sum so: then the message names it
                check_finite(losses.detach(), "the per-sample losses")
            uses = _graph_uses(total)
            grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    s1 = OrderedDict((n, torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(params.items(), grads))
    return moments_from_records(objective, plan, records, {n: uses.get(id(p), 0) for n, p in params.items()}, s1, chunk_cap)


def moments_from_records(objective: Objective, plan, records: Dict[nn.Module, List[Record]], uses: Mapping[str, int],
                         s1: Mapping[str, torch.Tensor], chunk_cap: int) -> Tuple[Optional[GradientMoments], List[str]]:
    """Moments of the hooked tensors from the layer calls ``records`` of one forward and backward of
    ``sum_i loss_i`` (output gradients per sample), ``uses`` (each parameter's edges in the loss's
    graph, :func:`_graph_uses`) and ``s1`` (autograd's ``sum_i g_i``); and the names left over."""
    size = objective.batch_size
    batch_dims = _batch_dims(objective, plan, records)
    if batch_dims is None:
        return None, list(objective.params)
    done: "OrderedDict[str, RawSums]" = OrderedDict()
    pending: "OrderedDict[str, _Pending]" = OrderedDict()
    for module, attrs in plan.items():
        calls, dims = records[module], batch_dims[module]
        if dims is None or any(d is None for d in dims) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and any(dims)):
            continue
        recs = [[r[0], r[1]] if d == 0 else [r[0].movedim(d, 0), r[1].movedim(d, 0)] for r, d in zip(calls, dims) if r[1] is not None]
        if not recs:
            continue
        # every use of a hooked tensor in the loss's graph must be one of the calls the hooks saw
        attrs = {a: n for a, n in attrs.items() if uses.get(n, 0) == len(recs)}
        if not attrs:
            continue
        for attr, (raw, bound, terms) in _rule(module)(module, recs, attrs, size, chunk_cap, s1).items():
            name = attrs[attr]
            if isinstance(raw, _Pending):  # sum_i g_i is autograd's: the spread of all such tensors at once below
                pending[name] = raw
                continue
            hooked = raw.total if raw.shift is None else raw.total + size * raw.shift
            if bound is None or _agrees(s1[name], hooked, bound, terms):
                done[name] = raw
    done.update(zip(pending, _spread_all(list(pending.values()), size)))
    rest = [n for n in objective.params if n not in done]
    if not done:
        return None, rest
    ordered = OrderedDict((n, done[n]) for n in objective.params if n in done)
    eps = max(float(torch.finfo(dtype).eps) for dtype in {_compute_dtype(s1[n]) for n in ordered})
    return GradientMoments._from_raw(size, ordered, "hooks", eps), rest


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
        method: ``"auto"`` (hooks where they apply, vmap for the other tensors) or ``"vmap"``;
            either way a per-sample loop replaces vmap when vmap cannot trace the model.
        chunk_size: items (here: samples) per vectorized call (default: as many as fit in ``memory_cap``).
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
    if method == "auto" and not _autocast_on():  # autocast's weight cache hides uses from the graph check
        plan = _hook_plan(objective)
        if plan:
            hooked, rest = _hook_moments(objective, plan, memory_cap)
            if hooked is not None:
                parts.append(hooked)
    if rest:
        parts.append(_vmap_moments(objective, rest, chunk_size, memory_cap))
    return _combine(parts, names)
