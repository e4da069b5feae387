"""The Hessian-vector-product kernels and the chunked, out-of-memory-safe loop that runs them.

Three kernels compute ``H v`` for a chunk of flat vectors ``[k, n]``:

* ``"forward"``: forward-over-reverse, ``vmap(v -> jvp(grad(L), theta, v))``. One traced program for
  all probes, no retained graph.
* ``"reverse"``: reverse-over-reverse on one retained graph, ``autograd.grad(grad(L), theta, V,
  is_grads_batched=True)``. The gradient graph is built once and reused for every chunk.
* ``"loop"``: the same retained graph, one ``autograd.grad`` per probe. Works for every op.

The retained graph is built with :func:`dynscope.second_order.cheap_second_order`: GELU,
LayerNorm, softmax and attention then differentiate twice at a fraction of torch's per-probe cost.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence

import torch
from torch.func import grad, jvp
from torch.utils._pytree import tree_flatten, tree_unflatten

from .kernel_choice import kernel_plan, remember
from .objective import NonFiniteError, Objective, check_finite
from .second_order import cheap_second_order

METHODS = ("forward", "reverse", "loop")
# models on which no second-order rule applied: their gradient graph is built without the mode
_NO_RULES: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def is_out_of_memory(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(error, oom_type):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class HVPKernel:
    """HVP of one objective at its current parameters, for chunks of flat vectors ``[k, n]``."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.layout = objective.layout
        self._graph = None  # (params, grads, used indices) for the reverse and loop kernels
        self.method_used: Optional[str] = None

    def _retained_graph(self):
        if self._graph is None:
            params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in self.objective.params.items())
            model = self.objective.model
            try:
                if model in _NO_RULES:  # the mode's per-op dispatch costs more than a small model's forward
                    grads = self._gradient_graph(params)
                else:
                    with cheap_second_order() as mode:  # GELU, LayerNorm, attention: cheap per-probe double backward
                        grads = self._gradient_graph(params)
                    if not mode.used:
                        _NO_RULES.add(model)
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

    def gradient(self) -> Optional["OrderedDict[str, torch.Tensor]"]:
        """The objective's gradient as the products' retained graph holds it (None before the first product)."""
        if self._graph is None:
            return None
        params, grads, _ = self._graph
        return OrderedDict((n, torch.zeros_like(p) if g is None else g.detach())
                           for n, p, g in zip(self.objective.params, params, grads))

    def _gradient_graph(self, params: "OrderedDict[str, torch.Tensor]"):
        loss = check_finite(self.objective.loss(params), "the loss")
        return torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)

    def second(self, vs: List[torch.Tensor], batched: bool) -> List[torch.Tensor]:
        """``H v`` on the retained graph for parameter-shaped blocks ``vs`` (batched: leading probe dim)."""
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

    _second = second

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        objective, layout = self.objective, self.layout
        # The batch's float tensors beyond the inputs (targets) get a materialised zero tangent:
        # without one, F.mse_loss's forward derivative of its backward writes into torch's
        # immutable ZeroTensor ("ZeroTensors are immutable", torch 2.13).
        leaves, spec = tree_flatten(objective.batch)
        batch = objective.batch
        skip = len(tree_flatten(batch[0])[0]) if isinstance(batch, (tuple, list)) and len(batch) > 1 else 0
        index = [i for i, t in enumerate(leaves) if i >= skip and isinstance(t, torch.Tensor) and t.is_floating_point()]
        extra = tuple(leaves[i] for i in index)
        zeros = tuple(torch.zeros_like(t) for t in extra)

        def loss(params, targets):
            full = list(leaves)
            for i, t in zip(index, targets):
                full[i] = t
            return objective.loss(params, tree_unflatten(full, spec))

        def one(v: torch.Tensor) -> torch.Tensor:
            _, hv = jvp(grad(loss), (objective.params, extra), (layout.unflatten(v), zeros))
            return layout.flatten(hv, batch_dims=0)

        return torch.vmap(one, randomness="same" if objective.mode == "train" else "error")(chunk)

    def run(self, method: str, chunk: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if method == "forward":
            out = self._forward(chunk)
        elif method == "reverse":
            vs = list(layout.unflatten(chunk).values())
            out = layout.flatten(OrderedDict(zip(layout.names, self.second(vs, batched=True))), batch_dims=1)
        elif method == "loop":
            out = torch.empty_like(chunk)
            bounds = list(layout.slices().values())
            shapes = layout.shapes
            for row, v in zip(out, chunk):
                # the probe's blocks are views of its row; the product is written into the output row
                hv = self.second([v[sl].reshape(shape) for sl, shape in zip(bounds, shapes)], batched=False)
                torch.cat([h.reshape(-1) for h in hv], out=row)
        else:
            raise ValueError(f"unknown HVP method {method!r}; use one of 'auto', {', '.join(map(repr, METHODS))}")
        return out.detach()


def run_chunked(
    kernel: HVPKernel,
    vectors: torch.Tensor,
    method: str,
    chunk_size: Optional[int],
    memory_cap: Optional[int],
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> torch.Tensor:
    """``H V`` for ``V: [m, n]`` in chunks of ``chunk_size`` probes (kernel and default chunks:
    :func:`dynscope.kernel_choice.kernel_plan`).

    A chunk that runs out of memory is halved and retried; under ``method="auto"`` a batched kernel
    that fails on the model falls back to ``"loop"`` (remembered for the model). ``reduce`` is
    applied once to the whole result, then the finiteness check.
    """
    objective = kernel.objective
    if vectors.dim() != 2 or vectors.shape[1] != objective.layout.numel:
        raise ValueError(
            f"vectors must have shape [num_vectors, {objective.layout.numel}], got {tuple(vectors.shape)}"
        )
    vectors = vectors.to(device=objective.device, dtype=objective.dtype)
    m = vectors.shape[0]
    if m == 0:
        return vectors.clone()
    auto = method == "auto"
    method, chunk = kernel_plan(objective, m, method, chunk_size, memory_cap)
    results, start = [], 0
    with objective.measuring():
        while start < m:
            part = vectors[start : start + chunk]
            try:
                kernel.method_used = method
                out = kernel.run(method, part)
            except Exception as error:  # noqa: BLE001 - re-raised unless it is an OOM we can shrink
                if is_out_of_memory(error) and chunk > 1:
                    chunk = max(1, min(chunk, part.shape[0]) // 2)
                    warnings.warn(f"dynscope: HVP chunk ran out of memory, retrying with {chunk} probes")
                    continue
                if auto and method != "loop" and not isinstance(error, NonFiniteError):
                    # an op without a batching rule: the per-probe kernel works for every op
                    warnings.warn(f"dynscope: the {method!r} HVP kernel fails on this model ({type(error).__name__}: "
                                  f"{error}); using 'loop'")
                    method = "loop"
                    remember(objective, method)
                    continue
                raise
            results.append(out)
            start += part.shape[0]
    out = results[0] if len(results) == 1 else torch.cat(results)
    return check_finite(reduce(out) if reduce is not None else out, "a Hessian-vector product")


def loop_quadratic_forms(kernel: HVPKernel, probes, blocks: Sequence[slice]) -> torch.Tensor:
    """``[m, len(blocks)]``: ``v_i[b] . (H v_i)[b]`` with the per-probe kernel, each product reduced
    to its block dots as soon as it is computed (nothing of size ``[m, n]``)."""
    objective = kernel.objective
    m, layout = probes.num, objective.layout
    pairs = list(zip(layout.slices().values(), layout.shapes))
    wide = _wide(objective.dtype)
    out = torch.empty(m, len(blocks), dtype=wide, device=objective.device)
    with objective.measuring():
        kernel.method_used = "loop"
        for i in range(m):
            v = probes.row(i).to(device=objective.device, dtype=objective.dtype).contiguous()
            hv = kernel.second([v[sl].view(shape) for sl, shape in pairs], batched=False)
            # the product's blocks are dotted with the probe while they are in cache
            _row_dots(v.to(wide), [h.to(wide) for h in _as_blocks(hv, layout, blocks)], blocks, out[i])
    return check_finite(out, "a Hessian-vector product").double()


def block_dots(vectors: torch.Tensor, products: torch.Tensor, blocks: Sequence[slice]) -> torch.Tensor:
    """``[m, len(blocks)]`` float64: ``vectors[i, b] . products[i, b]`` per row ``i`` and block ``b``.

    One fused dot per block over a group of rows (no ``[m, n]`` temporary: half-precision inputs
    are widened to float32 a group of rows at a time).

    Example:
        >>> import torch
        >>> block_dots(torch.ones(2, 3), torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), [slice(0, 1), slice(1, 3)])
        tensor([[ 1.,  5.],
                [ 4., 11.]], dtype=torch.float64)
    """
    wide = _wide(products.dtype)
    m = len(vectors)
    out = torch.empty(len(blocks), m, dtype=wide, device=products.device)
    rows = m if vectors.dtype == products.dtype == wide else max(1, _WIDEN_ELEMENTS // max(products.shape[1], 1))
    for start in range(0, m, rows):
        v, p = vectors[start : start + rows].to(wide), products[start : start + rows].to(wide)
        for j, sl in enumerate(blocks):
            torch.linalg.vecdot(v[:, sl], p[:, sl], dim=1, out=out[j, start : start + rows])
    return out.T.double()


_WIDEN_ELEMENTS = 2**22


def _wide(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _row_dots(v: torch.Tensor, parts: Sequence[torch.Tensor], blocks: Sequence[slice], out: torch.Tensor) -> None:
    for j, (sl, p) in enumerate(zip(blocks, parts)):
        torch.dot(v[sl], p.reshape(-1), out=out[j])


def _as_blocks(tensors: Sequence[torch.Tensor], layout, blocks: Sequence[slice]) -> List[torch.Tensor]:
    """The flat ``blocks`` of a parameter-shaped list: views where the blocks are the tensors."""
    slices = list(layout.slices().values())
    if list(blocks) == slices:
        return [t.reshape(-1) for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return [flat[sl] for sl in blocks]
