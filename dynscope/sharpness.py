"""Directional sharpness (Pan and Li 2023) and the coordinate clipping they propose.

Pan and Li, "Toward understanding why Adam converges faster than SGD for Transformers" (2023):
the loss decrease of a step ``u`` is governed by ``u^T H u``; the *directional sharpness*
``S(u) = u^T H u / ||u||^2`` of the update direction is lower for Adam than for SGD, and clipping
the largest coordinates of the update lowers it further.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Mapping, Sequence

import torch

from .objective import check_finite
from .operators import as_operator
from .params import ParamDict


def directional_sharpness(target, direction, **operator_kwargs) -> float:
    """``u^T H u / ||u||^2`` for a direction ``u`` (one HVP).

    Args:
        target: a :class:`dynscope.Objective` (its Hessian; ``operator_kwargs`` such as ``method``
            or ``reduce`` go to the :class:`dynscope.HessianOperator`), an operator (e.g. one that
            all-reduces over data-parallel ranks) or a square matrix.
        direction: a dict shaped like the parameters (it must match the operator's ``layout``:
            names and shapes) or a flat vector ``[n]``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective, directional_sharpness
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> obj = Objective(nn.Linear(2, 1, bias=False), nn.functional.mse_loss, (x, torch.zeros(2, 1)))
        >>> # H = 2 X^T X / B = diag(1, 4); along the second coordinate the sharpness is 4
        >>> round(directional_sharpness(obj, {"weight": torch.tensor([[0.0, 3.0]])}), 5)
        4.0
        >>> directional_sharpness(torch.diag(torch.tensor([1.0, 4.0])), torch.tensor([1.0, 1.0]))
        2.5
    """
    return directional_sharpnesses(target, [direction], **operator_kwargs)[0]


def directional_sharpnesses(target, directions: Sequence, **operator_kwargs) -> List[float]:
    """:func:`directional_sharpness` of several directions with one batched operator call.

    Example:
        >>> import torch
        >>> directional_sharpnesses(torch.diag(torch.tensor([1.0, 4.0])), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])])
        [1.0, 4.0]
    """
    op = as_operator(target, **operator_kwargs)
    rows = []
    for direction in directions:
        if isinstance(direction, Mapping):
            layout = getattr(op, "layout", None)
            if layout is None:
                raise ValueError("a dict direction needs an operator with a parameter layout; pass a flat vector")
            layout.check(direction, batch_dims=0)
            direction = layout.flatten(direction, batch_dims=0)
        u = direction.reshape(-1).to(device=op.device, dtype=op.dtype)
        if u.numel() != op.size:
            raise ValueError(f"the direction has {u.numel()} entries, the operator acts on {op.size}")
        if float((u.double() ** 2).sum()) == 0.0:
            raise ValueError("the direction is zero; directional sharpness is undefined")
        rows.append(check_finite(u, "the direction"))
    u = torch.stack(rows)
    hu = op.matmat(u)
    u, hu = u.double(), hu.double()
    return [float(a) / float(b) for a, b in zip((u * hu).sum(1), (u * u).sum(1))]


def clip_top_coordinates(update: Mapping[str, torch.Tensor], fraction: float, threshold: float) -> ParamDict:
    """Pan and Li's coordinate clipping: the top ``fraction`` of coordinates by magnitude are
    clipped to ``threshold`` (sign kept); the others are unchanged.

    Example:
        >>> import torch
        >>> clip_top_coordinates({"w": torch.tensor([0.1, -5.0, 0.2, 3.0])}, fraction=0.5, threshold=1.0)["w"]
        tensor([ 0.1000, -1.0000,  0.2000,  1.0000])
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = torch.cat([t.reshape(-1) for t in update.values()])
    count = int(round(fraction * flat.numel()))
    if count == 0:
        return OrderedDict((n, t.clone()) for n, t in update.items())
    cutoff = flat.abs().kthvalue(flat.numel() - count + 1).values
    out = OrderedDict()
    for name, t in update.items():
        big = t.abs() >= cutoff
        out[name] = torch.where(big, t.clamp(-threshold, threshold), t)
    return out
