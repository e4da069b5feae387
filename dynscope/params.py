"""Parameter dictionaries and their flat-vector view.

Every estimator in dynscope works on flat vectors (``[n]`` or ``[m, n]`` for ``m`` probes), while
models and users think in parameter dictionaries ``{name: tensor}``. :class:`ParamLayout` converts
between the two and knows which slice of the flat vector belongs to which tensor, which is what
per-layer results are built from.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Iterable, Mapping, Tuple

import torch

ParamDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and flat offsets of a set of parameter tensors.

    Example:
        >>> import torch
        >>> layout = ParamLayout.from_params({"w": torch.zeros(2, 3), "b": torch.zeros(2)})
        >>> layout.numel
        8
        >>> flat = torch.arange(8.0)
        >>> layout.unflatten(flat)["b"]
        tensor([6., 7.])
        >>> torch.equal(layout.flatten(layout.unflatten(flat)), flat)
        True
    """

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]

    @classmethod
    def from_params(cls, params: Mapping[str, torch.Tensor]) -> "ParamLayout":
        return cls(tuple(params), tuple(p.shape for p in params.values()))

    @cached_property
    def numels(self) -> Tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @cached_property
    def numel(self) -> int:
        return sum(self.numels)

    def slices(self) -> "OrderedDict[str, slice]":
        """The slice of the flat vector that holds each tensor."""
        out, start = OrderedDict(), 0
        for name, n in zip(self.names, self.numels):
            out[name] = slice(start, start + n)
            start += n
        return out

    def flatten(self, tensors: Mapping[str, torch.Tensor], batch_dims: int | None = None) -> torch.Tensor:
        """Concatenate a dict laid out like this layout into ``[*batch, n]``.

        ``batch_dims`` is the number of leading dimensions to keep; by default it is inferred from
        the first tensor.
        """
        self.check(tensors, batch_dims)
        first = tensors[self.names[0]]
        if batch_dims is None:
            batch_dims = first.dim() - len(self.shapes[0])
        batch = first.shape[:batch_dims]
        return torch.cat([tensors[n].reshape(*batch, -1) for n in self.names], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> ParamDict:
        """Split ``[*batch, n]`` into a dict of ``[*batch, *shape]`` views."""
        if flat.shape[-1] != self.numel:
            raise ValueError(f"expected a last dimension of {self.numel} (the parameter count), got {tuple(flat.shape)}")
        batch = flat.shape[:-1]
        return OrderedDict(
            (name, flat[..., sl].reshape(*batch, *shape))
            for (name, sl), shape in zip(self.slices().items(), self.shapes)
        )

    def check(self, tensors: Mapping[str, torch.Tensor], batch_dims: int | None = None) -> None:
        """Raise a ValueError naming the first tensor whose name or trailing shape is off."""
        missing = [n for n in self.names if n not in tensors]
        extra = [n for n in tensors if n not in self.shapes_by_name]
        if missing or extra:
            raise ValueError(f"parameter names do not match: missing {missing}, unexpected {extra}")
        for name, shape in zip(self.names, self.shapes):
            got = tensors[name].shape
            nb = len(got) - len(shape) if batch_dims is None else batch_dims
            if nb < 0 or tuple(got[nb:]) != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(got)}, expected (..., {', '.join(map(str, shape))})")

    @property
    def shapes_by_name(self) -> Dict[str, torch.Size]:
        return dict(zip(self.names, self.shapes))

    def block_sums(self, flat: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Sum ``flat[..., slice]`` per tensor: turns per-coordinate values into per-tensor ones."""
        return OrderedDict((n, flat[..., sl].sum(-1)) for n, sl in self.slices().items())


def detached_params(module: torch.nn.Module, names: Iterable[str] | None = None) -> ParamDict:
    """The trainable parameters of ``module`` as detached tensors (no copy, no grad tracking)."""
    wanted = None if names is None else set(names)
    return OrderedDict(
        (n, p.detach())
        for n, p in module.named_parameters()
        if p.requires_grad and (wanted is None or n in wanted)
    )


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Inner product of two parameter dicts (summed over all tensors)."""
    return sum((a[n].double() * b[n].double()).sum() for n in a)


def sq_norm(a: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Squared Euclidean norm of a parameter dict."""
    return dot(a, a)
