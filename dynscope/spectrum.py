"""The Hessian spectrum beyond its top: the most negative eigenvalue, per-block top eigenvalues and
the spectral density by stochastic Lanczos quadrature.

Stochastic Lanczos quadrature (Ghorbani, Krishnan and Xiao 2019, "An investigation into neural net
optimization via Hessian eigenvalue density"; Lin, Saad and Yang 2016): for a unit probe ``v``,
``m`` Lanczos steps give a tridiagonal ``T`` with eigenpairs ``(theta_k, y_k)``; the Gauss quadrature
``sum_k (y_k[0])^2 f(theta_k)`` equals ``v^T f(H) v`` for every polynomial ``f`` of degree at most
``2m - 1``. With Rademacher probes ``E[v^T f(H) v] = tr(f(H)) / n``, so the nodes ``theta_k`` with
weights ``(y_k[0])^2 / num_probes`` are a discrete estimate of the spectral measure
``(1/n) sum_i delta(lambda_i)``: its mass is 1 and its moments are unbiased estimates of
``tr(H^p) / n``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .eigen import top_eigenvalues
from .operators import OperatorWrapper, as_operator
from .trace import RademacherProbes

__all__ = ["BlockOperator", "NegatedOperator", "SpectralDensity", "lambda_min", "spectral_density"]


class NegatedOperator(OperatorWrapper):
    """``-A``: its largest eigenvalue is minus ``A``'s smallest."""

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return -self.op.matmat(vectors)


class BlockOperator(OperatorWrapper):
    """The diagonal block ``A[s, s]`` of an operator for a slice ``s`` of its coordinates
    (e.g. one parameter tensor: the block Hessian of that layer)."""

    def __init__(self, op, block: slice) -> None:
        super().__init__(op, size=block.stop - block.start)
        self.block = block

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(vectors.shape[0], self.op.size, dtype=vectors.dtype, device=vectors.device)
        full[:, self.block] = vectors
        return self.op.matmat(full)[:, self.block]


def lambda_min(objective, *, tol: float = 1e-4, max_iter: int = 100, seed: Optional[int] = 0, **operator_kwargs):
    """The most negative (smallest algebraic) Hessian eigenvalue, by Lanczos on ``-H``.

    Returns the :class:`~dynscope.EigenResult` of ``-H`` with its values negated back.

    Example:
        >>> import torch
        >>> round(lambda_min(torch.diag(torch.tensor([5.0, -7.0, 1.0]))).value, 4)
        -7.0
    """
    op = as_operator(objective, **operator_kwargs)
    result = top_eigenvalues(NegatedOperator(op), which="LA", tol=tol, max_iter=max_iter, seed=seed)
    result.eigenvalues = [-v for v in result.eigenvalues]
    return result


