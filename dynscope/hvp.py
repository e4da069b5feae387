"""Batched Hessian-vector products.

Three kernels compute ``H v`` for a batch of vectors ``V`` (leading dimension = probes):

* ``"forward"``: forward-over-reverse, ``vmap(v -> jvp(grad(L), theta, v))``. One traced program for
  all probes, no retained graph.
* ``"reverse"``: reverse-over-reverse on one retained graph, ``autograd.grad(grad(L), theta, V,
  is_grads_batched=True)``. The gradient graph is built once and reused for every chunk.
* ``"loop"``: the same retained graph, one ``autograd.grad`` per probe. Works for every op.

The retained graph is built with :func:`dynscope.second_order.cheap_second_order`: GELU,
LayerNorm, softmax and attention then differentiate twice at a fraction of torch's per-probe cost.

``method="auto"`` picks the kernel from the model's structure, never from timings, so the same
model gets the same kernel and the same numbers on every run (:func:`choose_method`): the
per-probe ``"loop"`` on CPU, where it was as fast as or faster than the batched kernels on the
benchmark MLPs, CNNs and transformer and needs the least memory, except for models whose
per-probe work is so small that the per-call overhead dominates (then ``"reverse"``); the batched
``"reverse"`` on accelerators. Forward-over-reverse is used only when asked for. A batched kernel
that fails on the model (an op without a batching rule) falls back to ``"loop"`` for that model
(a deterministic, error-driven choice, remembered per model). A single vector always uses the
retained graph. Probes are processed in chunks sized to a memory cap; a chunk that runs out of
memory is halved and retried.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Literal, Mapping, Optional, Sequence, Union

import torch
from torch.func import grad, jvp

from .objective import NonFiniteError, Objective, check_finite
from .second_order import cheap_second_order

Method = Literal["auto", "forward", "reverse", "loop"]
Vectors = Union[torch.Tensor, Mapping[str, torch.Tensor]]

DEFAULT_MEMORY_CAP = 2 * 1024**3
_ORDER = ("forward", "reverse", "loop")
# On CPU the batched kernel wins only where the per-probe work is tiny (a 2k-parameter MLP at batch
# 512: 0.6x the loop's time; an 85k MLP: 1.3x; the CNNs and the transformer: 1.0-1.7x); this many
# values (3 parameter- and 3 activation-sized tensors per probe) is the boundary.
_SMALL_PROBE = 2**19
_CHOSEN: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def is_out_of_memory(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(error, oom_type):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def activation_numel(objective: Objective) -> int:
    """Number of activation values one forward pass produces (cached on the objective)."""
    cached = getattr(objective, "_activation_numel", None)
    if cached is not None:
        return cached
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in objective.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with objective.measuring(), torch.no_grad():
            objective.loss(objective.params)
    finally:
        for h in handles:
            h.remove()
    objective._activation_numel = max(total, 1)
    return objective._activation_numel


def default_chunk_size(objective: Objective, num_vectors: int, memory_cap: int = DEFAULT_MEMORY_CAP) -> int:
    """Probes per chunk so that a chunk's working memory stays under ``memory_cap`` bytes.

    Per probe we budget a gradient, a tangent and an HVP (three parameter-sized tensors) plus the
    forward and backward activations (about three activation-sized tensors).
    """
    itemsize = torch.finfo(objective.dtype).bits // 8
    per_probe = itemsize * (3 * objective.layout.numel + 3 * activation_numel(objective))
    return int(max(1, min(num_vectors, memory_cap // max(per_probe, 1))))


class _Kernel:
    """HVP of one objective at its current parameters, for chunks of flat vectors ``[k, n]``."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.layout = objective.layout
        self._graph = None  # (params, grads, used indices) for the reverse and loop kernels
        self.method_used: Optional[str] = None

    def _retained_graph(self):
        if self._graph is None:
            params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in self.objective.params.items())
            try:
                with cheap_second_order():  # GELU, LayerNorm, attention: cheap per-probe double backward
                    grads = self._gradient_graph(params)
            except NonFiniteError:
                raise
            except Exception as error:  # noqa: BLE001 - a rule that does not fit this model: torch's own rules
                if is_out_of_memory(error):
                    raise
                warnings.warn(f"dynscope: second-order rules failed on this model ({error!r}); using torch's")
                grads = self._gradient_graph(params)
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            self._graph = (list(params.values()), grads, used)
        return self._graph

    def _gradient_graph(self, params: "OrderedDict[str, torch.Tensor]"):
        loss = check_finite(self.objective.loss(params), "the loss")
        return torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)

    def _second(self, vs: List[torch.Tensor], batched: bool) -> List[torch.Tensor]:
        params, grads, used = self._retained_graph()
        if not used:
            return [torch.zeros_like(v) for v in vs]
        hv = torch.autograd.grad(
            [grads[i] for i in used],
            params,
            grad_outputs=[vs[i] for i in used],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return [torch.zeros_like(v) if h is None else h for v, h in zip(vs, hv)]

    def run(self, method: str, chunk: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if method == "forward":
            params = self.objective.params
            randomness = "same" if self.objective.mode == "train" else "error"

            def one(v: torch.Tensor) -> torch.Tensor:
                tangent = layout.unflatten(v)
                _, hv = jvp(grad(self.objective.loss), (params,), (tangent,))
                return layout.flatten(hv, batch_dims=0)

            out = torch.vmap(one, randomness=randomness)(chunk)
        elif method == "reverse":
            vs = list(layout.unflatten(chunk).values())
            out = layout.flatten(OrderedDict(zip(layout.names, self._second(vs, batched=True))), batch_dims=1)
        elif method == "loop":
            out = torch.empty_like(chunk)
            bounds = list(layout.slices().values())
            shapes = layout.shapes
            for row, v in zip(out, chunk):
                # the probe's blocks are views of its row; the product is written into the output row
                hv = self._second([v[sl].reshape(shape) for sl, shape in zip(bounds, shapes)], batched=False)
                torch.cat([h.reshape(-1) for h in hv], out=row)
        else:
            raise ValueError(f"unknown HVP method {method!r}; use one of 'auto', {', '.join(map(repr, _ORDER))}")
        return out.detach()


def hvp_flat(
    objective: Objective,
    vectors: torch.Tensor,
    *,
    method: Method = "auto",
    chunk_size: Optional[int] = None,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """``H v`` for flat vectors ``[m, n]`` (``n`` = parameter count); returns ``[m, n]``.

    ``reduce`` (optional) is applied once to the whole result, e.g. an all-reduce mean over data
    parallel ranks so that ``H`` is the Hessian of the global objective. One call per product,
    whatever the chunking (which may differ between ranks after an out-of-memory retry), and the
    finiteness check comes after it, so every rank raises on the same product.
    """
    op = HessianOperator(objective, method=method, chunk_size=chunk_size, memory_cap=memory_cap, reduce=reduce)
    return op.matmat(vectors)


def _apply(
    kernel: _Kernel,
    vectors: torch.Tensor,
    method: Method,
    chunk_size: Optional[int],
    memory_cap: int,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    objective = kernel.objective
    if vectors.dim() != 2 or vectors.shape[1] != objective.layout.numel:
        raise ValueError(
            f"vectors must have shape [num_vectors, {objective.layout.numel}], got {tuple(vectors.shape)}"
        )
    vectors = vectors.to(device=objective.device, dtype=objective.dtype)
    m = vectors.shape[0]
    if m == 0:
        return vectors.clone()
    chunk = chunk_size or default_chunk_size(objective, m, memory_cap)
    auto = method == "auto"
    if method == "auto":
        method = "loop" if m == 1 else choose_method(objective)
    results, start = [], 0
    with objective.measuring():
        while start < m:
            part = vectors[start : start + chunk]
            try:
                kernel.method_used = method
                out = kernel.run(method, part)
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an OOM we can shrink
                if is_out_of_memory(error) and chunk > 1:
                    chunk = max(1, chunk // 2)
                    warnings.warn(f"dynscope: HVP chunk ran out of memory, retrying with {chunk} probes")
                    continue
                if auto and method != "loop" and not isinstance(error, NonFiniteError):
                    # an op without a batching rule: the per-probe kernel works for every op
                    warnings.warn(f"dynscope: the {method!r} HVP kernel fails on this model ({type(error).__name__}: "
                                  f"{error}); using 'loop'")
                    method = objective._hvp_method = _CHOSEN[objective.model] = "loop"
                    continue
                raise
            results.append(out)
            start += part.shape[0]
    out = results[0] if len(results) == 1 else torch.cat(results)
    return check_finite(reduce(out) if reduce is not None else out, "a Hessian-vector product")


def choose_method(objective: Objective) -> str:
    """The batched HVP kernel ``method="auto"`` uses for ``objective``: decided by the model's
    structure and device, never by timing (the same model gets the same kernel on every run).

    ``"reverse"`` on accelerators and, on CPU, for models whose per-probe work (parameters plus
    activations) is tiny; ``"loop"`` otherwise, and for a model on which ``"reverse"`` failed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> obj = Objective(nn.Linear(3, 2), nn.functional.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
        >>> choose_method(obj)
        'reverse'
    """
    chosen = getattr(objective, "_hvp_method", None) or _CHOSEN.get(objective.model)
    if chosen is None:
        small = 3 * objective.layout.numel + 3 * activation_numel(objective) <= _SMALL_PROBE
        chosen = "reverse" if objective.device.type != "cpu" or small else "loop"
        objective._hvp_method = _CHOSEN[objective.model] = chosen
    return chosen


def block_dots(vectors: torch.Tensor, products: torch.Tensor, blocks: Sequence[slice]) -> torch.Tensor:
    """``[m, len(blocks)]`` float64: ``vectors[i, b] . products[i, b]`` per row ``i`` and block ``b``.

    One dot per row and block, so no ``[m, n]`` temporary. Half-precision inputs are summed in
    float32.

    Example:
        >>> import torch
        >>> block_dots(torch.ones(2, 3), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), [slice(0, 1), slice(1, 3)])
        tensor([[ 1.,  5.],
                [ 4., 11.]], dtype=torch.float64)
    """
    wide = _wide(products.dtype)
    out = torch.empty(len(vectors), len(blocks), dtype=wide, device=products.device)
    for i, (v, p) in enumerate(zip(vectors, products)):
        _row_dots(v.to(wide), [p[sl].to(wide) for sl in blocks], blocks, out[i])
    return out.double()


def _wide(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _row_dots(v: torch.Tensor, parts: Sequence[torch.Tensor], blocks: Sequence[slice], out: torch.Tensor) -> None:
    for j, (sl, p) in enumerate(zip(blocks, parts)):
        torch.dot(v[sl], p.reshape(-1), out=out[j])


def hvp(
    objective: Objective,
    vectors: Vectors,
    *,
    method: Method = "auto",
    chunk_size: Optional[int] = None,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> Vectors:
    """Hessian-vector products of the objective's loss for a batch of vectors.

    Args:
        objective: the loss as a function of the parameters (:class:`dynscope.Objective`).
        vectors: a dict ``{name: [m, *shape]}`` laid out like the parameters with a leading probe
            dimension, or a flat tensor ``[m, n]``. A single vector (no probe dimension) works too.
        method: ``"auto"`` (default), ``"forward"``, ``"reverse"`` or ``"loop"``; see the module
            docstring.
        chunk_size: probes per batched call; default: as many as fit in ``memory_cap`` bytes.

    Returns:
        ``H v`` in the same form as ``vectors``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective, hvp
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> obj = Objective(model, nn.functional.mse_loss, (x, y))
        >>> v = {n: torch.randn(4, *p.shape) for n, p in model.named_parameters()}
        >>> hvp(obj, v)["weight"].shape
        torch.Size([4, 1, 3])
    """
    layout = objective.layout
    if isinstance(vectors, torch.Tensor):
        single = vectors.dim() == 1
        flat = vectors.unsqueeze(0) if single else vectors
        out = hvp_flat(objective, flat, method=method, chunk_size=chunk_size, memory_cap=memory_cap)
        return out[0] if single else out
    layout.check(vectors)
    first = vectors[layout.names[0]]
    single = first.dim() == len(layout.shapes[0])
    flat = layout.flatten(vectors, batch_dims=0 if single else 1)
    flat = flat.unsqueeze(0) if single else flat
    out = hvp_flat(objective, flat, method=method, chunk_size=chunk_size, memory_cap=memory_cap)
    out = layout.unflatten(out)
    return OrderedDict((n, t[0]) for n, t in out.items()) if single else out


class HessianOperator:
    """The Hessian of an objective as a linear operator on flat vectors.

    Estimators (:func:`dynscope.hessian_trace`, :func:`dynscope.top_eigenvalues`) take any object
    with ``size``, ``dtype``, ``device``, ``matmat(V: [m, n]) -> [m, n]`` and, for per-layer
    results, ``layout``. This one counts the matvecs it performs in ``num_matvecs``.

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
        method: Method = "auto",
        chunk_size: Optional[int] = None,
        memory_cap: int = DEFAULT_MEMORY_CAP,
        reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        # ``reduce`` (e.g. an all-reduce over ranks) may have ``fail(like, error)``: join the
        # reduction as a failed rank and raise (see ``dynscope.callbacks.distributed``).
        self.objective = objective
        self.layout = objective.layout
        self.size = objective.layout.numel
        self.dtype = objective.dtype
        self.device = objective.device
        self.num_matvecs = 0
        self._kernel = _Kernel(objective)
        self._kw: Dict = dict(method=method, chunk_size=chunk_size, memory_cap=memory_cap, reduce=reduce)

    def measuring(self):
        """Hold the objective's measuring context across many matvecs (saves its set-up per call)."""
        return self.objective.measuring()

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """``H V`` for ``V`` of shape ``[m, n]``; the gradient graph is built once per operator."""
        self.num_matvecs += vectors.shape[0]
        fail = getattr(self._kw["reduce"], "fail", None)
        if fail is None:
            return _apply(self._kernel, vectors, **self._kw)
        # A reduction that shares failures (data-parallel ranks): a rank whose local products fail
        # still joins the reduction, flagged, so every rank raises instead of waiting on it.
        try:
            local = _apply(self._kernel, vectors, **dict(self._kw, reduce=None))
        except Exception as error:  # noqa: BLE001 - shared, then re-raised on every rank
            fail(vectors, error)
            raise
        return check_finite(self._kw["reduce"](local), "a Hessian-vector product")

    def quadratic_forms(self, probes, blocks: Sequence[slice]) -> torch.Tensor:
        """``[m, len(blocks)]`` float64: ``v_i[b] . (H v_i)[b]`` for each probe ``v_i`` and block ``b``.

        ``probes`` has ``num`` (``m``), ``rows(start, stop) -> [k, n]`` and ``row(i) -> [n]`` (which
        may be overwritten by the next call). The same numbers as :func:`block_dots` on
        ``matmat``'s result; with the per-probe kernel (the usual choice on CPU) each product is
        reduced to its block dots as soon as it is computed, so nothing of size ``[m, n]`` is built.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from dynscope import Objective
            >>> from dynscope.trace import RademacherProbes
            >>> obj = Objective(nn.Linear(2, 1), nn.functional.mse_loss, (torch.randn(8, 2), torch.randn(8, 1)))
            >>> op, probes = HessianOperator(obj, method="loop"), RademacherProbes(4, 3, seed=0)
            >>> blocks = list(obj.layout.slices().values())
            >>> forms = op.quadratic_forms(probes, blocks)
            >>> bool(torch.allclose(forms, block_dots(probes.rows(0, 4), op.matmat(probes.rows(0, 4)), blocks)))
            True
        """
        m = probes.num
        objective, kernel, kw = self.objective, self._kernel, self._kw
        method = kw["method"]
        if kw["reduce"] is not None or method not in ("auto", "loop") or m == 0:
            return self._dots_of_products(probes, 0, m, blocks)
        chosen = "loop" if method == "loop" or m == 1 else choose_method(objective)
        if chosen != "loop":
            return self._dots_of_products(probes, 0, m, blocks)
        self.num_matvecs += m
        layout = objective.layout
        shapes = layout.shapes
        wide = _wide(objective.dtype)
        out = torch.empty(m, len(blocks), dtype=wide, device=objective.device)
        with objective.measuring():
            kernel.method_used = "loop"
            for i in range(m):
                v = probes.row(i).to(device=objective.device, dtype=objective.dtype).contiguous()
                views = [v[sl].view(shape) for sl, shape in zip(layout.slices().values(), shapes)]
                hv = kernel._second(views, batched=False)
                # the product's blocks are dotted with the probe while they are in cache
                flat = [h.to(wide) for h in _as_blocks(hv, layout, blocks)]
                _row_dots(v.to(wide), flat, blocks, out[i])
        return check_finite(out, "a Hessian-vector product").double()

    def _dots_of_products(self, probes, start: int, stop: int, blocks: Sequence[slice]) -> torch.Tensor:
        vectors = probes.rows(start, stop).to(device=self.device, dtype=self.dtype)
        return block_dots(vectors, self.matmat(vectors), blocks)


def _as_blocks(tensors: Sequence[torch.Tensor], layout, blocks: Sequence[slice]) -> List[torch.Tensor]:
    """The flat ``blocks`` of a parameter-shaped list: views where the blocks are the tensors."""
    slices = list(layout.slices().values())
    if list(blocks) == slices:
        return [t.reshape(-1) for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return [flat[sl] for sl in blocks]


class MatrixOperator:
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

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += vectors.shape[0]
        return vectors @ self.matrix.T


class ScaledOperator:
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
        self.op = op
        self.scale = scale.to(device=op.device, dtype=op.dtype)
        self.size, self.dtype, self.device = op.size, op.dtype, op.device
        self.layout = getattr(op, "layout", None)

    @property
    def num_matvecs(self) -> int:
        return self.op.num_matvecs

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(vectors * self.scale) * self.scale


def as_operator(target, **kwargs):
    """An :class:`Objective` becomes a :class:`HessianOperator`; operators pass through."""
    if isinstance(target, Objective):
        return HessianOperator(target, **kwargs)
    if isinstance(target, torch.Tensor):
        return MatrixOperator(target)
    if not hasattr(target, "matmat"):
        raise TypeError(f"expected an Objective, a matrix or an operator with matmat(), got {type(target).__name__}")
    return target
