"""Softmax collapse and naive loss minimisation (Prieto et al. 2025, "Grokking at the edge of
numerical stability").

Softmax collapse (SC): once one logit exceeds the others by enough, the log-softmax of the top
class rounds to exactly ``0`` in the dtype the loss is computed in, so a correctly classified
sample's cross-entropy is exactly zero. Its gradient is tiny but NOT exactly zero: the other
classes' probabilities ``exp(z_k - max z)`` underflow to zero only past a gap of about 87
(float32) to 104 (subnormals), and Adam with a tiny ``eps`` still takes full-size steps along
such a gradient. The margin needed for a zero loss depends on the dtype: the other classes'
relative mass must fall below about ``2^-24`` for float32, ``2^-11`` for float16, ``2^-8`` for
bfloat16 and ``2^-53`` for float64. Rather than compare against these thresholds, the test here is
the loss's own computation in that dtype (``log_softmax(z).max() == 0``, what ``F.cross_entropy``
computes), so that for correctly classified rows the collapsed fraction equals the
exactly-zero-loss fraction. (``sum_k exp(z_k - max z) == 1`` is not the same test: it flags
rows whose float32 loss is not yet zero, from a gap of 19.1 instead of 20.5 for 97 classes.)

After a switch to StableMax the loss in use is :func:`dynscope.nn.stablemax_cross_entropy`,
computed in float64: pass ``normalization="stablemax"`` to measure collapse of that loss (it has
none in practice).

Naive loss minimisation (NLM): after the training set is fitted, the cheapest way to lower the
loss further is to scale the logits up, and the gradient aligns with the weights themselves;
:func:`nlm_alignment` reports ``cos(theta, -grad)`` (near 1 under NLM).

Counting for a training run: :func:`count_collapse` measures one batch of logits and returns a
:class:`CollapseCounts` (sums, so that batches and data-parallel ranks combine by adding), whose
:meth:`~CollapseCounts.fractions` are the metrics :class:`dynscope.callbacks.SoftmaxCollapse` logs
(declared in :data:`METRICS`).

Logits here have the class dimension last: ``[..., C]``, with targets shaped ``[...]``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import COLLAPSE as METRICS  # noqa: F401 - what this diagnostic logs (declared in dynscope.metrics)
from .objective import NonFiniteError

DTypeLike = Union[None, str, torch.dtype]

SUPPORTED_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: DTypeLike, default: torch.dtype) -> torch.dtype:
    """``dtype`` as a torch dtype (a name like ``"bfloat16"`` or a dtype); ``None`` means ``default``.

    Example:
        >>> resolve_dtype("bfloat16", torch.float32), resolve_dtype(None, torch.float64)
        (torch.bfloat16, torch.float64)
    """
    if dtype is None:
        dtype = default
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(SUPPORTED_DTYPES)}")
        return SUPPORTED_DTYPES[dtype.removeprefix("torch.")]
    if dtype not in SUPPORTED_DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(SUPPORTED_DTYPES)}")
    return dtype


def _rows(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits need a class dimension (last), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    return logits.detach().reshape(-1, logits.shape[-1])


def _targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex():
        raise TypeError("targets must be an integer tensor of class indices")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)} "
            "(expected the logits' shape without the last, class, dimension)"
        )
    return targets.detach().reshape(-1).to(device=logits.device, dtype=torch.long)


NORMALIZATIONS = ("softmax", "stablemax")


def _log_probs(z: torch.Tensor, normalization: str) -> torch.Tensor:
    if normalization == "softmax":
        return F.log_softmax(z, dim=-1)  # what F.cross_entropy computes, in z's dtype
    if normalization == "stablemax":
        from .nn import log_stablemax  # float64 inside, z's dtype out, as stablemax_cross_entropy

        return log_stablemax(z, dim=-1)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def collapsed_rows(logits: torch.Tensor, dtype: DTypeLike = None, normalization: str = "softmax") -> torch.Tensor:
    """Boolean ``[N]`` (rows of ``logits`` flattened to ``[N, C]``): the top class's log-probability,
    computed as the loss computes it in ``dtype``, is exactly ``0``.

    For a correctly classified row this is exactly "its cross-entropy is 0" (see
    :func:`zero_loss_rows`). ``normalization="stablemax"`` tests StableMax's cross-entropy instead.

    Example:
        >>> collapsed_rows(torch.tensor([[30.0, 0.0], [1.0, 0.0]])).tolist()
        [True, False]
        >>> collapsed_rows(torch.tensor([[30.0, 0.0]]), normalization="stablemax").tolist()
        [False]
    """
    rows = _rows(logits)
    z = rows.to(resolve_dtype(dtype, rows.dtype))
    return _log_probs(z, normalization).amax(dim=-1) == 0


def zero_loss_rows(
    logits: torch.Tensor, targets: torch.Tensor, dtype: DTypeLike = None, ignore_index: int = -100,
    normalization: str = "softmax",
) -> torch.Tensor:
    """Boolean ``[N]``: the row's cross-entropy, computed in ``dtype``, is exactly zero.

    ``normalization="softmax"``: torch's ``F.cross_entropy``; ``"stablemax"``:
    :func:`dynscope.nn.stablemax_cross_entropy`. Rows whose target is ``ignore_index`` are ``False``.

    Example:
        >>> zero_loss_rows(torch.tensor([[30.0, 0.0], [30.0, 0.0]]), torch.tensor([0, 1])).tolist()
        [True, False]
    """
    rows = _rows(logits)
    labels = _targets(logits, targets)
    z = rows.to(resolve_dtype(dtype, rows.dtype))
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= rows.shape[-1]))
    if bool(bad.any()):
        raise ValueError(f"targets must be class indices in [0, {rows.shape[-1]}) or ignore_index={ignore_index}")
    if normalization == "softmax":
        losses = F.cross_entropy(z, labels, reduction="none", ignore_index=ignore_index)
    else:
        picked = _log_probs(z, normalization).gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
        losses = -picked
    return keep & (losses == 0)


def softmax_collapse(logits: torch.Tensor, dtype: DTypeLike = None) -> float:
    """The fraction of samples in softmax collapse: ``log_softmax(z)`` of the top class is exactly 0 in ``dtype``.

    Args:
        logits: ``[..., C]`` (class dimension last); every row is a sample.
        dtype: the dtype the loss is computed in (``torch.float32``, ``torch.bfloat16``,
            ``torch.float16``, ``torch.float64`` or their names); default: the logits' dtype.

    A collapsed sample has exactly zero softmax cross-entropy if its label is the arg-max (the same
    computation as ``F.cross_entropy``); its gradient is tiny but not exactly zero (see the module
    docstring). Reference: Prieto et al. 2025, "Grokking at the edge of numerical stability".

    Example:
        >>> z = torch.tensor([[20.0, 0.0], [10.0, 0.0]])   # e^-20 < 2^-24 < e^-10
        >>> softmax_collapse(z)
        0.5
        >>> softmax_collapse(z, dtype=torch.float64), softmax_collapse(z, dtype="bfloat16")
        (0.0, 1.0)
    """
    collapsed = collapsed_rows(logits, dtype)
    if collapsed.numel() == 0:
        raise ValueError("no samples: logits have no rows")
    return float(collapsed.double().mean())


def zero_loss_fraction(
    logits: torch.Tensor, targets: torch.Tensor, dtype: DTypeLike = None, ignore_index: int = -100
) -> float:
    """The fraction of samples whose cross-entropy, computed by torch in ``dtype``, is exactly 0.

    Args:
        logits: ``[..., C]`` (class dimension last).
        targets: class indices shaped like ``logits`` without its last dimension.
        dtype: as in :func:`softmax_collapse`.
        ignore_index: targets with this value are left out (as in ``F.cross_entropy``).

    Example:
        >>> z = torch.tensor([[20.0, 0.0], [20.0, 0.0], [1.0, 0.0]])
        >>> zero_loss_fraction(z, torch.tensor([0, 1, 0]))
        0.3333333333333333
        >>> zero_loss_fraction(z, torch.tensor([0, -100, -100]))
        1.0
    """
    zero = zero_loss_rows(logits, targets, dtype, ignore_index)
    kept = int((_targets(logits, targets) != ignore_index).sum())
    if kept == 0:
        raise ValueError("no samples: every target is ignore_index or logits have no rows")
    return int(zero.sum()) / kept


def logit_gaps(logits: torch.Tensor) -> torch.Tensor:
    """``[N]`` float64: the largest minus the second-largest logit of each row (needs ``C >= 2``).

    Example:
        >>> logit_gaps(torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 4.0]])).tolist()
        [0.5, 0.0]
    """
    rows = _rows(logits)
    if rows.shape[-1] < 2:
        raise ValueError("the logit gap needs at least two classes")
    top = rows.double().topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def max_logit_gap(logits: torch.Tensor) -> float:
    """The mean over samples of (largest logit - second-largest logit), in float64.

    The margin by which the winning class leads: SC sets in once it exceeds about
    ``ln(2^24) + ln(C - 1)`` (float32), ``ln(2^11) + ln(C - 1)`` (float16) or
    ``ln(2^8) + ln(C - 1)`` (bfloat16).

    Example:
        >>> max_logit_gap(torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 2.0]]))
        1.25
    """
    return float(logit_gaps(logits).mean())


@dataclass(frozen=True)
class NLMAlignment:
    """``cos(theta, -grad)`` over all parameters (``global_cos``) and per tensor (``per_tensor``).

    Undefined values (a zero weight or gradient) are ``nan``.
    """

    global_cos: float
    per_tensor: Dict[str, float]

    @property
    def value(self) -> float:
        """``global_cos`` (the headline value, as every result's ``.value``)."""
        return self.global_cos

    @property
    def per_layer(self) -> Dict[str, float]:
        """``per_tensor`` (per parameter tensor, as every result's ``.per_layer``)."""
        return self.per_tensor

    def metrics(self, per_layer: bool = True) -> Dict[str, float]:
        """The logged metrics: ``nlm_cos`` and (``per_layer``) ``nlm_cos/<parameter>``; undefined
        cosines are left out, not reported as NaN.

        Example:
            >>> NLMAlignment(0.5, {"w": 1.0, "b": float("nan")}).metrics()
            {'nlm_cos': 0.5, 'nlm_cos/w': 1.0}
        """
        out = {} if math.isnan(self.global_cos) else {"nlm_cos": self.global_cos}
        if per_layer:
            out.update({f"nlm_cos/{name}": v for name, v in self.per_tensor.items() if not math.isnan(v)})
        return out


def _cos(dot: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    denom = (a2 * b2).sqrt()
    return float(dot / denom) if float(denom) > 0 else float("nan")


def nlm_alignment(
    model: nn.Module, grads: Optional[Mapping[str, torch.Tensor]] = None
) -> NLMAlignment:
    """Naive-loss-minimisation alignment ``cos(theta, -grad)``, per parameter tensor and global.

    Positive and near 1 when gradient descent mostly scales the weights up (Prieto et al. 2025).

    Args:
        model: the network; its trainable parameters are ``theta``.
        grads: ``{name: gradient}`` to use instead of the parameters' ``.grad`` (e.g. from
            :meth:`dynscope.Objective.gradient`). Parameters without a gradient are skipped.

    Nothing is modified. Dot products are accumulated in float64.

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[3.0, 4.0]]))
        >>> lin.weight.grad = torch.tensor([[-6.0, -8.0]])   # -grad is along theta
        >>> a = nlm_alignment(lin)
        >>> a.global_cos, a.per_tensor
        (1.0, {'weight': 1.0})
    """
    dot = a2 = b2 = torch.zeros((), dtype=torch.float64)
    per_tensor: Dict[str, float] = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if grads is None else grads.get(name)
        if g is None:
            continue
        if g.shape != p.shape:
            raise ValueError(f"gradient of {name!r} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")
        theta, minus_g = p.detach().double().flatten(), -g.detach().double().flatten().to(p.device)
        d, t2, m2 = theta @ minus_g, theta @ theta, minus_g @ minus_g
        per_tensor[name] = _cos(d, t2, m2)
        dot, a2, b2 = dot + d.cpu(), a2 + t2.cpu(), b2 + m2.cpu()
    if not per_tensor:
        raise ValueError("no parameter has a gradient: run backward first or pass grads=")
    return NLMAlignment(_cos(dot, a2, b2), dict(per_tensor))


# -- counting over a training run --------------------------------------------------------------------


class NotClassLogitsError(TypeError):
    """The model's outputs are not class logits ``[..., C]`` (``C >= 2``) with integer class targets."""


@dataclass(frozen=True)
class CollapseCounts:
    """Sums over the non-ignored samples of one or more batches (they combine by adding).

    ``collapsed`` and ``zero_loss`` are of the loss in use (the ``normalization`` counted with),
    ``softmax_collapsed`` always of the softmax; ``gap_sum`` sums :func:`logit_gaps`; ``correct``
    counts arg-max hits.
    """

    samples: float
    collapsed: float
    zero_loss: float
    gap_sum: float
    correct: float
    softmax_collapsed: float

    @classmethod
    def from_tensor(cls, counts: torch.Tensor) -> "CollapseCounts":
        """From the ``[6]`` tensor of :func:`collapse_counts` (e.g. after summing it over ranks)."""
        return cls(*(float(v) for v in counts.reshape(-1).tolist()))

    def as_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor([self.samples, self.collapsed, self.zero_loss, self.gap_sum, self.correct,
                             self.softmax_collapsed], dtype=torch.float64, device=device)

    def __add__(self, other: "CollapseCounts") -> "CollapseCounts":
        return CollapseCounts(*(a + b for a, b in zip(self.as_tensor().tolist(), other.as_tensor().tolist())))

    @property
    def value(self) -> float:
        """``sc_fraction`` (the headline value, as every result's ``.value``; ``nan`` without samples)."""
        return self.collapsed / self.samples if self.samples else float("nan")

    def fractions(self, prefix: str = "", accuracy: str = "train_accuracy") -> Dict[str, float]:
        """The logged metrics: ``{prefix}sc_fraction``, ``zero_loss_fraction``, ``softmax_sc_fraction``,
        ``max_logit_gap`` (mean gap) and ``accuracy``; empty without samples.

        Example:
            >>> c = count_collapse(torch.tensor([[30.0, 0.0], [30.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1, 0]))
            >>> c.fractions("held_", "held_accuracy") == {"held_sc_fraction": 2 / 3, "held_zero_loss_fraction": 1 / 3,
            ...     "held_softmax_sc_fraction": 2 / 3, "held_max_logit_gap": 61 / 3, "held_accuracy": 2 / 3}
            True
        """
        n = self.samples
        if n == 0:
            return {}
        return {
            f"{prefix}sc_fraction": self.collapsed / n,
            f"{prefix}zero_loss_fraction": self.zero_loss / n,
            f"{prefix}softmax_sc_fraction": self.softmax_collapsed / n,
            f"{prefix}max_logit_gap": self.gap_sum / n,
            accuracy: self.correct / n,
        }


def collapse_counts(
    logits: torch.Tensor, targets: torch.Tensor, dtype: DTypeLike = None, ignore_index: int = -100,
    normalization: str = "softmax",
) -> torch.Tensor:
    """:func:`count_collapse` as a float64 tensor ``[samples, collapsed, zero_loss, gap_sum, correct,
    softmax_collapsed]`` on the logits' device, ready to be summed over batches or ranks.

    Raises:
        NotClassLogitsError: the logits are not ``[..., C]`` with ``C >= 2``, or the targets are not integers.
        NonFiniteError: a kept row has a NaN or ``+inf`` logit, or no finite one (a ``-inf`` logit of a
            masked class is fine): its softmax is undefined.

    Example:
        >>> collapse_counts(torch.tensor([[30.0, 0.0], [1.0, 0.0]]), torch.tensor([0, -100])).tolist()
        [1.0, 1.0, 1.0, 30.0, 1.0, 1.0]
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[-1] < 2:
        raise NotClassLogitsError(
            "SoftmaxCollapse needs class logits shaped [..., C] with C >= 2, got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        raise NotClassLogitsError(
            "SoftmaxCollapse needs integer class targets (soft or regression targets have no softmax collapse); "
            f"got {getattr(targets, 'dtype', type(targets).__name__)}"
        )
    labels = targets.detach().reshape(-1).to(logits.device)
    keep = labels != ignore_index
    rows = logits.detach().reshape(-1, logits.shape[-1])[keep]
    if rows.numel() and bool(rows.isnan().any() | rows.isposinf().any() | rows.amax(-1).isneginf().any()):
        raise NonFiniteError(f"the logits are not finite ({rows.flatten()[:4].tolist()}...); the check is undefined here")
    softmax = collapsed_rows(logits, dtype)[keep]
    collapsed = softmax if normalization == "softmax" else collapsed_rows(logits, dtype, normalization)[keep]
    zero = zero_loss_rows(logits, targets, dtype, ignore_index, normalization)[keep]
    correct = (rows.argmax(-1) == labels[keep]).sum()
    parts = [keep.sum(), collapsed.sum(), zero.sum(), logit_gaps(rows).sum(), correct, softmax.sum()]
    return torch.stack([torch.as_tensor(p, dtype=torch.float64).to(logits.device) for p in parts])


def count_collapse(
    logits: torch.Tensor, targets: torch.Tensor, dtype: DTypeLike = None, ignore_index: int = -100,
    normalization: str = "softmax",
) -> CollapseCounts:
    """Softmax collapse, zero losses, logit gaps and accuracy of one batch of logits, as :class:`CollapseCounts`.

    Args:
        logits: ``[..., C]`` (class dimension last, ``C >= 2``).
        targets: integer class indices shaped like ``logits`` without its last dimension.
        dtype: the dtype the loss is computed in (see :func:`softmax_collapse`); default: the logits'.
        ignore_index: targets with this value are left out.
        normalization: the loss in use, ``"softmax"`` or ``"stablemax"`` (``softmax_collapsed`` is
            always the softmax's).

    Example:
        >>> z = torch.tensor([[30.0, 0.0], [30.0, 0.0], [1.0, 0.0]])   # e^-30 < 2^-24 < e^-1
        >>> c = count_collapse(z, torch.tensor([0, 1, 0]))
        >>> c.samples, c.collapsed, c.zero_loss, c.correct, c.value
        (3.0, 2.0, 1.0, 2.0, 0.6666666666666666)
        >>> count_collapse(z, torch.tensor([0, 1, 0]), normalization="stablemax").collapsed
        0.0
    """
    return CollapseCounts.from_tensor(collapse_counts(logits, targets, dtype, ignore_index, normalization))
