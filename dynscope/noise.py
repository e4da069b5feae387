"""Gradient noise: signal-to-noise ratios and the gradient noise scale.

All quantities come from the per-sample gradients ``g_i`` of a batch of ``B`` samples, where
``g_i`` is the gradient of sample ``i``'s own loss, so that for a mean-reduced loss the batch
gradient is ``G_B = mean_i g_i`` (see :mod:`dynscope.persample`). Variances are unbiased
(``ddof=1``) over the samples.

* GSNR (Liu et al. 2020, "Understanding why neural networks generalize well through GSNR of
  parameters"; Cockpit's MeanGSNR): per coordinate ``snr_j = mean_i(g_ij)**2 / var_i(g_ij)``,
  averaged over the coordinates whose variance is not zero. Numerically "zero" means at the level
  of floating-point rounding: a coordinate counts when its per-sample standard deviation exceeds
  ``4 eps`` times the largest root-mean-square per-sample gradient among the tensors of its module
  (``eps`` of the gradients' dtype; ``key.weight`` and ``key.bias`` are one module). Without this
  floor, gradients that are zero in exact arithmetic but not in floating point (the key bias of
  attention: softmax ignores a shift; measured at 0.03-0.08 eps of its module's scale) would add
  SNRs of pure noise. The floor is a compromise: float32 resolves a coordinate relative to its
  own terms (an LSTM weight of a tiny input feature, at 0.5-3 eps of its module's scale, to 1e-7),
  while a standalone key bias's noise reaches ~1 eps of its module's scale; ``4 eps`` keeps real
  coordinates down to that level (the former ``64 eps`` of the tensor dropped them, and missed a
  key bias that is a tensor of its own).
* Block g-SNR of SGD-SaI (Xu et al. 2024, "No more Adam: learning rate scaling at initialization
  is all you need"): per parameter tensor ``||G_p|| / std(G_p)``, the standard deviation taken
  over the elements of that tensor's batch gradient (``ddof=0``).
* Gradient noise scale (McCandlish et al. 2018, "An empirical model of large-batch training"):
  ``B_simple = tr(Sigma) / |G|**2`` with ``tr(Sigma)`` the summed per-coordinate variance of the
  per-sample gradients and ``|G|**2`` the squared norm of the batch gradient ``G_B``; the batch size
  beyond which larger batches stop paying off. When only gradient norms at two batch sizes are
  known (one device's batch vs the all-reduced one under DDP), :func:`two_batch_noise_scale` gives
  their unbiased estimates, and :class:`TwoBatchNoiseScale` smooths them with an EMA.

Note: Cockpit's MeanGSNR uses the biased variance plus ``eps=1e-5`` in the denominator, so it is
``(B-1)/B`` times ours where the variance dominates ``eps``.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from .hvp import DEFAULT_MEMORY_CAP
from .objective import Objective
from . import persample
from .persample import GradientMoments, Method, per_sample_moments

Target = Union[Objective, GradientMoments]
_EPS64 = float(torch.finfo(torch.float64).eps)
ROUNDING_FLOOR = 4  # per-sample spreads below ROUNDING_FLOOR * eps * (largest RMS gradient of the module) count as zero


def _moments(target: Target, method: Method, chunk_size: Optional[int], memory_cap: int) -> GradientMoments:
    if isinstance(target, GradientMoments):
        return target
    if isinstance(target, Objective):
        return per_sample_moments(target, method, chunk_size=chunk_size, memory_cap=memory_cap)
    raise TypeError(f"expected an Objective or GradientMoments, got {type(target).__name__}")


@dataclass
class SNRResult:
    """Gradient signal-to-noise ratios.

    ``value``: mean per-coordinate GSNR over every coordinate with non-zero variance;
    ``per_layer``: the same mean within each parameter tensor (NaN if all its coordinates have zero
    variance); ``block``: the SGD-SaI block g-SNR ``||G_p|| / std(G_p)`` per tensor (NaN where the
    elements' standard deviation is 0, e.g. a one-element tensor); ``num_coordinates``: how many
    coordinates entered ``value``; ``batch_size``: ``B``.
    """

    value: float
    per_layer: Dict[str, float]
    block: Dict[str, float]
    num_coordinates: int
    batch_size: int


@dataclass
class NoiseScaleResult:
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|**2`` (McCandlish et al. 2018).

    ``trace_sigma``: summed unbiased per-coordinate variance of the per-sample gradients;
    ``grad_sq_norm``: ``|G_B|**2`` of the batch gradient; ``per_layer``: ``tr(Sigma_p) / |G_p|**2``
    per tensor; ``batch_size``: ``B``. ``value / batch_size > 1`` means a larger batch would still
    reduce the gradient noise usefully. ``value`` is ``inf`` when the gradient is exactly zero.
    """

    value: float
    trace_sigma: float
    grad_sq_norm: float
    per_layer: Dict[str, float]
    batch_size: int


def gradient_snr(
    target: Target,
    *,
    method: Method = "auto",
    chunk_size: Optional[int] = None,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> SNRResult:
    """Per-coordinate gradient SNR (Liu et al. 2020), per layer, and the SGD-SaI block g-SNR.

    Args:
        target: an :class:`~dynscope.Objective` (per-sample gradients are computed with
            :func:`~dynscope.per_sample_moments`) or precomputed :class:`GradientMoments`.
        method, chunk_size, memory_cap: passed to :func:`~dynscope.per_sample_moments`.

    Example:
        >>> import torch
        >>> from dynscope.persample import GradientMoments
        >>> g = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 2.0]], dtype=torch.float64)  # 3 samples, 2 coords
        >>> snr = gradient_snr(GradientMoments.from_samples({"w": g}))
        >>> snr.value  # coordinate 0: 2**2 / 1; coordinate 1 has zero variance and is left out
        4.0
        >>> snr.num_coordinates
        1
    """
    moments = _moments(target, method, chunk_size, memory_cap)
    _check_count(moments)
    _summaries(moments)
    total, count = 0.0, 0
    per_layer, block = OrderedDict(), OrderedDict()
    for name in moments.mean:
        layer = _summary(moments, name)
        per_layer[name] = layer.snr_sum / layer.snr_count if layer.snr_count else math.nan
        total, count = total + layer.snr_sum, count + layer.snr_count
        block[name] = layer.block_gsnr
    return SNRResult(total / count if count else math.nan, per_layer, block, count, moments.count)


def block_gsnr(gradient: torch.Tensor) -> float:
    """``||g|| / std(g)`` over the elements of one tensor's gradient (SGD-SaI, Xu et al. 2024).

    The population standard deviation (``ddof=0``) of the elements; NaN where it is 0.

    Example:
        >>> import torch
        >>> block_gsnr(torch.tensor([3.0, -1.0]))  # ||g|| = sqrt(10), std = 2
        1.5811388300841898
        >>> block_gsnr(torch.tensor([2.0, 2.0]))
        nan
    """
    g = gradient.detach().double().reshape(-1)
    std = float(g.std(correction=0)) if g.numel() > 1 else 0.0
    return float(g.norm()) / std if std > 0 else math.nan


def gradient_noise_scale(
    target: Target,
    *,
    method: Method = "auto",
    chunk_size: Optional[int] = None,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> NoiseScaleResult:
    """The simple noise scale ``B_simple = tr(Sigma) / |G_B|**2`` from per-sample gradients.

    ``Sigma`` is the per-sample gradient covariance (only its trace is needed: the unbiased
    per-coordinate variances, summed); ``G_B`` is the batch gradient (the mean of the per-sample
    gradients). McCandlish et al. (2018) define ``B_simple`` with the true gradient ``G``; with the
    batch gradient, ``E|G_B|**2 = |G|**2 + tr(Sigma)/B``, so this estimate is biased low when
    ``B_simple`` is comparable to ``B`` or larger.

    Example:
        >>> import torch
        >>> from dynscope.persample import GradientMoments
        >>> g = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1), unbiased variances (2, 2)
        >>> gradient_noise_scale(GradientMoments.from_samples({"w": g})).value  # 4 / 5
        0.8
    """
    moments = _moments(target, method, chunk_size, memory_cap)
    _check_count(moments)
    _summaries(moments)
    trace, sq_norm, per_layer = 0.0, 0.0, OrderedDict()
    for name in moments.mean:
        layer = _summary(moments, name)
        layer_trace = layer.sq_dev_sum / (moments.count - 1)
        per_layer[name] = _ratio(layer_trace, layer.sq_norm)
        trace, sq_norm = trace + layer_trace, sq_norm + layer.sq_norm
    return NoiseScaleResult(_ratio(trace, sq_norm), trace, sq_norm, per_layer, moments.count)


@dataclass
class _LayerSummary:
    """What GSNR and the noise scale need of one tensor, from one pass over its moments."""

    snr_sum: float  # sum of mean**2 / var over the coordinates above the rounding floor
    snr_count: int  # how many coordinates that is
    sq_dev_sum: float  # sum of sq_dev (tr(Sigma_p) times count - 1)
    sq_norm: float  # |G_p|**2
    block_gsnr: float  # ||G_p|| / std over the elements of G_p, NaN where that std is 0


BATCH_ELEMENTS = 1 << 17  # coordinates per batched summary pass (six rows of temporaries: 3 MiB in float32)


def _summaries(moments: GradientMoments) -> None:
    """Fill the summary cache: tensors of up to ``PIECE`` coordinates in batched passes, others by pieces.

    A small model's summaries cost a dozen torch calls per tensor, each mostly dispatch overhead:
    one pass over the concatenated small tensors does the same arithmetic in a dozen calls for
    all of them. Large tensors keep the cache-sized pieces of :func:`_summary`.
    """
    cache = moments.__dict__.setdefault("_summaries", {})
    if len(cache) == len(moments.mean):  # every tensor's summary is there (the second of GSNR and noise scale)
        return
    groups: Dict[tuple, list] = {}
    for name in moments.mean:
        if name in cache:
            continue
        raw = moments.sums.get(name)
        numel = (moments.mean[name] if raw is None else raw.total).numel()
        if numel == 0 or numel > persample.PIECE:
            continue
        if raw is not None and raw.shift is None:  # the hook path's sums: what scaled_pieces would yield, without the generator
            t, scale, sq = raw.total.reshape(-1), 1.0 / moments.count, raw.sq_dev.reshape(-1)
        else:
            t, scale, sq = next(moments.scaled_pieces(name, numel))
        if t.dtype != sq.dtype:
            continue
        entries = groups.setdefault((t.dtype, sq.dtype, t.device), [])
        entries.append((name, t, scale, sq))
        if sum(e[1].numel() for e in entries) >= BATCH_ELEMENTS:
            _batched_summaries(moments, entries, cache)
            entries.clear()
    for entries in groups.values():
        if entries:
            _batched_summaries(moments, entries, cache)


def _batched_summaries(moments: GradientMoments, entries: list, cache: dict) -> None:
    """:func:`_summary` of several tensors ``(name, t, scale, sq_dev)`` (flat, one dtype) in one pass."""
    n = moments.count
    lengths = [e[1].numel() for e in entries]
    t0 = entries[0][1]
    work = persample.scratch("summary", (6, sum(lengths)), t0.dtype, t0.device)
    # rows: t**2, counted t**2 / sq_dev, uncounted flags, sq_dev, t - (its tensor's first element), and t,
    # overwritten by the deviation's square once t**2 and the deviation are there (a row less to keep in
    # cache). unbind / narrow / split_with_sizes: C methods (Tensor.__getitem__ and .split cost a few us each)
    t_sq, quotient, uncounted, sq, deviation, t = work.unbind(0)
    deviation_sq = t
    torch.cat([e[1] for e in entries], out=t)
    torch.cat([e[3] for e in entries], out=sq)
    torch.mul(t, t, out=t_sq)
    for t_part, dev_part in zip(t.split_with_sizes(lengths), deviation.split_with_sizes(lengths)):
        torch.sub(t_part, t_part.narrow(0, 0, 1), out=dev_part)  # near 0 where the elements share an offset
    # the rounding floor, one comparison per run of neighbours that share it (a module's tensors do)
    floors = [_floor(moments, e[0]) for e in entries]
    start = 0
    for floor, run in itertools.groupby(zip(floors, lengths), key=lambda fl: fl[0]):
        length = sum(numel for _, numel in run)
        torch.le(sq.narrow(0, start, length), floor, out=uncounted.narrow(0, start, length))
        start += length
    _counted_quotient(t_sq, sq, uncounted, quotient)
    torch.mul(deviation, deviation, out=deviation_sq)
    sums = torch.stack([part.sum(1) for part in work.split_with_sizes(lengths, 1)]).tolist()
    for (name, _, scale, _), numel, (t_sq, snr, zeros, sq_dev_sum, total, total_sq) in zip(entries, lengths, sums):
        cache[name] = _LayerSummary(snr * scale**2 * (n - 1), numel - int(round(zeros)), sq_dev_sum, t_sq * scale**2,
                                    _block(t_sq, total, total_sq, numel))


def _floor(moments: GradientMoments, name: str) -> float:
    """The rounding floor of ``sq_dev`` (see :func:`_summary`)."""
    return (ROUNDING_FLOOR * moments.eps) ** 2 * (moments.count - 1) * _module_second_moment(moments, name)


def _counted_quotient(num: torch.Tensor, sq: torch.Tensor, uncounted: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``num / sq`` where ``uncounted`` is 0, and 0 where it is 1 (flags as floats: bool masks cost 5-10x more)."""
    # uncounted coordinates get the denominator sq + 1 >= 1, a finite quotient q, then q - q = 0
    # (nan_to_num after a 0/0 would cost 10 ns an element)
    quotient = torch.div(num, torch.add(sq, uncounted, out=out), out=out)
    return quotient.addcmul_(quotient, uncounted, value=-1.0)


def _block(t_sq_norm: float, total: float, total_sq: float, numel: int) -> float:
    """Block g-SNR from ``sum t**2`` and the sums of ``t - shift`` and its square over ``numel`` elements."""
    # population variance of G_p's elements; below float64 rounding of sq_norm / numel it is 0
    spread = total_sq / numel - (total / numel) ** 2 if numel > 1 else 0.0
    return math.sqrt(t_sq_norm / spread) if numel > 1 and spread > 16 * _EPS64 * t_sq_norm / numel else math.nan


def _summary(moments: GradientMoments, name: str) -> _LayerSummary:
    """One tensor's summary, computed once per moments object, piece by piece (sums in float64).

    A coordinate's variance ``sq_dev / (n - 1)`` counts as zero at or below the rounding floor
    ``(ROUNDING_FLOOR * eps)**2 * max_j mean_i g_ij**2``, the max over the tensors of the module.
    """
    cache = moments.__dict__.setdefault("_summaries", {})
    if name in cache:
        return cache[name]
    n = moments.count
    floor = _floor(moments, name)
    snr = sq_dev_sum = t_sq_norm = total = total_sq = 0.0
    zeros = numel = 0
    shift = None  # the first element: the spread from deviations from it does not cancel an offset
    scale = 1.0
    # per piece: the mean is t * scale (t is sum_i g_i on the hook path); block g-SNR is scale-free
    for t, scale, sq_dev in moments.scaled_pieces(name):
        if t.numel() == 0:
            continue
        work = persample.scratch("piece", (3, t.numel()), t.dtype, t.device)  # fresh temporaries cost page faults
        if float(sq_dev.amin()) <= floor:
            uncounted = torch.le(sq_dev, floor, out=work[2])
            zeros += int(round(float(uncounted.sum())))
            quotient = _counted_quotient(t, sq_dev, uncounted, work[0])
        else:
            quotient = torch.div(t, sq_dev, out=work[0])
        snr += float(torch.dot(quotient, t))
        sq_dev_sum += float(sq_dev.sum())
        shift = t[:1].clone() if shift is None else shift
        # near 0 where the elements share an offset (exactly 0 where all equal)
        deviation = torch.sub(t, shift, out=work[1])
        t_sq_norm += float(torch.dot(t, t))
        total, total_sq = total + float(deviation.sum()), total_sq + float(torch.dot(deviation, deviation))
        numel += t.numel()
    block = _block(t_sq_norm, total, total_sq, numel)
    cache[name] = _LayerSummary(snr * scale**2 * (n - 1), numel - zeros, sq_dev_sum, t_sq_norm * scale**2, block)
    return cache[name]


def _module_second_moment(moments: GradientMoments, name: str) -> float:
    """``max_j mean_i g_ij**2`` over the tensors of ``name``'s module (``key.weight``, ``key.bias``).

    The rounding level of a gradient is set by the terms summed to get it, and a module's tensors
    share them: a key bias's exactly-zero gradient (softmax ignores a shift) is a cancelling sum of
    the same output gradients that make up the key weight's gradient.
    """
    cache = moments.__dict__.get("_module_moments")
    if cache is None:  # every module's at once: one pass over the names
        cache = moments.__dict__["_module_moments"] = {}
        for n in moments.mean:
            module = n.rpartition(".")[0]
            value = moments.max_second_moment(n)
            cache[module] = max(cache[module], value) if module in cache else value
    return cache[name.rpartition(".")[0]]


def _check_count(moments: GradientMoments) -> None:
    if moments.count < 2:
        moments.variance()  # raises: the variance needs at least 2 samples


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


@dataclass
class TwoBatchEstimate:
    """Unbiased estimates from two batch sizes: ``value = trace_sigma / grad_sq_norm``."""

    value: float
    trace_sigma: float
    grad_sq_norm: float


def two_batch_noise_scale(small_sq_norm: float, big_sq_norm: float, small_batch: int, big_batch: int) -> TwoBatchEstimate:
    """McCandlish et al.'s (2018, appendix A.1) unbiased estimates from two gradient norms.

    With ``|G_s|**2`` the squared norm of a gradient averaged over ``B_s`` samples and ``|G_b|**2``
    over ``B_b > B_s`` samples::

        |G|**2    ~ (B_b |G_b|**2 - B_s |G_s|**2) / (B_b - B_s)
        tr(Sigma) ~ (|G_s|**2 - |G_b|**2) / (1/B_s - 1/B_b)

    Each estimate is unbiased but noisy (single estimates can be negative); average many, or
    smooth them with :class:`TwoBatchNoiseScale`, before taking the ratio.

    Example:
        >>> est = two_batch_noise_scale(small_sq_norm=3.0, big_sq_norm=1.5, small_batch=1, big_batch=4)
        >>> est.grad_sq_norm, est.trace_sigma, est.value
        (1.0, 2.0, 2.0)
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch} and {big_batch}")
    b_s, b_b = float(small_batch), float(big_batch)
    grad_sq = (b_b * big_sq_norm - b_s * small_sq_norm) / (b_b - b_s)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / b_s - 1.0 / b_b)
    return TwoBatchEstimate(_ratio(trace, grad_sq), trace, grad_sq)


class _SmoothedMoments:
    """Exponential moving averages of ``tr(Sigma)`` and ``|G|**2`` (raw: the bias correction
    ``1 - ema**num_updates`` is the same for both), with their checkpoint state."""

    def __init__(self, ema: float = 0.9) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.ema = ema
        self.trace_sigma = 0.0
        self.grad_sq_norm = 0.0
        self.num_updates = 0

    def _fold(self, trace_sigma: float, grad_sq_norm: float) -> None:
        self.num_updates += 1
        self.trace_sigma = self.ema * self.trace_sigma + (1.0 - self.ema) * trace_sigma
        self.grad_sq_norm = self.ema * self.grad_sq_norm + (1.0 - self.ema) * grad_sq_norm

    def state_dict(self) -> Dict[str, float]:
        return {"ema": self.ema, "trace_sigma": self.trace_sigma, "grad_sq_norm": self.grad_sq_norm,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.ema = float(state.get("ema", self.ema))
        self.trace_sigma = float(state.get("trace_sigma", 0.0))
        self.grad_sq_norm = float(state.get("grad_sq_norm", 0.0))
        self.num_updates = int(state.get("num_updates", 0))


class TwoBatchNoiseScale(_SmoothedMoments):
    """The two-batch estimator with exponential moving averages of ``tr(Sigma)`` and ``|G|**2``.

    McCandlish et al. smooth numerator and denominator separately and take the ratio of the
    averages (the ratio of noisy single estimates is badly biased). ``ema=0`` disables smoothing.
    The averages are bias-corrected like Adam's, so early values are not pulled towards 0.

    Example:
        >>> est = TwoBatchNoiseScale(ema=0.5)
        >>> est.update(3.0, 1.5, 1, 4).value
        2.0
        >>> est.update(5.0, 2.0, 1, 4).value  # |G|^2 = 1, tr = 4 -> averages 1, 3.333
        3.3333333333333335
    """

    def update(self, small_sq_norm: float, big_sq_norm: float, small_batch: int, big_batch: int) -> TwoBatchEstimate:
        """Fold in one pair of gradient norms; returns the smoothed estimate."""
        est = two_batch_noise_scale(small_sq_norm, big_sq_norm, small_batch, big_batch)
        if not (math.isfinite(est.trace_sigma) and math.isfinite(est.grad_sq_norm)):
            raise ValueError("the gradient norms must be finite")
        self._fold(est.trace_sigma, est.grad_sq_norm)
        correction = 1.0 - self.ema**self.num_updates
        trace, grad_sq = self.trace_sigma / correction, self.grad_sq_norm / correction
        return TwoBatchEstimate(_ratio(trace, grad_sq), trace, grad_sq)


class SmoothedNoiseScale(_SmoothedMoments):
    """``B_simple`` from many batches: unbiased ``tr(Sigma)`` and ``|G|**2`` of each, smoothed separately.

    A single batch's ``tr(Sigma) / |G_B|**2`` is biased low because ``E|G_B|**2 = |G|**2 +
    tr(Sigma)/B``: its ratio to ``B`` saturates below 1 (it is ``b / (1 + b)`` for a true
    ``B_simple / B = b``). Per batch, ``|G|**2 ~ |G_B|**2 - tr(Sigma)/B`` is unbiased (but noisy,
    even negative), so McCandlish et al. (2018, appendix A.1) average numerator and denominator
    separately over many batches and take the ratio of the averages. Here: exponential moving
    averages, bias-corrected like Adam's; ``value`` estimates ``B_simple``, which McCandlish et al.
    take as the critical batch size ``B_crit`` (beyond it, larger batches stop paying off).

    Example:
        >>> est = SmoothedNoiseScale(ema=0.5)
        >>> est.update(trace_sigma=8.0, batch_grad_sq=3.0, batch_size=4)   # |G|^2 ~ 3 - 8/4 = 1
        8.0
        >>> est.update(trace_sigma=8.0, batch_grad_sq=5.0, batch_size=4)   # |G|^2 ~ 3: averages 8 and 7/3
        3.4285714285714284
    """

    def update(self, trace_sigma: float, batch_grad_sq: float, batch_size: int) -> float:
        """Fold in one batch (``tr(Sigma)`` unbiased, ``|G_B|**2``, ``B``); returns the smoothed ``B_simple``."""
        if not (math.isfinite(trace_sigma) and math.isfinite(batch_grad_sq)):
            raise ValueError("the gradient statistics must be finite")
        grad_sq = batch_grad_sq - trace_sigma / batch_size
        self._fold(trace_sigma, grad_sq)
        return self.value

    @property
    def value(self) -> float:
        """The smoothed ``B_simple`` (NaN before any update; inf while the smoothed ``|G|**2 <= 0``)."""
        if self.num_updates == 0:
            return math.nan
        return _ratio(self.trace_sigma, self.grad_sq_norm) if self.grad_sq_norm > 0 else (
            math.inf if self.trace_sigma > 0 else math.nan)

