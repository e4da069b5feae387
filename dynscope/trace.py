"""Stochastic Hessian trace estimators: Hutchinson and Hutch++.

Both take an operator (see :class:`dynscope.HessianOperator`) and spend all their matvecs in a few
batched calls, which is where they win over sequential implementations such as PyHessian's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional

import torch

from .hvp import as_operator, block_dots


@dataclass
class TraceResult:
    """An estimate of ``tr(H)``.

    Attributes:
        value: the estimate.
        stderr: its standard error (Hutchinson: sample std of the per-probe estimates over
            ``sqrt(m)``); NaN for Hutch++, whose terms are not independent samples.
        per_layer: the trace of each parameter tensor's diagonal block, from the same probes.
            The blocks sum to ``value``.
        num_matvecs: Hessian-vector products spent.
        method: ``"hutchinson"`` or ``"hutch++"``.
    """

    value: float
    stderr: float
    per_layer: Dict[str, float] = field(default_factory=dict)
    num_matvecs: int = 0
    method: str = "hutchinson"


_SHIFTS = torch.arange(31, -1, -1, dtype=torch.int32)


class RademacherProbes:
    """``num`` Rademacher vectors of length ``size`` from a private generator (global RNG untouched).

    Each random 32-bit word gives 32 signs: bit ``k`` is shifted into the sign bit and copied onto
    1.0, so there is one random draw per 32 entries and no integer-to-float conversion pass. The
    words are drawn up front; the signs are made on demand, all at once (:meth:`rows`) or one
    probe at a time into a reused buffer (:meth:`row`), with the same values either way.

    Example:
        >>> p = RademacherProbes(3, 5, seed=0)
        >>> z = p.rows(0, 3)
        >>> z.shape, bool(((z == 1) | (z == -1)).all()), torch.equal(p.row(2), z[2])
        (torch.Size([3, 5]), True, True)
    """

    def __init__(self, num: int, size: int, seed: Optional[int] = None) -> None:
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        self.num, self.size = num, size
        self.words = torch.randint(-(2**31), 2**31, ((num * size + 31) // 32, 1), generator=gen, dtype=torch.int32)
        self._buffer: Optional[torch.Tensor] = None

    def _signs(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Entries ``start:stop`` of the flattened ``[num, size]`` signs (float32)."""
        first, last = start // 32, (stop + 31) // 32
        bits = torch.bitwise_left_shift(self.words[first:last], _SHIFTS, out=out)  # sign bit = one random bit
        bits = bits.view(torch.float32)
        signs = torch.copysign(torch.ones((), dtype=torch.float32), bits, out=bits)
        return signs.view(-1)[start - 32 * first : stop - 32 * first]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Probes ``start:stop`` as a new ``[stop - start, size]`` float32 tensor."""
        return self._signs(start * self.size, stop * self.size).view(stop - start, self.size)

    def row(self, i: int) -> torch.Tensor:
        """Probe ``i`` (float32), in a buffer that the next call to ``row`` overwrites."""
        words = (self.size + 31) // 32 + 1
        if self._buffer is None:
            self._buffer = torch.empty(words, 32, dtype=torch.int32)
        start = i * self.size
        count = (start + self.size + 31) // 32 - start // 32
        return self._signs(start, start + self.size, out=self._buffer[:count])


def rademacher(num: int, size: int, seed: Optional[int], dtype=torch.float32, device=None) -> torch.Tensor:
    """``num`` Rademacher vectors of length ``size``, from a private generator (global RNG untouched).

    Example:
        >>> z = rademacher(3, 5, seed=0)
        >>> z.shape, bool(((z == 1) | (z == -1)).all())
        (torch.Size([3, 5]), True)
        >>> torch.equal(z, rademacher(3, 5, seed=0))
        True
    """
    return RademacherProbes(num, size, seed).rows(0, num).to(dtype=dtype, device=device)


def _per_layer(op, contributions: torch.Tensor) -> Dict[str, float]:
    layout = getattr(op, "layout", None)
    if layout is None:
        return {}
    return OrderedDict((name, float(v)) for name, v in layout.block_sums(contributions).items())


def hutchinson(op, num_matvecs: int, seed: Optional[int] = None) -> TraceResult:
    """Hutchinson's estimator ``(1/m) sum_i z_i^T H z_i`` with Rademacher ``z_i``."""
    layout = getattr(op, "layout", None)
    blocks = layout.slices() if layout is not None else {"": slice(0, op.size)}
    probes = RademacherProbes(num_matvecs, op.size, seed)
    # z_i^T H z_i per probe and per block, one dot per row and block (no [m, n] temporaries). The
    # products z_ij (H z_i)_j are exact (z = +-1); the dots round at the level of H z_i's rounding.
    if hasattr(op, "quadratic_forms"):  # HessianOperator: per-probe products reduced as they come
        forms = op.quadratic_forms(probes, list(blocks.values()))
    else:
        z = probes.rows(0, num_matvecs).to(dtype=op.dtype, device=op.device)
        forms = block_dots(z, op.matmat(z), list(blocks.values()))
    per_block = OrderedDict((name, forms[:, j]) for j, name in enumerate(blocks))
    samples = torch.stack(list(per_block.values())).sum(0)
    stderr = float(samples.std(unbiased=True) / math.sqrt(num_matvecs)) if num_matvecs > 1 else math.nan
    return TraceResult(
        value=float(samples.mean()),
        stderr=stderr,
        per_layer=OrderedDict((n, float(v.mean())) for n, v in per_block.items()) if layout is not None else {},
        num_matvecs=num_matvecs,
        method="hutchinson",
    )


