"""Curvature tracking across measurements: ``lambda_max`` and ``tr(H)`` along a training run.

Consecutive measurements see a slowly changing Hessian. :class:`CurvatureTracker` keeps what one
measurement learnt for the next:

* Lanczos starts from the previous top eigenvector instead of a random vector, or, while the top
  two Ritz values are closer than ``swap_gap`` (they may swap places before the next measurement),
  from both previous top Ritz vectors as a block (:func:`dynscope.eigen.lanczos` with
  ``block_start``); the first measurement resolves the top two (``k=2``) so that the pair exists;
* the trace reuses the Lanczos run's Krylov space, which holds the top of the spectrum, as the
  exactly-computed head of a deflated Hutchinson estimate (:func:`dynscope.trace.deflated_hutchinson`;
  Meyer et al. 2021, Hutch++; Dharangutte and Musco 2021, "Dynamic trace estimation"): those
  products were paid for by ``lambda_max`` already, and the probes only estimate the rest.

* with ``memory`` the trace's probes are carried (DeltaShift, Woodruff et al. 2022): each probe set
  is used at two consecutive measurements, the second time to estimate the change of the trace, so
  that earlier measurements keep contributing (:meth:`CurvatureTracker._carried_trace`); with
  ``memory="auto"`` the weight of the past follows from the variances of the last measurement,
  and falls when the matrix changed much.

What tracking buys depends on how much of the Hessian persists between measurements, so
``Curvature`` measures on a fixed evaluation set when it tracks (a new batch changes the Hessian by
batch noise, which no tracking removes).

How many HVPs tracking saves, and the accuracy it reaches along a real training trajectory, are
measured by ``benchmarks/bench_tracking.py`` against exact references; the README's curvature
section carries the numbers, including where the targets are out of reach (a flat, indefinite
spectrum needs far more than 8 probes for a 5% trace).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch

from .eigen import EigenResult, lanczos
from .hvp import as_operator
from .trace import RademacherProbes, TraceResult, _blocks, deflated_head, deflated_hutchinson, orthonormalize, projected_forms


@dataclass
class TrackedCurvature:
    """One measurement of :class:`CurvatureTracker`: the top eigenvalue and the trace (None when not asked for)."""

    eigen: EigenResult
    trace: Optional[TraceResult]

    @property
    def num_matvecs(self) -> int:
        return self.eigen.num_matvecs + (self.trace.num_matvecs if self.trace is not None else 0)


class CurvatureTracker:
    """``lambda_max`` (Lanczos, warm-started) and ``tr(H)`` (deflated Hutchinson) tracked across
    measurements, with a carried-over sketch of the top subspace.

    Each measurement after the first:

    1. multiplies the carried sketch ``S`` (``sketch`` vectors: the previous measurement's top Ritz
       vectors) by the new Hessian (``sketch`` HVPs, counted as the trace's);
    2. runs Lanczos from the top Ritz vector of ``span(S)`` under the new Hessian (without a sketch:
       from the previous top eigenvector, or from the previous top two Ritz vectors as a block when
       their relative gap was below ``swap_gap``), until ``lambda_max`` meets ``eigen_tol``; the
       first measurement asks for the top two within the same ``eigen_max_iter`` steps (a second
       eigenvalue inside a cluster can take many more: allowing twice the steps made the first
       measurement spend 1.05-1.6x the HVPs on the 85k MLP and changed no later one), and its
       ``converged`` is that of ``lambda_max`` alone;
    3. estimates the trace as the exact trace on the span of ``S`` and the top ``sketch`` Ritz
       vectors of the Krylov space, whose products are all known, plus ``trace_matvecs``
       Hutchinson probes on the complement;
    4. keeps the top ``sketch`` Ritz vectors of that subspace as the next sketch (one step of
       subspace iteration per measurement, so the sketch follows the top of the spectrum).

    Args:
        trace_matvecs: Hutchinson probes on the complement (the trace also spends ``sketch``).
        sketch: size of the carried-over subspace (0: none; then only the Krylov space deflates).
        eigen_tol: relative accuracy of ``lambda_max`` (see :func:`dynscope.eigen.lanczos`).
        eigen_max_iter: Lanczos steps at most.
        seed: seed of the first start vector and base seed of the probes.
        memory: ``w`` in ``[0, 1)``: with ``w > 0`` the trace's probes are carried (DeltaShift):
            each set of ``trace_matvecs // 2`` probes is used at two consecutive measurements,
            and ``tail_t = w (tail_{t-1} + change) + (1 - w) fresh`` (see :meth:`_carried_trace`).
            Unbiased for any sequence of matrices; it pays when consecutive measurements see
            nearly the same matrix (a fixed measurement set, a small drift), and costs accuracy
            when they do not (a new batch each time). ``0``: fresh probes every time.
            ``"auto"``: ``w`` at each measurement from the data, weighting the prediction and the
            fresh probes by their estimated inverse variances (at most 0.9): ``w`` falls towards 0
            when the matrix changed much. The weight then depends on the probes, which leaves a
            bias far below the standard error (tests/test_estimators.py).
        swap_gap: relative gap ``(theta_1 - theta_2) / |theta_1|`` of the last measurement's top pair
            below which the next Lanczos starts from both (2 HVPs before the first Ritz value);
            default ``2 * eigen_tol``; ``0`` never (the previous top vector alone).

    Example:
        >>> import torch
        >>> from dynscope import MatrixOperator
        >>> from dynscope.tracking import CurvatureTracker
        >>> A = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1], dtype=torch.float64))
        >>> tracker = CurvatureTracker(trace_matvecs=4, eigen_tol=1e-6)
        >>> first = tracker.measure(MatrixOperator(A))
        >>> round(first.eigen.value, 6), round(first.trace.value, 6)  # Krylov space = everything: exact
        (10.0, 16.6)
    """

    def __init__(
        self,
        trace_matvecs: int = 4,
        sketch: int = 4,
        eigen_tol: float = 1e-2,
        eigen_max_iter: int = 30,
        seed: int = 0,
        memory: Union[float, str] = 0.0,
        swap_gap: Optional[float] = None,
    ):
        if trace_matvecs < 1:
            raise ValueError(f"trace_matvecs must be positive, got {trace_matvecs}")
        if memory != "auto" and not 0.0 <= memory < 1.0:
            raise ValueError(f"memory must be in [0, 1) or 'auto', got {memory!r}")
        if (memory == "auto" or memory > 0) and trace_matvecs < 4:
            raise ValueError(f"memory > 0 needs trace_matvecs >= 4 (two carried and two fresh probes), got {trace_matvecs}")
        if sketch < 0:
            raise ValueError(f"sketch must be >= 0, got {sketch}")
        swap_gap = 2.0 * eigen_tol if swap_gap is None else swap_gap
        if not swap_gap >= 0:
            raise ValueError(f"swap_gap must be >= 0, got {swap_gap!r}")
        self.swap_gap = swap_gap
        self.trace_matvecs = trace_matvecs
        self.sketch = sketch
        self.eigen_tol = eigen_tol
        self.eigen_max_iter = eigen_max_iter
        self.seed = seed
        self.memory = memory
        self.last_memory = 0.0  # the memory the last measurement used (``"auto"``: chosen from the data)
        self._carried: Optional[Dict[str, Any]] = None  # the probe set carried to the next measurement
        self.eigenvector: Optional[torch.Tensor] = None
        self.pair: Optional[torch.Tensor] = None  # [2, n]: the last top two Ritz vectors
        self.pair_gap = math.inf  # their relative gap (theta_1 - theta_2) / |theta_1|
        self.sketch_vectors: Optional[torch.Tensor] = None  # [sketch, n], orthonormal rows
        self.num_measurements = 0

    def measure(self, target, seed: Optional[int] = None, trace: bool = True, **operator_kwargs) -> TrackedCurvature:
        """Measure ``lambda_max`` and ``tr(H)`` of ``target`` (an Objective, operator or matrix).

        ``trace=False``: ``lambda_max`` only (the trace is known otherwise, e.g. exactly from
        :func:`dynscope.gauss_newton.exact_trace`); no sketch or trace products are spent and
        ``trace`` of the result is ``None``.
        """
        op = as_operator(target, **operator_kwargs)
        n = op.size
        seed = self.seed + self.num_measurements if seed is None else seed
        start = self.eigenvector if self.eigenvector is not None and self.eigenvector.shape == (n,) else None
        pair = self.pair if self.pair is not None and self.pair.shape == (2, n) else None
        # a top pair closer than swap_gap may swap places before the next measurement: start from
        # both (a Krylov space grown from the old top vector alone finds the new second one first)
        block = start is not None and pair is not None and self.pair_gap < self.swap_gap
        if block:
            start = pair
        # the first (cold) measurement resolves the top pair, so that the next one has both to start from
        k = 2 if start is None and n >= 2 else 1
        sketch = self.sketch_vectors if self.sketch_vectors is not None and self.sketch_vectors.shape[1:] == (n,) else None
        carried = self._carried if self._carried is not None and self._carried["size"] == n else None
        with getattr(op, "measuring", contextlib.nullcontext)():
            extra, extra_products = [], []
            if trace and sketch is not None and sketch.shape[0]:
                products = op.matmat(sketch.to(device=op.device, dtype=op.dtype)).double()
                extra, extra_products = [sketch.to(op.device).double()], [products]
                values, vectors = _ritz(extra[0], products)
                start, block, k = vectors, False, 1  # the sketch's Ritz vectors under the new Hessian, summed (see _start_vector)
            eigen = lanczos(
                op, k, which="LA", tol=self.eigen_tol, max_iter=self.eigen_max_iter, seed=seed,
                return_eigenvectors=True, start=start, keep_basis=True, block_start=block, keep_products=trace,
            )
            # the top two Ritz pairs, carried to the next measurement
            ritz, w_all = torch.linalg.eigh(eigen.tridiagonal)
            w_all = w_all.to(eigen.basis.device)  # the tridiagonal lives on the CPU, the basis with the model
            # (in the basis' dtype: a start vector needs no float64, and a float64 copy of the basis costs a step)
            top2 = w_all[:, -2:].T.flip(0).to(eigen.basis.dtype) @ eigen.basis if ritz.shape[0] >= 2 else None
            if not trace:
                return self._finish(eigen, ritz, top2, k, None)
            # the top Ritz vectors of the Krylov space (their products are combinations of the
            # Lanczos products) and the sketch span the deflated subspace: at most 2 * sketch + 1 rows
            w = w_all[:, -max(self.sketch, 1) :].T
            basis, products = orthonormalize(
                torch.cat([w @ eigen.basis.double(), *extra]),
                torch.cat([(w.to(eigen.products.dtype) @ eigen.products).double(), *extra_products]),
            )
            if self.memory == "auto" or self.memory > 0:
                trace = self._carried_trace(op, basis, products, carried, seed)
            else:
                trace = deflated_hutchinson(op, self.trace_matvecs, basis, products, seed=seed, orthonormal=True)
        trace.num_matvecs += sum(e.shape[0] for e in extra)
        if self.sketch:
            _, vectors = _ritz(basis, products, orthonormal=True)
            self.sketch_vectors = vectors[-self.sketch :].detach()
        return self._finish(eigen, ritz, top2, k, trace)

    def _finish(self, eigen, ritz: torch.Tensor, top2: Optional[torch.Tensor], k: int, trace: Optional[TraceResult]) -> TrackedCurvature:
        """Keep the warm starts for the next measurement; drop the Krylov basis."""
        self.eigenvector = eigen.eigenvectors[0].detach()
        if top2 is not None:
            self.pair = top2.to(eigen.eigenvectors.dtype).detach()
            self.pair_gap = float(ritz[-1] - ritz[-2]) / max(abs(float(ritz[-1])), 1e-30)
        else:
            self.pair, self.pair_gap = None, math.inf
        if k > 1:  # the second value was asked for only to resolve the pair
            eigen.eigenvalues, eigen.residuals, eigen.error_bounds = eigen.eigenvalues[:1], eigen.residuals[:1], eigen.error_bounds[:1]
            eigen.eigenvectors = eigen.eigenvectors[:1]
            eigen.converged = eigen.converged or eigen.error_bounds[0] <= self.eigen_tol * abs(eigen.eigenvalues[0])
        self.num_measurements += 1
        eigen.basis = eigen.products = eigen.tridiagonal = None  # not kept: [m, n] each
        return TrackedCurvature(eigen=eigen, trace=trace)

    def _carried_trace(self, op, u: torch.Tensor, hu: torch.Tensor, carried: Optional[Dict[str, Any]], seed: int) -> TraceResult:
        """The exact head on ``span(u)`` plus the tail ``tr((I-P) H (I-P))`` tracked across measurements.

        Each probe set is used twice: fresh at one measurement and carried to the next, where the
        same probes under the new Hessian give the change of the tail (DeltaShift, Woodruff et al.
        2022). With memory ``w``: ``tail_t = w (tail_{t-1} + mean_c[q_t - q_{t-1}]) + (1 - w) mean_f[q_t]``,
        ``q(z) = z'^T H z'``, ``z' = (I - P) z``. Every term is unbiased, whatever the two matrices,
        so the estimate is; its variance is a sum over independent probe sets, each term estimated
        from its own probes (``stderr``; ``dof`` by Welch-Satterthwaite). ``memory="auto"`` sets
        ``w_t`` to the inverse-variance weight of the prediction against the fresh probes, from the
        variances of measurement ``t - 1`` (so that the new probes do not choose their own weight,
        which would bias the estimate and shrink its stderr).
        """
        n = op.size
        keep = self.trace_matvecs // 2
        num_fresh = self.trace_matvecs - (carried["count"] if carried is not None else 0)
        rows = []
        if carried is not None:
            rows.append(RademacherProbes(carried["total"], n, carried["seed"], op.device).rows(carried["first"], carried["total"]))
        rows.append(RademacherProbes(num_fresh, n, seed, op.device).rows(0, num_fresh))
        blocks = _blocks(op)
        t, head_layers = deflated_head(u, hu, blocks)
        head = float(torch.trace(t))
        forms = projected_forms(op, torch.cat(rows), u, blocks)  # [m, blocks]: per probe and tensor
        q = forms.sum(1)
        layout = getattr(op, "layout", None)
        named = (lambda v: OrderedDict(zip(layout.names, map(float, v)))) if layout is not None else (lambda v: {})
        k = 0 if carried is None else carried["count"]
        q_c, q_f = q[:k], q[k:]
        wgt = self.memory
        if carried is None:
            wgt = 0.0
        elif wgt == "auto":  # inverse-variance weights, from the previous measurement's probes
            wgt = carried["next_memory"]
        self.last_memory = wgt
        # the fresh probes enter with weight ``share`` (all of it at the first measurement); the
        # last ``keep`` of them are carried, the others' part of the variance is settled now
        share = 1.0 if carried is None else 1.0 - wgt
        fresh_mean = float(q_f.mean())
        fresh_pooled = float(q_f.var())  # iid probes of one matrix: one pooled sample variance
        c = share * keep / num_fresh
        settled = (share - c) ** 2 * fresh_pooled / (num_fresh - keep) if num_fresh > keep else 0.0
        settled_w = settled**2 / (num_fresh - 1)
        fresh_var = c**2 * fresh_pooled / keep
        fresh_layers = named(forms[k:].mean(0))
        if carried is None:
            tail, tail_layers = fresh_mean, fresh_layers
        else:
            change = float((q_c - carried["q"]).mean())
            tail = wgt * (carried["tail"] + change) + share * fresh_mean
            delta_layers = named(forms[:k].mean(0))
            tail_layers = {
                name: wgt * (carried["tail_layers"][name] + delta_layers[name] - carried["layers"][name]) + share * fresh_layers[name]
                for name in fresh_layers
            }
            # the carried set's whole part: w * mean_c[q_t - (1 - c_{t-1}) q_{t-1}]
            part = wgt**2 * float((q_c - (1.0 - carried["coef"]) * carried["q"]).var()) / k
            settled += wgt**2 * carried["settled"] + part
            settled_w += wgt**4 * carried["settled_w"] + part**2 / (k - 1)
        variance = settled + fresh_var
        # "auto": the next weight from this measurement's variances (the next probes do not enter it)
        change_var = float((q_c - (1.0 - carried["coef"]) * carried["q"]).var()) / k if carried is not None else math.nan
        fresh_next = float(q.var()) / (self.trace_matvecs - keep)
        prediction_next = settled + fresh_var + change_var
        total = prediction_next + fresh_next
        next_memory = min(_MAX_MEMORY, fresh_next / total) if carried is not None and total > 0 and math.isfinite(total) else 0.5
        dof_terms = settled_w + fresh_var**2 / (num_fresh - 1)
        dof = int(variance**2 / dof_terms) if dof_terms > 0 and math.isfinite(dof_terms) else 0
        carried_rows = forms[len(q) - keep :]
        self._carried = dict(
            size=n, seed=seed, total=num_fresh, first=num_fresh - keep, count=keep, coef=c,
            q=q[len(q) - keep :].clone(), layers=named(carried_rows.mean(0)),
            tail=tail, tail_layers=tail_layers, settled=settled, settled_w=settled_w, next_memory=next_memory,
        )
        head_layers = named(head_layers)
        per_layer = OrderedDict((name, head_layers[name] + tail_layers[name]) for name in head_layers)
        return TraceResult(
            value=head + tail, stderr=math.sqrt(variance) if variance >= 0 else math.nan, per_layer=per_layer,
            num_matvecs=len(q), method="tracked", dof=dof,
        )

    def state_dict(self) -> Dict[str, Any]:
        """The warm starts (eigenvector, sketch); the carried probes are left out: a resumed run may
        measure on other data, so its trace starts afresh."""
        return {"eigenvector": self.eigenvector, "sketch": self.sketch_vectors, "num_measurements": self.num_measurements,
                "pair": self.pair, "pair_gap": self.pair_gap}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.eigenvector = state.get("eigenvector")
        self.pair = state.get("pair")
        self.pair_gap = float(state.get("pair_gap", math.inf))
        self.sketch_vectors = state.get("sketch")
        self.num_measurements = int(state.get("num_measurements", 0))


_MAX_MEMORY = 0.9  # "auto": a prediction whose variance is underestimated from few probes must not take over


def _ritz(basis: torch.Tensor, products: torch.Tensor, orthonormal: bool = False):
    """Ritz values (ascending) and Ritz vectors (rows) of ``H`` on ``span(basis)``, ``products = H basis``."""
    u, hu = (basis, products) if orthonormal else orthonormalize(basis, products)
    t = u @ hu.T
    values, w = torch.linalg.eigh((t + t.T) / 2)
    vectors = w.T @ u
    # eigh's signs are arbitrary (rounding can flip them, e.g. between DDP and one process); the
    # summed start vector needs fixed ones: positive against a fixed pseudo-random direction
    reference = _reference(u.shape[1], u.dtype, u.device)
    signs = torch.where(vectors @ reference < 0, -1.0, 1.0).to(u.dtype)
    return values, vectors * signs[:, None]


@functools.lru_cache(maxsize=4)
def _reference(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed pseudo-random direction that sets the Ritz vectors' signs (drawn once per size)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
