"""Which HVP kernel runs, and how many probes go into one batched call.

Both are decided from the model's structure and device, never from timings, so the same model
gets the same kernel, the same chunks and the same numbers on every run.
"""

from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten

from .objective import Objective

#: The memory cap of the per-sample kernels (bytes). The HVP kernels' default is relative to the
#: per-probe loop's footprint instead (:func:`loop_footprint`).
DEFAULT_MEMORY_CAP = 2 * 1024**3
# On CPU the batched kernel wins only where the per-probe work is tiny: 0.15-0.7x the loop's time for
# 4-32 probes of a 2k-parameter MLP at batch 16-512 (11k-121k values per probe, counting 3
# parameter- and 3 activation-sized tensors), but 1.3-1.4x on the 85k MLP already at 16 samples (305k
# values) and 1.2-1.5x on the CNNs and the transformer. The boundary sits between the two.
_SMALL_PROBE = 200_000
# Without a cap a batched call's probes may use the per-probe loop's footprint, and at least this
# many bytes: on small models the loop's footprint is a few probes, too few to amortise a call. On
# CPU larger chunks are slower, not faster (the 2k MLP at batch 512: 16 probes, ~13 MiB, took 0.8x
# the time of 32 probes in one call): the chunk's working set should stay within the caches.
_MIN_CAP = 16 * 2**20
# On an accelerator the time goes to launching kernels, not to memory traffic: a 32-probe trace on
# an H200 ran 4.7-9x faster with the 32 probes in one call than in one-probe chunks (the CNN and
# the transformer, where the CPU rule above gives one probe per call). There a batched call may use
# up to the per-sample kernels' cap.
_MIN_CAP_ACCELERATOR = DEFAULT_MEMORY_CAP
_ACTIVATIONS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_CHOSEN: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def activation_numel(objective: Objective) -> int:
    """Number of activation values one forward pass produces (cached per model and batch shapes)."""
    cached = getattr(objective, "_activation_numel", None)
    if cached is not None:
        return cached
    leaves = tree_flatten(objective.batch)[0]
    key = (objective.mode, tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t) for t in leaves))
    known = _ACTIVATIONS.setdefault(objective.model, {})
    if key not in known:
        total = 0

        def count(_module, _inputs, output):
            nonlocal total
            if isinstance(output, torch.Tensor):
                total += output.numel()

        handles = [m.register_forward_hook(count) for m in objective.model.modules() if not list(m.children())]
        try:
            with objective.measuring(), torch.no_grad():
                objective.loss(objective.params)
        finally:
            for h in handles:
                h.remove()
        known.clear()  # one entry per model: the batch shape rarely changes
        known[key] = max(total, 1)
    objective._activation_numel = known[key]
    return objective._activation_numel


def probe_bytes(objective: Objective) -> int:
    """Working memory of one probe in a batched call: a gradient, a tangent and an HVP (three
    parameter-sized tensors) plus the backward's activation-sized temporaries (about three)."""
    itemsize = torch.finfo(objective.dtype).bits // 8
    return itemsize * (3 * objective.layout.numel + 3 * activation_numel(objective))


def loop_footprint(objective: Objective) -> int:
    """Bytes the per-probe loop needs: the retained gradient graph (the forward's activations and
    their gradients, about two activation-sized tensors, plus the parameter-sized gradient) and one
    probe's working memory."""
    itemsize = torch.finfo(objective.dtype).bits // 8
    graph = itemsize * (objective.layout.numel + 2 * activation_numel(objective))
    return graph + probe_bytes(objective)


def default_chunk_size(objective: Objective, num_vectors: int, memory_cap: Optional[int] = None) -> int:
    """Probes per batched call (the HVP kernels' ``chunk_size``).

    With ``memory_cap`` (bytes) the chunk's working memory stays under it. Without, the chunk's
    working memory stays under the per-probe loop's whole footprint (:func:`loop_footprint`: the
    retained graph plus one probe), so that a batched call needs at most about twice the loop's
    memory, or under 16 MiB where that is more (a few probes would not amortise a call); on an
    accelerator under 2 GiB where that is more (there each call's kernel launches, not the caches,
    bound the time; pass ``memory_cap`` to hold a batched call to less).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> obj = Objective(nn.Linear(3, 2), nn.functional.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
        >>> default_chunk_size(obj, 100), default_chunk_size(obj, 100, memory_cap=2 * probe_bytes(obj))
        (100, 2)
    """
    per_probe = max(probe_bytes(objective), 1)
    least = _MIN_CAP if objective.device.type == "cpu" else _MIN_CAP_ACCELERATOR
    cap = max(loop_footprint(objective), least) if memory_cap is None else memory_cap
    return int(max(1, min(num_vectors, cap // per_probe)))


def kernel_plan(objective: Objective, num_vectors: int, method: str = "auto", chunk_size: Optional[int] = None,
                memory_cap: Optional[int] = None) -> Tuple[str, int]:
    """``(kernel, probes per call)`` for ``num_vectors`` products.

    ``method="auto"`` takes :func:`choose_method`'s kernel, and the per-probe loop where a batched
    call would hold a single probe (one vector, or a default chunk of one: the loop then needs less
    memory for the same work). The loop's chunks only slice the output: all probes in one.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> obj = Objective(nn.Linear(3, 2), nn.functional.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
        >>> kernel_plan(obj, 8), kernel_plan(obj, 1), kernel_plan(obj, 8, "reverse", memory_cap=1)
        (('reverse', 8), ('loop', 1), ('reverse', 1))
    """
    m = max(num_vectors, 1)
    auto = method == "auto"
    if auto:
        method = "loop" if m == 1 else choose_method(objective)
    if chunk_size is not None:
        return method, chunk_size
    if method == "loop":
        return method, m
    chunk = default_chunk_size(objective, m, memory_cap)
    return ("loop", m) if auto and chunk == 1 else (method, chunk)


def choose_method(objective: Objective) -> str:
    """The batched HVP kernel ``method="auto"`` uses for ``objective``: decided by the model's
    structure and device, never by timing (the same model gets the same kernel on every run).

    On CPU ``"reverse"`` for models whose per-probe work (parameters plus activations) is tiny,
    ``"loop"`` otherwise; on accelerators ``"forward"`` (on an H200, with 32 probes per call, as fast
    as ``"reverse"`` on the benchmark MLPs and 1.3-1.45x faster on the CNN and the transformer);
    ``"loop"`` for a model on which the batched kernel failed.

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
        if objective.device.type != "cpu":
            chosen = "forward"
        else:  # (counting the activations takes a forward pass: only where the size decides)
            small = 3 * objective.layout.numel + 3 * activation_numel(objective) <= _SMALL_PROBE
            chosen = "reverse" if small else "loop"
        remember(objective, chosen)
    return chosen


def remember(objective: Objective, method: str) -> None:
    """Use ``method`` for this objective's model from now on (e.g. ``"loop"`` after a batched
    kernel failed on it: a deterministic, error-driven choice)."""
    objective._hvp_method = _CHOSEN[objective.model] = method