def hutch_plus_plus(op, num_matvecs: int, seed: Optional[int] = None) -> TraceResult:
    """Hutch++ (Meyer, Musco, Musco and Woodruff 2021).

    With ``k = m // 3``: ``Q = qr(H S)`` for a ``k``-column sketch ``S``, the top of the spectrum
    is taken exactly as ``tr(Q^T H Q)`` and the rest by Hutchinson on ``(I - Q Q^T) G``. Exact
    when ``rank(H) <= k``.
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs at least 3 matvecs, got {num_matvecs}")
    k = num_matvecs // 3
    g_cols = num_matvecs - 2 * k
    probes = rademacher(k + g_cols, op.size, seed, op.dtype, op.device)
    s, g = probes[:k], probes[k:]
    q = torch.linalg.qr(op.matmat(s).double().T).Q.T  # [min(k, n), n], orthonormal rows
    kq = q.shape[0]
    g = g.double()
    g = g - (g @ q.T) @ q
    hq = op.matmat(torch.cat([q, g]).to(op.dtype)).double()
    head = q * hq[:kq]
    tail = g * hq[kq:] / g_cols
    contributions = head.sum(0) + tail.sum(0)
    return TraceResult(
        value=float(contributions.sum()),
        stderr=math.nan,
        per_layer=_per_layer(op, contributions),
        num_matvecs=num_matvecs,
        method="hutch++",
    )


def hessian_trace(
    objective,
    num_matvecs: int = 32,
    method: Literal["hutchinson", "hutch++"] = "hutchinson",
    seed: Optional[int] = None,
    **operator_kwargs,
) -> TraceResult:
    """Estimate the trace of the Hessian of ``objective`` (or of any operator / square matrix).

    Args:
        objective: a :class:`dynscope.Objective`, an operator with ``matmat`` or a square matrix.
        num_matvecs: Hessian-vector products to spend (all in batched calls).
        method: ``"hutchinson"`` (unbiased, with a standard error) or ``"hutch++"`` (lower
            variance when the spectrum is dominated by a few large eigenvalues, as Hessians of
            trained networks are).
        seed: seed of the probe vectors (a private generator; the global RNG is untouched).
            Use the same seed on every data-parallel rank.
        **operator_kwargs: passed to :class:`dynscope.HessianOperator` (``method``,
            ``chunk_size``, ``memory_cap``, ``reduce``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective, hessian_trace
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(64, 3)
        >>> obj = Objective(nn.Linear(3, 1, bias=False), nn.functional.mse_loss, (x, torch.randn(64, 1)))
        >>> exact = float(2 * (x * x).sum() / 64)       # H = 2 X^T X / B for MSE on a linear model
        >>> est = hessian_trace(obj, num_matvecs=9, method="hutch++", seed=0)
        >>> abs(est.value - exact) < 1e-4 * exact       # rank(H) = 3 <= 9 // 3: exact
        True
    """
    if num_matvecs < 1:
        raise ValueError(f"num_matvecs must be positive, got {num_matvecs}")
    if method == "hutchinson":
        estimate = hutchinson
    elif method in ("hutch++", "hutchpp"):
        estimate = hutch_plus_plus
    else:
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    op = as_operator(objective, **operator_kwargs)
    return estimate(op, num_matvecs, seed)
