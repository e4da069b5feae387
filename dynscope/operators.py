"""Linear operators on flat vectors: the Hessian of an objective, explicit matrices, and wrappers.

Every estimator (:func:`dynscope.hessian_trace`, :func:`dynscope.top_eigenvalues`,
:func:`dynscope.spectral_density`, :func:`dynscope.lambda_min`, :func:`dynscope.directional_sharpness`,
the stability ratios) takes an :class:`Operator`. A new one implements ``_matmat`` (and sets
``size``, ``dtype``, ``device``); the base class counts matvecs and provides ``quadratic_forms``
and ``measuring()``. A wrapper of another operator (``-A``, ``D A D``, a diagonal block)
subclasses :class:`OperatorWrapper`, which delegates counting and ``measuring()`` to the inner
operator, and implements only its math. Any object with ``size``, ``dtype``, ``device`` and
``matmat`` is accepted too.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence, Tuple

import torch

from .kernel_choice import kernel_plan
from .kernels import HVPKernel, block_dots, loop_quadratic_forms, run_chunked
from .objective import Objective, check_finite


class Operator:
    """A symmetric linear operator ``A`` on flat vectors of length ``size``.

    Subclasses set ``size``, ``dtype``, ``device`` (and ``layout``, a
    :class:`dynscope.ParamLayout`, for per-layer results) and implement ``_matmat``.

    Example:
        >>> import torch
        >>> from dynscope import hessian_trace, top_eigenvalues
        >>> class Diagonal(Operator):
        ...     def __init__(self, d):
        ...         self.d, self.size, self.dtype, self.device = d, d.numel(), d.dtype, d.device
        ...     def _matmat(self, vectors):
        ...         return vectors * self.d
        >>> op = Diagonal(torch.tensor([3.0, 1.0, 2.0]))
        >>> round(top_eigenvalues(op, which="LA").value, 4), op.num_matvecs > 0
        (3.0, True)
        >>> hessian_trace(op, num_matvecs=4, seed=0).value
        6.0
    """

    size: int
    dtype: torch.dtype
    device: torch.device
    layout = None
    #: matrix-vector products performed (each row of a ``matmat`` counts one)
    num_matvecs: int = 0

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.size, self.size)

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _matmat(vectors: [m, n]) -> [m, n]")

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V`` of shape ``[m, n]`` (one product per row)."""
        self.num_matvecs += vectors.shape[0]
        return self._matmat(vectors)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``A v`` for one vector ``[n]``."""
        return self.matmat(vector.unsqueeze(0))[0]

    def measuring(self) -> ContextManager:
        """A context to hold across many products (an objective's measuring state); none by default."""
        return contextlib.nullcontext()

    def quadratic_forms(self, probes, blocks: Sequence[slice]) -> torch.Tensor:
        """``[m, len(blocks)]`` float64: ``v_i[b] . (A v_i)[b]`` for each probe ``v_i`` and block ``b``.

        ``probes`` has ``num`` (``m``), ``rows(start, stop) -> [k, n]`` and ``row(i) -> [n]``
        (e.g. :class:`dynscope.trace.RademacherProbes`).
        """
        vectors = probes.rows(0, probes.num).to(device=self.device, dtype=self.dtype)
        return block_dots(vectors, self.matmat(vectors), blocks)


class OperatorWrapper(Operator):
    """An operator built on another one (``self.op``): matvecs are counted, and ``measuring()``
    held, by the inner operator; a subclass implements ``_matmat`` in terms of ``self.op``."""

    def __init__(self, op, size: Optional[int] = None) -> None:
        self.op = op
        self.size = op.size if size is None else size
        self.dtype, self.device = op.dtype, op.device
        self.layout = getattr(op, "layout", None) if size is None else None

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return self._matmat(vectors)

    def measuring(self) -> ContextManager:
        return getattr(self.op, "measuring", contextlib.nullcontext)()


class HessianOperator(Operator):
    """The Hessian of an objective as a linear operator on flat vectors.

    Args:
        objective: the loss as a function of the parameters (:class:`dynscope.Objective`).
        method: the HVP kernel: ``"auto"`` (default, chosen from the model's structure by
            :func:`dynscope.hvp.choose_method`), ``"forward"``, ``"reverse"`` or ``"loop"``.
        chunk_size: items (here: probes) per vectorized call; default: as many as fit in ``memory_cap``.
        memory_cap: bytes a batched call may use; default (None): about twice the per-probe
            loop's memory, at least 16 MiB on CPU and 2 GiB on an accelerator (:func:`dynscope.hvp.kernel_plan`).
            On an accelerator, where batching is the speed-up, raise it for speed (e.g. to
            ``2 * 2**30``).
        reduce: applied once to each product's result, e.g. an all-reduce mean over data-parallel
            ranks so that ``H`` is the Hessian of the global objective. It may have
            ``fail(like, error)``: a rank whose local products fail joins the reduction flagged, and
            every rank raises (see ``dynscope.callbacks.distributed``).

    The gradient graph is built once per operator; ``num_matvecs`` counts the products.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> obj = Objective(nn.Linear(2, 1), nn.functional.mse_loss, (torch.randn(8, 2), torch.randn(8, 1)))
        >>> op = HessianOperator(obj)
        >>> op.matmat(torch.eye(op.size)).shape
        torch.Size([3, 3])
    """

    def __init__(
        self,
        objective: Objective,
        *,
        method: str = "auto",
        chunk_size: Optional[int] = None,
        memory_cap: Optional[int] = None,
        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of probes, got {chunk_size}")
        self.objective = objective
        self.layout = objective.layout
        self.size = objective.layout.numel
        self.dtype = objective.dtype
        self.device = objective.device
        self.num_matvecs = 0
        self.method, self.chunk_size, self.memory_cap, self.reduce = method, chunk_size, memory_cap, reduce
        self._kernel = HVPKernel(objective)

    def measuring(self) -> ContextManager:
        """Hold the objective's measuring context across many matvecs (saves its set-up per call)."""
        return self.objective.measuring()

    def _run(self, vectors: torch.Tensor, reduce) -> torch.Tensor:
        return run_chunked(self._kernel, vectors, self.method, self.chunk_size, self.memory_cap, reduce)

    def gradient(self):
        """The objective's gradient (this process's), as the graph of the products so far holds it;
        None before a product (then ``objective.gradient()`` computes it: a forward and a backward).

        Example:
            >>> import torch
            >>> from dynscope import Objective
            >>> obj = Objective(torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy,
            ...                 (torch.randn(4, 3), torch.tensor([0, 1, 1, 0])))
            >>> op = HessianOperator(obj)
            >>> op.gradient() is None
            True
            >>> _ = op.matmat(torch.randn(1, op.size))
            >>> all(torch.allclose(op.gradient()[n], g) for n, g in obj.gradient().items())
            True
        """
        return self._kernel.gradient()

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``[m, n]``."""
        self.num_matvecs += vectors.shape[0]
        fail = getattr(self.reduce, "fail", None)
        if fail is None:
            return self._run(vectors, self.reduce)
        # A reduction that shares failures (data-parallel ranks): a rank whose local products fail
        # still joins the reduction, flagged, so every rank raises instead of waiting on it.
        try:
            local = self._run(vectors, None)
        except Exception as error:  # noqa: BLE001 - shared, then re-raised on every rank
            fail(vectors, error)
            raise
        return check_finite(self.reduce(local), "a Hessian-vector product")

    def quadratic_forms(self, probes, blocks: Sequence[slice]) -> torch.Tensor:
        """``[m, len(blocks)]`` float64: ``v_i[b] . (H v_i)[b]`` for each probe ``v_i`` and block ``b``.

        The same numbers as :func:`dynscope.hvp.block_dots` on ``matmat``'s result; with the
        per-probe kernel (the usual choice on CPU) each product is reduced to its block dots as soon
        as it is computed, so nothing of size ``[m, n]`` is built.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from dynscope import Objective
            >>> from dynscope.hvp import block_dots
            >>> from dynscope.trace import RademacherProbes
            >>> obj = Objective(nn.Linear(2, 1), nn.functional.mse_loss, (torch.randn(8, 2), torch.randn(8, 1)))
            >>> op, probes = HessianOperator(obj, method="loop"), RademacherProbes(4, 3, seed=0)
            >>> blocks = list(obj.layout.slices().values())
            >>> forms = op.quadratic_forms(probes, blocks)
            >>> bool(torch.allclose(forms, block_dots(probes.rows(0, 4), op.matmat(probes.rows(0, 4)), blocks)))
            True
        """
        m = probes.num
        loop = m > 0 and kernel_plan(self.objective, m, self.method, self.chunk_size, self.memory_cap)[0] == "loop"
        if self.reduce is not None or not loop:
            return super().quadratic_forms(probes, blocks)
        self.num_matvecs += m
        return loop_quadratic_forms(self._kernel, probes, blocks)


class MatrixOperator(Operator):
    """An explicit symmetric matrix as an operator (for tests, quadratics and small models).

    Example:
        >>> import torch
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> op.matmat(torch.tensor([[1.0, 1.0]]))
        tensor([[3., 1.]])
    """

    def __init__(self, matrix: torch.Tensor, layout=None) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.size = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.layout = layout
        self.num_matvecs = 0

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.matrix.T


class DiagonalOperator(Operator):
    """``diag(d)`` without the matrix: ``n`` values, products in ``O(n)`` (for tests, and for running
    an estimator's bookkeeping at a model's size without its HVPs, as :meth:`Curvature.pilot` does).

    Example:
        >>> import torch
        >>> from dynscope import top_eigenvalues
        >>> op = DiagonalOperator(torch.tensor([3.0, 1.0, 2.0]))
        >>> op.matmat(torch.ones(1, 3))
        tensor([[3., 1., 2.]])
        >>> round(top_eigenvalues(op, which="LA").value, 4)
        3.0
    """

    def __init__(self, d: torch.Tensor, layout=None) -> None:
        if d.dim() != 1:
            raise ValueError(f"expected the diagonal as a vector, got shape {tuple(d.shape)}")
        self.d, self.size, self.dtype, self.device = d, d.numel(), d.dtype, d.device
        self.layout = layout
        self.num_matvecs = 0

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors * self.d


class ScaledOperator(OperatorWrapper):
    """``D A D`` for an operator ``A`` and a diagonal ``D = diag(scale)``.

    With ``scale = P^{-1/2}`` its eigenvalues are those of the preconditioned Hessian ``P^{-1} H``
    (the sharpness that governs the stability of Adam-type steps).

    Example:
        >>> import torch
        >>> op = ScaledOperator(MatrixOperator(torch.eye(2) * 4.0), torch.tensor([0.5, 1.0]))
        >>> op.matmat(torch.eye(2))
        tensor([[1., 0.],
                [0., 4.]])
    """

    def __init__(self, op, scale: torch.Tensor) -> None:
        if scale.shape != (op.size,):
            raise ValueError(f"scale must have shape [{op.size}], got {tuple(scale.shape)}")
        super().__init__(op)
        self.scale = scale.to(device=op.device, dtype=op.dtype)

    def _matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(vectors * self.scale) * self.scale


def as_operator(target, **kwargs):
    """An :class:`Objective` becomes a :class:`HessianOperator` (``kwargs`` go to it), a square matrix a
    :class:`MatrixOperator`; operators (anything with ``matmat``) pass through."""
    if isinstance(target, Objective):
        return HessianOperator(target, **kwargs)
    if isinstance(target, torch.Tensor):
        return MatrixOperator(target)
    if not hasattr(target, "matmat"):
        raise TypeError(f"expected an Objective, a matrix or an operator with matmat(), got {type(target).__name__}")
    return target
