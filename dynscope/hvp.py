"""Batched Hessian-vector products: :func:`hvp` and the names of the HVP machinery.

The machinery lives in three short modules, re-exported here:

* :mod:`dynscope.kernels`: the kernels (``"forward"``: forward-over-reverse
  ``vmap(jvp(grad(L)))``; ``"reverse"``: reverse-over-reverse on one retained graph,
  ``is_grads_batched``; ``"loop"``: the same graph, one product per probe, works for every op) and
  the chunked, out-of-memory-safe loop that runs them.
* :mod:`dynscope.kernel_choice`: ``method="auto"`` picks the kernel from the model's structure,
  never from timings, so the same model gets the same kernel and the same numbers on every run
  (:func:`choose_method`): the per-probe ``"loop"`` on CPU, where it was as fast as or faster than
  the batched kernels on the benchmark MLPs, CNNs and transformer and needs the least memory,
  except for models whose per-probe work is so small that the per-call overhead dominates (then
  ``"reverse"``); forward-over-reverse on accelerators, where a call's launches dominate and it ran
  as fast as or faster than ``"reverse"`` on every benchmark model (H200). A batched kernel that fails on the model (an op without a batching rule) falls back to
  ``"loop"`` for that model (a deterministic, error-driven choice, remembered per model). A single
  vector always uses the retained graph. Batched calls take ``chunk_size`` probes at a time, by
  default as many as keep the call within about twice the per-probe loop's memory (at least 16
  MiB on CPU, 2 GiB on an accelerator, where launches rather than caches bound a call's time;
  where that is one probe, the loop itself) or within ``memory_cap`` bytes when given
  (:func:`kernel_plan`); a chunk that runs out of memory is halved and retried.
* :mod:`dynscope.operators`: :class:`Operator` (the base every estimator takes),
  :class:`OperatorWrapper`, :class:`HessianOperator`, :class:`MatrixOperator`,
  :class:`ScaledOperator`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Literal, Mapping, Optional, Union

import torch

from .kernel_choice import (_CHOSEN, _SMALL_PROBE, DEFAULT_MEMORY_CAP, activation_numel,  # noqa: F401
                            choose_method, default_chunk_size, kernel_plan, loop_footprint, probe_bytes)
from .kernels import (METHODS as _ORDER, HVPKernel, _as_blocks, _row_dots, _wide, block_dots,  # noqa: F401
                      is_out_of_memory, loop_quadratic_forms, run_chunked)
from .objective import Objective
from .operators import (HessianOperator, MatrixOperator, Operator, OperatorWrapper, ScaledOperator,  # noqa: F401
                        as_operator)

Method = Literal["auto", "forward", "reverse", "loop"]
Vectors = Union[torch.Tensor, Mapping[str, torch.Tensor]]
_Kernel = HVPKernel  # the name tests and earlier code patch
_apply = run_chunked


def hvp_flat(
    objective: Objective,
    vectors: torch.Tensor,
    *,
    method: Method = "auto",
    chunk_size: Optional[int] = None,
    memory_cap: Optional[int] = None,
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


def hvp(
    objective: Objective,
    vectors: Vectors,
    *,
    method: Method = "auto",
    chunk_size: Optional[int] = None,
    memory_cap: Optional[int] = None,
) -> Vectors:
    """Hessian-vector products of the objective's loss for a batch of vectors.

    Args:
        objective: the loss as a function of the parameters (:class:`dynscope.Objective`).
        vectors: a dict ``{name: [m, *shape]}`` laid out like the parameters with a leading probe
            dimension, or a flat tensor ``[m, n]``. A single vector (no probe dimension) works too.
        method: ``"auto"`` (default), ``"forward"``, ``"reverse"`` or ``"loop"``; see the module
            docstring.
        chunk_size: items (here: probes) per vectorized call; default: as many as fit in
            ``memory_cap``.
        memory_cap: bytes a batched call may use; default: twice the per-probe loop's footprint
            (at least 16 MiB on CPU, 2 GiB on an accelerator).

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
