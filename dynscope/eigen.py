"""Extreme Hessian eigenvalues by Lanczos with full reorthogonalisation.

Lanczos needs far fewer matvecs than power iteration (PyHessian's method) to reach a given
accuracy: its error falls with the Chebyshev rate in ``sqrt(gap)`` rather than ``gap``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import List, Literal, Optional

import numpy as np
import torch

from .hvp import as_operator


@dataclass
class EigenResult:
    """The ``k`` extreme eigenvalues of an operator.

    Attributes:
        eigenvalues: ordered as requested by ``which`` (largest magnitude or largest first).
        eigenvectors: ``[k, n]`` unit vectors, when asked for.
        converged: every requested Ritz value met the tolerance (see :func:`lanczos`).
        residuals: residual norm ``||H y - theta y|| = |beta_j s_ji|`` of each Ritz pair.
        num_matvecs: Hessian-vector products spent.
        error_bounds: the bound on each Ritz value's distance to an eigenvalue that the stopping
            rule uses, ``min(r, r^2 / gap)`` (absolute).
        basis: ``[m, n]`` orthonormal Lanczos vectors (float32 or float64, see :func:`lanczos`) and
            ``products`` their ``H q_j`` (in the operator's dtype), when asked for (``keep_basis=True``): the Krylov space spans the
            top of the spectrum, which a deflated trace estimate reuses for free
            (:func:`dynscope.trace.deflated_hutchinson`); ``tridiagonal`` is ``basis H basis^T``
            (``[m, m]``), from which the Ritz pairs follow without touching ``[m, n]`` data.
    """

    eigenvalues: List[float]
    eigenvectors: Optional[torch.Tensor]
    converged: bool
    residuals: List[float]
    num_matvecs: int
    error_bounds: List[float] = field(default_factory=list)
    basis: Optional[torch.Tensor] = None
    products: Optional[torch.Tensor] = None
    tridiagonal: Optional[torch.Tensor] = None

    @property
    def value(self) -> float:
        """The first eigenvalue (the top one)."""
        return self.eigenvalues[0]


_LOW = (torch.float32, torch.float16, torch.bfloat16)
#: the smallest relative tolerance for which :func:`lanczos` keeps its basis in float32
_FLOAT32_TOL = 1e-4
#: from this operator size on :func:`lanczos` reorthogonalises partially (below it, every step: it is cheap)
_PARTIAL_REORTH_FROM = 2048


def _select(theta, k: int, which: str) -> List[int]:
    """Indices of the top ``k`` Ritz values ``theta`` (numpy or torch): largest magnitude (``"LM"``)
    or largest (``"LA"``) first."""
    values = theta.detach().cpu().numpy() if isinstance(theta, torch.Tensor) else theta
    key = np.abs(values) if which == "LM" else values
    return [int(i) for i in np.argsort(-key, kind="stable")[:k]]


def error_bounds(theta: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    """A bound on the distance from each Ritz value to an eigenvalue: ``min(r_i, r_i^2 / gap_i)``.

    ``r_i`` alone bounds it for any symmetric operator; ``r_i^2 / gap_i`` (Parlett, "The
    Symmetric Eigenvalue Problem", 11.7) is far tighter once the Ritz value is separated from the
    rest of the spectrum by ``gap_i``, which is estimated conservatively from the other Ritz values
    as ``min_j (|theta_i - theta_j| - r_j)`` (each other Ritz value is within ``r_j`` of an
    eigenvalue); without a positive gap the bound is ``r_i``.

    Example:
        >>> b = error_bounds(torch.tensor([1.0, 5.0], dtype=torch.float64), torch.tensor([0.5, 0.1], dtype=torch.float64))
        >>> [round(v, 6) for v in b.tolist()]
        [0.064103, 0.002857]
    """
    return torch.from_numpy(_error_bounds(theta.double().cpu().numpy(), residuals.double().cpu().numpy()))


def _error_bounds(theta: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    # in numpy: the per-step bookkeeping on a few dozen numbers costs microseconds there, and
    # tens of them per torch call, which added up to more than a Hessian-vector product per step
    if theta.shape[0] == 1:
        return residuals.copy()
    dist = np.abs(theta[:, None] - theta[None, :]) - residuals[None, :]
    np.fill_diagonal(dist, np.inf)
    gap = dist.min(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tight = np.minimum(residuals, residuals**2 / np.maximum(gap, 1e-300))
    return np.where(gap > 0, tight, residuals)



def lanczos(
    op,
    k: int = 1,
    *,
    which: Literal["LM", "LA"] = "LM",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: Optional[int] = 0,
    return_eigenvectors: bool = False,
    start: Optional[torch.Tensor] = None,
    keep_basis: bool = False,
    block_start: bool = False,
    keep_products: bool = True,
) -> EigenResult:
    """Lanczos on ``op`` (one matvec per iteration), stopping when the top ``k`` Ritz values are accurate.

    With ``block_start`` and ``[p, n]`` start vectors, the search space begins with all ``p`` of
    them (one matvec each) and then grows by the residual of the least accurate of the top ``k``
    Ritz pairs (see :func:`_block_warm_start`); from one start vector that is Lanczos again.

    The stopping rule bounds what it says: a Ritz value ``theta`` is accurate when the bound of
    :func:`error_bounds` on its distance to an eigenvalue is at most ``tol * |theta|`` (a relative
    error of ``tol``), and Lanczos stops once this holds for each of the top ``k`` at two
    consecutive steps (a Ritz value that has locked onto the second eigenvalue before the first
    one has entered the Krylov space can meet the bound once; the step after it rarely does).
    What no Krylov method can certify is that no larger eigenvalue is still missing from the space;
    ``converged`` says only that the bound held.

    ``keep_basis`` keeps the Lanczos vectors, their products (unless ``keep_products=False``) and
    the tridiagonal matrix in the result.

    For a float32 (or lower precision) operator and ``tol >= 1e-4`` the Lanczos vectors are kept in
    float32 (the tridiagonal and Ritz values in float64): the reorthogonalisation, most of a step's
    dense work, then moves half the memory; the rounding this adds (about ``2e-6 * max |theta|``) is
    added to the bounds. Otherwise, and for float64 operators, the basis is float64.

    Operators on the CPU with at least 2048 rows are reorthogonalised partially (Simon 1984): a
    step reorthogonalises against the whole basis only when estimates of the lost orthogonality
    (:func:`_next_overlaps`) exceed ``sqrt(eps)``, which keeps the basis semi-orthogonal, the Ritz
    values free of ghost copies and the bounds valid; the basis is then orthonormal to about
    ``sqrt(eps)`` rather than ``eps``. Smaller operators, and those on accelerators, every step.
    """
    n = op.size
    max_iter = int(min(max_iter, n))
    if k < 1 or k > n:
        raise ValueError(f"k must be between 1 and the operator size {n}, got {k}")
    if which not in ("LM", "LA"):
        raise ValueError(f"which must be 'LM' (largest magnitude) or 'LA' (largest algebraic), got {which!r}")
    if block_start and start is not None and start.dim() == 2 and start.shape[0] > 1 and start.shape[1] == n and float(start.norm()) > 0:
        return _block_warm_start(op, k, start, which=which, tol=tol, max_iter=max_iter,
                                 return_eigenvectors=return_eigenvectors, keep_basis=keep_basis)
    # the basis in the operator's float32 when the tolerance allows it: rounding then perturbs the
    # Ritz values by ~1e-6 |theta_max|, far below tol (the bound below adds it), at half the memory
    # traffic of float64 in the reorthogonalisation, which dominates the cost of a step
    dtype = torch.float32 if op.dtype in _LOW and tol >= _FLOAT32_TOL else torch.float64
    q = _start_vector(op, start, seed).to(dtype)
    basis = torch.empty(min(max_iter, 32), n, dtype=dtype, device=op.device)  # grows by doubling
    keep_products = keep_basis and keep_products
    products = torch.empty(basis.shape[0], n, dtype=op.dtype, device=op.device) if keep_products else None
    alphas, betas = [], []
    theta = s = None
    residuals: List[float] = []
    bounds: List[float] = []
    converged = met_before = False
    rounding = 0.0 if dtype == torch.float64 else 16 * torch.finfo(dtype).eps
    # partial reorthogonalisation (Simon 1984): the three-term recurrence alone, while estimates of the
    # new vector's overlaps with the basis (a recurrence in the scalars, O(j) a step) stay below
    # sqrt(eps); then the new vector and the next one against the whole basis. Semi-orthogonality
    # keeps the Ritz values and residual bounds accurate to O(eps ||H||); the full pass costs two
    # reads of the basis per step. On CPU only: the estimates assume products rounded like the
    # dtype, which TF32 kernels on GPUs do not honour (and there the full pass is cheap).
    partial = n >= _PARTIAL_REORTH_FROM and op.device.type == "cpu"
    unit = max(torch.finfo(dtype).eps, torch.finfo(op.dtype).eps) / 2  # the products' rounding counts too
    eps1, delta = math.sqrt(n) * unit, math.sqrt(unit)
    omega, omega_prev = np.ones(1), None  # omega[k] ~ q_j . q_k
    force, norm_estimate = False, 0.0
    t = np.zeros((basis.shape[0], basis.shape[0]))  # the tridiagonal (numpy: see _error_bounds), grown with the basis
    top: List[int] = []
    for j in range(max_iter):
        if j == basis.shape[0]:
            basis = torch.cat([basis, torch.empty_like(basis[: min(j, max_iter - j)])])
            if keep_products:
                products = torch.cat([products, torch.empty_like(products[: basis.shape[0] - j])])
        if j + 1 >= t.shape[0]:
            t = np.pad(t, (0, min(max(t.shape[0], 1), max_iter - t.shape[0]) + 1))
        basis[j] = q
        hq = op.matmat(q.to(op.dtype).unsqueeze(0))[0]
        if keep_products:
            products[j] = hq
        w = hq.to(dtype)
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        t[j, j] = alpha
        v = basis[: j + 1]
        if partial:
            w = torch.sub(w, q, alpha=alpha)  # a new tensor: hq may be the operator's own
            if j > 0:
                w.sub_(basis[j - 1], alpha=betas[-1])
            beta = before = float(w.norm())  # (the recurrence's own cancellation is not the pass's)
            norm_estimate = max(norm_estimate, abs(alpha) + beta + (betas[-1] if betas else 0.0))
            omega_next = _next_overlaps(omega, omega_prev, alphas, betas, beta, eps1 * norm_estimate)
            reorthogonalise = force or bool((np.abs(omega_next[:-1]) > delta).any())
            force = reorthogonalise and not force  # the vector after a reorthogonalised one is, too
        else:
            reorthogonalise, before = True, float(w.norm())
        if reorthogonalise:
            # full reorthogonalisation in one fused pass; a second pass only when the first cancelled
            # most of what it started from ("twice is enough", Parlett/Kahan: then the rounding of the
            # first pass matters)
            w = torch.addmv(w, v.T, v @ w, alpha=-1)
            beta = float(w.norm())
            if beta < 0.7 * before:
                w = torch.addmv(w, v.T, v @ w, alpha=-1)
                beta = float(w.norm())
            if partial:
                omega_next = np.full(j + 2, eps1)
                omega_next[-1] = 1.0
        if partial:
            omega_prev, omega = omega, omega_next
        # torch's LAPACK, not numpy's: numpy's first calls in a process that trains with torch cost
        # ~0.7 ms each (its BLAS starting up), more than the whole step's bookkeeping otherwise
        theta, s = (x.numpy() for x in torch.linalg.eigh(torch.from_numpy(t[: j + 1, : j + 1])))
        if beta < max(1e-12, rounding) * max(1.0, abs(alpha)):  # invariant subspace: the Ritz values are exact
            converged = j + 1 >= k
            top = _select(theta, min(k, j + 1), which)
            residuals = bounds = [0.0] * len(top)
            break
        if j + 1 >= k:
            all_res = np.abs(beta * s[-1, :])
            top = _select(theta, k, which)
            residuals = [float(all_res[i]) for i in top]
            bound = _error_bounds(theta, all_res) + rounding * float(np.abs(theta).max())
            bounds = [float(bound[i]) for i in top]
            met = all(b <= tol * max(abs(float(theta[i])), 1e-30) for b, i in zip(bounds, top))
            if met and met_before:
                converged = True
                break
            met_before = met
        betas.append(beta)
        if j + 1 < max_iter:
            t[j, j + 1] = t[j + 1, j] = beta
        q = w / beta
    m = len(alphas)
    top = _select(theta, min(k, m), which)
    theta, s = torch.from_numpy(theta), torch.from_numpy(s)
    tridiagonal = torch.from_numpy(t[:m, :m].copy())
    vectors = None
    if return_eigenvectors:
        vectors = s[:, top].T.to(device=basis.device, dtype=dtype) @ basis[:m]
        vectors = (vectors / vectors.norm(dim=1, keepdim=True)).to(op.dtype)
    return EigenResult(
        eigenvalues=[float(theta[i]) for i in top],
        eigenvectors=vectors,
        converged=converged,
        residuals=residuals,
        num_matvecs=m,
        error_bounds=bounds,
        basis=basis[:m] if keep_basis else None,
        products=products[:m] if keep_products else None,
        tridiagonal=tridiagonal if keep_basis else None,
    )


def _next_overlaps(omega: np.ndarray, omega_prev: Optional[np.ndarray], alphas: List[float], betas: List[float],
                   beta: float, rounding: float) -> np.ndarray:
    """Estimates of ``q_{j+1} . q_k`` (``k = 0..j+1``) from those of ``q_j`` (``omega``) and ``q_{j-1}``
    (``omega_prev``): Simon's recurrence, which follows from ``H q_i = b_i q_{i+1} + a_i q_i + b_{i-1} q_{i-1}``
    and the symmetry of ``H``,

    ``b_j w_{j+1,k} = b_k w_{j,k+1} + (a_k - a_j) w_{j,k} + b_{k-1} w_{j,k-1} - b_{j-1} w_{j-1,k}``,

    each step adding ``rounding`` (about ``eps sqrt(n) ||H||``) in the direction that grows the estimate.

    Example:
        >>> w = _next_overlaps(np.ones(1), None, [2.0], [], 1.0, 1e-10)
        >>> w.tolist()  # q_1 against q_0 at rounding level, and itself
        [1e-10, 1.0]
    """
    j = len(alphas) - 1
    out = np.empty(j + 2)
    if j > 0:
        a = np.asarray(alphas)
        b = np.asarray(betas)  # b_0 .. b_{j-1}
        lower = np.concatenate([[0.0], b[: j - 1] * omega[: j - 1]])  # b_{k-1} w_{j,k-1}
        grow = b[:j] * omega[1 : j + 1] + (a[:j] - a[j]) * omega[:j] + lower - b[j - 1] * omega_prev[:j]
        out[:j] = (grow + np.where(grow >= 0, rounding, -rounding)) / beta
    out[j] = rounding / beta
    out[j + 1] = 1.0
    return out


def _block_warm_start(op, k: int, start: torch.Tensor, *, which: str, tol: float, max_iter: int,
                      return_eigenvectors: bool, keep_basis: bool) -> EigenResult:
    """Rayleigh-Ritz on a growing space that starts with the rows of ``start`` (e.g. the previous
    measurement's top two Ritz vectors: when they swapped places, the new top one is among them,
    where a Krylov space grown from the old top vector alone can stop at the old one first).

    Each step adds the residual ``H y - theta y`` of the least accurate of the top ``k`` Ritz pairs
    (from a single start vector every Ritz residual points along the next Lanczos vector, so this
    is Lanczos), reorthogonalised twice. The stopping rule is :func:`lanczos`'s, on the residual
    norms of all Ritz pairs, ``||H Q s||^2 - theta^2`` from the Gram matrix of the products.
    """
    n = op.size
    max_iter = max(max_iter, min(start.shape[0], n))
    basis = torch.empty(max_iter, n, dtype=torch.float64, device=op.device)
    products = torch.empty_like(basis)
    gram = torch.empty(max_iter, max_iter, dtype=torch.float64, device=op.device)  # products' inner products
    proj = torch.empty_like(gram)  # basis_i . products_j
    pending = list(start.detach().to(device=op.device, dtype=torch.float64))
    m = 0
    theta = s = t = None
    residuals: List[float] = []
    bounds: List[float] = []
    converged = met_before = False
    nxt = None
    while m < max_iter:
        from_start = bool(pending)
        v = pending.pop(0) if from_start else nxt
        before = float(v.norm())
        for _ in range(2):
            v = v - basis[:m].T @ (basis[:m] @ v)
        norm = float(v.norm())
        if from_start and norm <= 1e-8 * before:
            continue  # a start vector in the span of the others (or zero)
        if not from_start and norm <= 1e-12 * max(1.0, float(theta.abs().max())):
            converged = m >= k  # the space is invariant: the Ritz values are exact
            top = _select(theta, min(k, m), which)
            residuals = bounds = [0.0] * len(top)
            break
        basis[m] = v / norm
        products[m] = op.matmat(basis[m].to(op.dtype).unsqueeze(0))[0].double()
        row = products[: m + 1] @ products[m]
        gram[m, : m + 1] = row
        gram[: m + 1, m] = row
        proj[: m + 1, m] = basis[: m + 1] @ products[m]
        proj[m, :m] = products[:m] @ basis[m]
        m += 1
        t = (proj[:m, :m] + proj[:m, :m].T) / 2
        theta, s = torch.linalg.eigh(t)
        # ||H y_i - theta_i y_i||^2 = ||H y_i||^2 - theta_i^2 for unit y_i with y_i^T H y_i = theta_i
        all_res = ((s * (gram[:m, :m] @ s)).sum(0) - theta**2).clamp_min(0).sqrt()
        top = _select(theta, min(k, m), which)
        bound = error_bounds(theta, all_res)
        rel = [float(bound[i]) / max(abs(float(theta[i])), 1e-30) for i in top]
        worst = int(top[max(range(len(rel)), key=rel.__getitem__)])
        nxt = s[:, worst] @ products[:m] - theta[worst] * (s[:, worst] @ basis[:m])
        if pending or m < k:
            continue
        residuals = [float(all_res[i]) for i in top]
        bounds = [float(bound[i]) for i in top]
        met = max(rel) <= tol
        if met and met_before:
            converged = True
            break
        met_before = met
    top = _select(theta, min(k, m), which)
    return EigenResult(
        eigenvalues=[float(theta[i]) for i in top],
        eigenvectors=(s[:, top].T @ basis[:m]).to(op.dtype) if return_eigenvectors else None,
        converged=converged,
        residuals=residuals,
        num_matvecs=m,
        error_bounds=bounds,
        basis=basis[:m] if keep_basis else None,
        products=products[:m].to(op.dtype) if keep_basis else None,
        tridiagonal=t if keep_basis else None,
    )


def _start_vector(op, start: Optional[torch.Tensor], seed: Optional[int]) -> torch.Tensor:
    """The normalised start: ``start`` (``[n]``, or ``[p, n]`` previous eigenvectors, summed), else random."""
    n = op.size
    if start is not None and start.dim() == 2 and start.shape[1] == n:
        start = start.detach().double().sum(0)
    if start is not None and start.shape == (n,) and float(start.norm()) > 0:
        q = start.detach().to(device=op.device, dtype=torch.float64)
    else:
        gen = torch.Generator()
        gen.manual_seed(0 if seed is None else int(seed))
        q = torch.randn(n, generator=gen, dtype=torch.float64).to(op.device)
    return q / q.norm()


def top_eigenvalues(
    objective,
    k: int = 1,
    *,
    which: Literal["LM", "LA"] = "LM",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: Optional[int] = 0,
    return_eigenvectors: bool = False,
    start: Optional[torch.Tensor] = None,
    keep_basis: bool = False,
    block_start: bool = False,
    **operator_kwargs,
) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues of ``objective`` (or of an operator / square matrix).

    Args:
        objective: a :class:`dynscope.Objective`, an operator with ``matmat`` or a square matrix.
        k: how many eigenvalues.
        which: ``"LM"`` (default) largest magnitude first; ``"LA"`` largest algebraic first
            (what "sharpness" means for the edge of stability).
        tol: relative accuracy of each eigenvalue: Lanczos stops when a bound on each Ritz value's
            distance to an eigenvalue (``min(r, r^2 / gap)``, see :func:`lanczos`) is at most
            ``tol * |value|``. ``1e-2`` gives 1%.
        max_iter: at most this many matvecs (Lanczos steps).
        seed: seed of the start vector (private generator).
        return_eigenvectors: also return ``[k, n]`` eigenvector estimates.
        start: a start vector ``[n]`` (e.g. the previous measurement's top eigenvector, which
            makes tracking ``lambda_max`` during training cheap), or ``[p, n]`` previous
            eigenvectors (summed, or with ``block_start`` each one a first direction of the
            search space); default random.
        block_start: start from all rows of a ``[p, n]`` ``start`` (``p`` matvecs), not their sum:
            a top pair that swapped places since they were computed is then resolved at once.
        keep_basis: also return the Lanczos vectors and their products (``basis``, ``products``).

    Example:
        >>> import torch
        >>> from dynscope import top_eigenvalues
        >>> A = torch.diag(torch.tensor([5.0, -7.0, 1.0, 0.5]))
        >>> [round(v, 4) for v in top_eigenvalues(A, k=2).eigenvalues]
        [-7.0, 5.0]
        >>> round(top_eigenvalues(A, which="LA").value, 4)
        5.0
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    if not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a positive number, got {tol}")
    op = as_operator(objective, **operator_kwargs)
    with getattr(op, "measuring", contextlib.nullcontext)():
        return lanczos(
            op, k, which=which, tol=tol, max_iter=max_iter, seed=seed, return_eigenvectors=return_eigenvectors,
            start=start, keep_basis=keep_basis, block_start=block_start,
        )