@dataclass
class SpectralDensity:
    """A discrete estimate of the Hessian's spectral measure ``(1/n) sum_i delta(lambda_i)``.

    Attributes:
        nodes: ``[num_probes, m]`` Ritz values (eigenvalue locations).
        weights: ``[num_probes, m]`` quadrature weights; all of them sum to 1.
        size: ``n``, the number of parameters (multiply a mass by it to count eigenvalues).
        num_matvecs: Hessian-vector products spent.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    size: int
    num_matvecs: int

    def moment(self, p: int) -> float:
        """``sum w theta^p``: an unbiased estimate of ``tr(H^p) / n`` (exact per probe for ``p <= 2m-1``)."""
        return float((self.weights * self.nodes**p).sum())

    def mass(self, low: float = -math.inf, high: float = math.inf) -> float:
        """Estimated fraction of eigenvalues in ``[low, high]``."""
        inside = (self.nodes >= low) & (self.nodes <= high)
        return float((self.weights * inside).sum())

    def histogram(self, edges: Sequence[float]) -> torch.Tensor:
        """Estimated eigenvalue counts (fractions times ``n``) in the bins between ``edges``."""
        edges_t = torch.as_tensor(edges, dtype=torch.float64)
        index = torch.bucketize(self.nodes.reshape(-1).clamp(edges_t[0], edges_t[-1]), edges_t[1:-1], right=True)
        counts = torch.zeros(len(edges_t) - 1, dtype=torch.float64)
        counts.index_add_(0, index, self.weights.reshape(-1))
        return counts * self.size

    def density(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """The measure smoothed with a Gaussian of width ``sigma`` on ``grid`` (Ghorbani et al.'s plot)."""
        grid = torch.as_tensor(grid, dtype=torch.float64)
        z = (grid[:, None] - self.nodes.reshape(-1)[None, :]) / sigma
        return (torch.exp(-0.5 * z**2) * self.weights.reshape(-1)[None, :]).sum(1) / (sigma * math.sqrt(2 * math.pi))


def spectral_density(
    objective,
    num_probes: int = 4,
    num_steps: int = 32,
    *,
    seed: Optional[int] = 0,
    **operator_kwargs,
) -> SpectralDensity:
    """Hessian spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Args:
        objective: a :class:`dynscope.Objective`, an operator with ``matmat`` or a square matrix.
        num_probes: Rademacher probes (independent Lanczos runs); the moments' error falls like
            ``1/sqrt(num_probes * n)`` for a spread-out spectrum.
        num_steps: Lanczos steps per probe (``m``, at most ``n``), with full reorthogonalisation:
            the quadrature is exact for polynomials of degree ``<= 2m - 1``, and the extreme nodes
            converge to the extreme eigenvalues first.
        seed: seed of the probes (private generator).
        **operator_kwargs: passed to :class:`dynscope.HessianOperator`.

    Cost: ``num_probes * num_steps`` Hessian-vector products, the probes batched together.

    Example:
        >>> import torch
        >>> H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64))
        >>> d = spectral_density(H, num_probes=2, num_steps=4, seed=0)
        >>> round(d.mass(), 6), round(d.moment(1), 6)   # Rademacher probes: v^T H v / n = tr(H) / n
        (1.0, 4.0)
        >>> sorted(round(x, 4) for x in d.nodes[0].tolist())
        [1.0, 2.0, 3.0, 10.0]
    """
    if num_probes < 1 or num_steps < 1:
        raise ValueError(f"num_probes and num_steps must be positive, got {num_probes} and {num_steps}")
    op = as_operator(objective, **operator_kwargs)
    n = op.size
    m = min(num_steps, n)
    q = RademacherProbes(num_probes, n, seed, op.device).rows(0, num_probes).double() / math.sqrt(n)
    basis = torch.zeros(m, num_probes, n, dtype=torch.float64, device=op.device)
    alphas = torch.zeros(num_probes, m, dtype=torch.float64)
    betas = torch.zeros(num_probes, max(m - 1, 0), dtype=torch.float64)
    steps = torch.full((num_probes,), m, dtype=torch.long)  # a probe stops early in an invariant subspace
    active = torch.ones(num_probes, dtype=torch.bool, device=op.device)
    with getattr(op, "measuring", contextlib.nullcontext)():
        for j in range(m):
            basis[j] = q
            w = op.matmat(q.to(op.dtype)).double()
            a = (w * q).sum(1)
            alphas[:, j] = torch.where(active, a, torch.zeros_like(a)).cpu()
            for _ in range(2):  # full reorthogonalisation against this probe's own basis
                w = w - torch.einsum("jp,jpn->pn", torch.einsum("jpn,pn->jp", basis[: j + 1], w), basis[: j + 1])
            b = w.norm(dim=1)
            if j == m - 1:
                break
            stop = active & (b <= 1e-10 * a.abs().clamp_min(1.0))
            for i in torch.nonzero(stop).reshape(-1).tolist():
                steps[i] = j + 1
            active = active & ~stop
            betas[:, j] = torch.where(active, b, torch.zeros_like(b)).cpu()
            q = torch.where(active[:, None], w / b.clamp_min(1e-300)[:, None], torch.zeros_like(w))
            if not bool(active.any()):
                break
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    for i in range(num_probes):
        k = int(steps[i])
        t = torch.diag(alphas[i, :k]) + torch.diag(betas[i, : k - 1], 1) + torch.diag(betas[i, : k - 1], -1)
        theta, s = torch.linalg.eigh(t)
        nodes[i, :k] = theta
        weights[i, :k] = s[0] ** 2 / num_probes
    return SpectralDensity(nodes, weights, n, int(steps.sum()))
