"""Linear-region density ("local complexity") of piecewise-linear networks.

Humayun, Balestriero and Baraniuk (2024), "Deep networks always grok and here is why": around an
input ``x`` take ``P`` orthonormal input directions ``v_k`` and the ``2P`` vertices ``x +- r v_k``
of a cross-polytope. A neuron counts at ``x`` when the neighbourhood straddles one of the kinks
of its activation, i.e. when its pre-activation lies above the kink at some vertex and below it
at another. The local complexity ``LC(x)`` is the number of such neurons summed over the layers:
the density of linear-region boundaries near ``x``. During grokking LC at the training points
falls, rises and falls again ("region migration").

All vertices of a chunk of points go through the model in one batched forward, in eval mode
(dropout off, BatchNorm with its running statistics), under ``torch.no_grad``; the pre-activations
are read by forward pre-hooks on the activation modules (or, with ``functional=True``, by a
:class:`~torch.overrides.TorchFunctionMode` that sees ``F.relu`` and friends called inside custom
``forward`` methods). Nothing about the model changes and no hook outlives the call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .context import measurement
from .metrics import REGIONS as METRICS  # noqa: F401 - what this diagnostic logs (declared in dynscope.metrics)
from .objective import check_finite

#: Activation modules whose kinks delimit linear regions, with the pre-activation values of the kinks.
PIECEWISE_LINEAR: Tuple[type, ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Hardsigmoid)
#: Smooth activations: a network using them has no linear regions to count.
SMOOTH: Tuple[type, ...] = (
    nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
#: Vertices per batched forward when ``chunk_size`` is not given: at most this many, and no more
#: than keep the pre-activations of one forward within :data:`ACTIVATION_BYTES_PER_FORWARD`.
VERTICES_PER_FORWARD = 8192
#: A forward's pre-activations (summed over the counted layers) when ``chunk_size`` is not given.
#: Bounded for speed, not memory: on the benchmark CNN (96 KiB of pre-activations a vertex) 48
#: points took 152 ms with all their 768 vertices in one forward and 57 ms in forwards of 32-64,
#: which stay in the caches; the 85k MLP (2 KiB a vertex) is as fast at 4096 as at 8192.
ACTIVATION_BYTES_PER_FORWARD = 8 * 2**20


class NotPiecewiseLinearWarning(RuntimeWarning):
    """The model uses smooth activations: its local complexity is not defined."""


@dataclass
class LocalComplexityResult:
    """What :func:`local_complexity` measured.

    Attributes:
        total: mean over the points of the count summed over the layers.
        per_layer: layer name -> mean count (in forward order).
        fraction_per_layer: layer name -> mean count divided by the layer's number of neurons.
        per_point: ``[N]`` float64, the count summed over the layers at each point.
        per_point_layer: layer name -> ``[N]`` counts at each point.
        neurons: layer name -> neurons in the layer (every unit of the pre-activation of one
            sample: for a conv layer every (channel, position)).
        radius, num_directions: the neighbourhood.
        applicable: ``False`` when the model has smooth activations (then every value is NaN).
    """

    total: float
    per_layer: "OrderedDict[str, float]"
    fraction_per_layer: "OrderedDict[str, float]"
    per_point: torch.Tensor
    per_point_layer: "OrderedDict[str, torch.Tensor]" = field(repr=False)
    neurons: "OrderedDict[str, int]"
    radius: float
    num_directions: int
    applicable: bool = True

    @property
    def value(self) -> float:
        """``total`` (the headline value, as every result's ``.value``)."""
        return self.total


# -- the neighbourhood -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _directions_cpu(dim: int, num_directions: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, num_directions, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.contiguous()  # sign fix: a unique Q for a given Gaussian draw


def orthonormal_directions(
    dim: int, num_directions: int, seed: int = 0, *, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """``num_directions`` orthonormal directions in ``R^dim`` as rows, ``[num_directions, dim]``.

    The QR factor of a Gaussian matrix drawn from a private generator seeded with ``seed``: the
    global RNG is untouched and the same arguments always give the same directions (cached), so
    successive measurements during training use the same neighbourhood.

    Example:
        >>> v = orthonormal_directions(5, 3, seed=1)
        >>> v.shape
        torch.Size([3, 5])
        >>> torch.allclose(v @ v.T, torch.eye(3, dtype=torch.float64))
        True
        >>> torch.equal(v, orthonormal_directions(5, 3, seed=1))
        True
    """
    if dim < 1:
        raise ValueError(f"the input must have at least one feature, got dim={dim}")
    if not 1 <= num_directions <= dim:
        raise ValueError(
            f"num_directions must be between 1 and the input size {dim} (orthonormal directions), got {num_directions}"
        )
    return _directions_cpu(int(dim), int(num_directions), int(seed)).to(dtype=dtype, device=device).clone()


def cross_polytope_vertices(points: torch.Tensor, directions: torch.Tensor, radius: float) -> torch.Tensor:
    """The ``2P`` vertices ``x + r v_1 .. x + r v_P, x - r v_1 .. x - r v_P`` of every point.

    ``points`` is ``[N, *feature_shape]``, ``directions`` ``[P, prod(feature_shape)]``; returns
    ``[N * 2P, *feature_shape]`` (the vertices of point ``i`` are rows ``2P i .. 2P (i + 1) - 1``).

    Example:
        >>> cross_polytope_vertices(torch.tensor([[0.0], [5.0]]), torch.tensor([[1.0]]), 0.5).flatten().tolist()
        [0.5, -0.5, 5.5, 4.5]
    """
    flat = points.reshape(points.shape[0], 1, -1)
    offsets = radius * directions.to(dtype=points.dtype, device=points.device)
    vertices = torch.cat([flat + offsets, flat - offsets], dim=1)
    return vertices.reshape(-1, *points.shape[1:])


def random_points_in_box(points: torch.Tensor, num_points: int, seed: int = 0) -> torch.Tensor:
    """``num_points`` points uniform in the per-feature bounding box of ``points`` (private seeded RNG).

    Example:
        >>> box = torch.tensor([[0.0, 10.0], [1.0, 20.0]])
        >>> r = random_points_in_box(box, 100, seed=3)
        >>> r.shape, bool((r[:, 0] >= 0).all() and (r[:, 0] <= 1).all() and (r[:, 1] >= 10).all())
        (torch.Size([100, 2]), True)
    """
    if points.shape[0] == 0:
        raise ValueError("random_points_in_box needs at least one point to span the box")
    low, high = points.amin(0), points.amax(0)
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand((num_points, *points.shape[1:]), generator=generator, dtype=torch.float64)
    return (low.double().cpu() + u * (high - low).double().cpu()).to(dtype=points.dtype, device=points.device)


# -- reading the pre-activations -------------------------------------------------------------------
def _module_kinks(module: nn.Module) -> Tuple[float, ...]:
    if isinstance(module, nn.Hardtanh):  # also ReLU6
        return (float(module.min_val), float(module.max_val))
    if isinstance(module, nn.Hardsigmoid):
        return (-3.0, 3.0)
    return (0.0,)


def _arg(args, kwargs, index: int, name: str, default: float) -> float:
    if len(args) > index:
        return float(args[index])
    return float(kwargs.get(name, default))


_ZERO = lambda args, kwargs: (0.0,)  # noqa: E731
_FUNCTIONAL_KINKS: Dict[Callable, Callable] = {
    F.relu: _ZERO, F.relu_: _ZERO, torch.relu: _ZERO, torch.relu_: _ZERO,
    torch.Tensor.relu: _ZERO, torch.Tensor.relu_: _ZERO,
    F.leaky_relu: _ZERO, F.leaky_relu_: _ZERO, F.prelu: _ZERO, torch.prelu: _ZERO,
    F.relu6: lambda args, kwargs: (0.0, 6.0),
    F.hardtanh: lambda a, k: (_arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)),
    F.hardtanh_: lambda a, k: (_arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)),
    F.hardsigmoid: lambda args, kwargs: (-3.0, 3.0),
}
_FUNCTIONAL_SMOOTH = {
    F.gelu, F.silu, F.elu, F.selu, F.celu, F.softplus, F.mish, F.hardswish, F.softsign, F.tanhshrink,
    F.logsigmoid, F.sigmoid, F.tanh, torch.tanh, torch.sigmoid, torch.Tensor.tanh, torch.Tensor.sigmoid,
}


class _Counter:
    """Accumulates, per layer, how many neurons change side of a kink among each point's vertices."""

    def __init__(self, group: int, layers: Optional[Sequence[str]]):
        self.group = group
        self.layers = None if layers is None else set(layers)
        self.seen: "OrderedDict[str, None]" = OrderedDict()
        self.counts: "OrderedDict[str, List[torch.Tensor]]" = OrderedDict()
        self.neurons: "OrderedDict[str, int]" = OrderedDict()
        self.smooth: "OrderedDict[str, str]" = OrderedDict()  # layer name -> activation
        self.num_points = 0
        self._calls: Counter = Counter()

    def start_chunk(self, num_points: int) -> None:
        self.num_points = num_points
        self._calls.clear()

    def record(self, name: str, pre: torch.Tensor, kinks: Sequence[float]) -> None:
        self._calls[name] += 1
        if self._calls[name] > 1:  # one module or function applied several times in a forward
            name = f"{name}@{self._calls[name]}"
        self.seen[name] = None
        if self.layers is not None and name not in self.layers:
            return
        rows = self.num_points * self.group
        if pre.dim() == 0 or pre.shape[0] % rows:
            raise ValueError(
                f"the pre-activation of {name!r} has shape {tuple(pre.shape)}, whose leading dimension is not a "
                f"multiple of the {rows} vertices sent through the model; local_complexity needs a batch-major model"
            )
        values = pre.detach().reshape(self.num_points, self.group, -1)
        check_finite(values, f"the pre-activation of {name!r}")  # NaN compares False: it would count as 0
        low, high = values.amin(1), values.amax(1)  # (5x faster than torch.aminmax over a middle dimension on CPU)
        crossed = torch.zeros_like(low, dtype=torch.bool)
        for kink in kinks:
            crossed |= (low < kink) & (high > kink)
        self.neurons[name] = values.shape[-1]
        self.counts.setdefault(name, []).append(crossed.sum(1).cpu())


class _FunctionalCapture(TorchFunctionMode):
    """Sees activation functions called anywhere in the forward, named after the enclosing module."""

    def __init__(self, counter: _Counter, stack: List[Tuple[str, nn.Module]]):
        super().__init__()
        self.counter = counter
        self.stack = stack

    def _name(self, func) -> str:
        name, module = self.stack[-1] if self.stack else ("", None)
        if isinstance(module, PIECEWISE_LINEAR + SMOOTH) and name:
            return name
        short = getattr(func, "__name__", "activation").rstrip("_")
        return f"{name}.{short}" if name else short

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinks = _FUNCTIONAL_KINKS.get(func)
        if kinks is not None and args and isinstance(args[0], torch.Tensor):
            self.counter.record(self._name(func), args[0], kinks(args, kwargs))
        elif func in _FUNCTIONAL_SMOOTH:
            self.counter.smooth[self._name(func)] = getattr(func, "__name__", "activation")
        return func(*args, **kwargs)


def _install_hooks(model: nn.Module, counter: _Counter, functional: bool) -> Tuple[list, Optional[_FunctionalCapture]]:
    handles = []
    if functional:
        stack: List[Tuple[str, nn.Module]] = []

        def push(name):
            return lambda module, inputs: stack.append((name, module))

        def pop(module, inputs, output):
            if stack:
                stack.pop()

        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(push(name)))
            handles.append(module.register_forward_hook(pop, always_call=True))
        return handles, _FunctionalCapture(counter, stack)

    def capture(name, kinks):
        def hook(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                counter.record(name, inputs[0], kinks)  # read before an in-place activation overwrites it

        return hook

    for name, module in model.named_modules():
        if isinstance(module, PIECEWISE_LINEAR):
            handles.append(module.register_forward_pre_hook(capture(name or type(module).__name__, _module_kinks(module))))
        elif isinstance(module, SMOOTH):
            counter.smooth[name or type(module).__name__] = type(module).__name__
    return handles, None


@contextlib.contextmanager
def _measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, forked RNGs; the modules' training flags come back afterwards."""
    with measurement(model, "eval"):
        yield


_warned_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

_NO_ACTIVATION = (
    "found no piecewise-linear activation in {model}: local complexity counts the neurons of ReLU, LeakyReLU, "
    "PReLU, ReLU6, Hardtanh or Hardsigmoid modules; if the model calls F.relu (or torch.relu, x.relu(), ...) "
    "inside its forward, pass functional=True"
)


def _input_device_dtype(model: nn.Module, points: torch.Tensor) -> Tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return points.device, points.dtype


def local_complexity(
    model: nn.Module,
    points: torch.Tensor,
    radius: float,
    num_directions: int,
    seed: int = 0,
    layers: Optional[Sequence[str]] = None,
    chunk_size: Optional[int] = None,
    *,
    functional: bool = False,
    forward_fn: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
) -> LocalComplexityResult:
    """Local complexity (linear-region density) of ``model`` around each of ``points``.

    Humayun, Balestriero, Baraniuk (2024), "Deep networks always grok and here is why". For each
    point ``x`` the neighbourhood is the cross-polytope with the ``2P`` vertices ``x +- r v_k``
    (``P = num_directions`` orthonormal directions in the flattened input space, from
    :func:`orthonormal_directions` with ``seed``: fixed, so that measurements during training are
    comparable). A neuron counts at ``x`` when its pre-activation is strictly above a kink of its
    activation (0 for ReLU, LeakyReLU, PReLU; 0 and 6 for ReLU6; ``min_val`` and ``max_val`` for
    Hardtanh; -3 and 3 for Hardsigmoid) at one vertex and strictly below it at another; a vertex
    exactly on the kink sides with neither, so a neuron counts only if its hyperplane cuts the
    neighbourhood's interior. A neuron is counted once even if it crosses two kinks.

    For the first layer the pre-activations are affine in the input, so the vertices decide
    exactly whether the hyperplane meets the cross-polytope; for deeper layers (piecewise-linear
    in the input) the vertex test is the paper's approximation. Every element of a layer's
    pre-activation of one sample is a neuron (conv layers: every (channel, position)). Only
    activation kinks count: max-pooling boundaries do not. With ``num_directions`` equal to the
    input size the neighbourhood is the full-dimensional cross-polytope.

    The model runs in eval mode (dropout off, BatchNorm with its running statistics) under
    ``torch.no_grad`` with forked RNGs; its training flags are restored and the hooks removed
    afterwards, also when the forward raises.

    Args:
        model: the network; points are moved to its parameters' device and floating dtype.
        points: ``[N, *feature_shape]`` floating-point inputs.
        radius: ``r > 0``, in input units (small compared to the distance between data points).
        num_directions: ``P``, between 1 and the number of input features.
        seed: seed of the directions.
        layers: restrict to these layer names (module names as in ``model.named_modules()``; a
            module applied ``k > 1`` times in one forward gives ``name@2 .. name@k``).
        chunk_size: items (here: points, each bringing ``2P`` vertices) per vectorized call (one
            batched forward); default: as many as keep a forward's pre-activations within
            :data:`ACTIVATION_BYTES_PER_FORWARD` and its vertices within :data:`VERTICES_PER_FORWARD`
            (from the model's structure: the first call on a model runs one point alone to see them).
        functional: also count activation functions called inside ``forward`` methods
            (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.leaky_relu``, ``F.hardtanh``,
            ``F.relu6``, ``F.prelu``, ``F.hardsigmoid``), seen through a
            :class:`~torch.overrides.TorchFunctionMode`. Such a call is named
            ``<enclosing module>.<function>`` (e.g. ``block.relu``, or ``relu`` in the top-level
            ``forward``); calls made by activation modules keep the module's name.
        forward_fn: ``forward_fn(model, inputs)`` when ``model(inputs)`` is not the call.

    Returns:
        a :class:`LocalComplexityResult`. A model with smooth activations (GELU, SiLU, tanh, ...)
        has no linear regions: a :class:`NotPiecewiseLinearWarning` is issued once per model and
        the result has ``applicable=False`` and NaN values.

    Raises:
        ValueError: no recognised activation, integer or empty points, bad radius or directions,
            unknown layer names.

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> lc = local_complexity(net, torch.randn(32, 2), radius=0.1, num_directions=2)
        >>> list(lc.per_layer), lc.per_point.shape
        (['1', '3'], torch.Size([32]))
        >>> abs(lc.total - sum(lc.per_layer.values())) < 1e-9
        True
        >>> all(0 <= f <= 1 for f in lc.fraction_per_layer.values())
        True
    """
    if not isinstance(points, torch.Tensor) or points.dim() < 2:
        raise ValueError("points must be a tensor [N, *feature_shape] with a leading batch dimension")
    if points.shape[0] == 0:
        raise ValueError("points is empty")
    if not points.is_floating_point():
        raise ValueError(
            f"local complexity needs continuous inputs, got points of dtype {points.dtype} (for token models, "
            "measure on the embeddings with forward_fn)"
        )
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dim = points[0].numel()
    device, dtype = _input_device_dtype(model, points)
    directions = orthonormal_directions(dim, num_directions, seed, dtype=dtype, device=device)
    group = 2 * num_directions
    # (None: sized from the first point's pre-activations, remembered for the model's later calls)
    sizing = (group, tuple(points.shape[1:]), dtype, functional, None if layers is None else tuple(layers),
              ACTIVATION_BYTES_PER_FORWARD, VERTICES_PER_FORWARD)
    chunk = chunk_size or _POINTS_PER_FORWARD.get(model, {}).get(sizing)
    forward = forward_fn or (lambda m, x: m(x))
    if not functional and not any(isinstance(m, PIECEWISE_LINEAR + SMOOTH) for m in model.modules()):
        raise ValueError(_NO_ACTIVATION.format(model=type(model).__name__))

    counter = _Counter(group, layers)
    handles: list = []
    try:
        with _measuring(model):
            handles, mode = _install_hooks(model, counter, functional)
            with mode if mode is not None else contextlib.nullcontext():
                start = 0
                while start < points.shape[0]:
                    block = points[start:start + (chunk or 1)].to(device=device, dtype=dtype)
                    counter.start_chunk(block.shape[0])
                    forward(model, cross_polytope_vertices(block, directions, float(radius)))
                    if start == 0:
                        _check_first_chunk(model, counter, layers)
                        if not chunk:
                            chunk = _points_per_forward(counter, group, dtype)
                            _POINTS_PER_FORWARD.setdefault(model, {})[sizing] = chunk
                    start += block.shape[0]
    finally:
        for handle in handles:
            handle.remove()

    return _result(model, counter, points.shape[0], float(radius), num_directions)


#: Points per forward by model (and vertices per point, input shape, dtype, activations counted):
#: its structure's, found once (from the first point's pre-activations, a forward of its own) and
#: kept for its later calls.
_POINTS_PER_FORWARD: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, int]]" = weakref.WeakKeyDictionary()


def _points_per_forward(counter: _Counter, group: int, dtype: torch.dtype) -> int:
    """Points per forward: :data:`VERTICES_PER_FORWARD` vertices, fewer where their pre-activations
    (what the first forward recorded) would exceed :data:`ACTIVATION_BYTES_PER_FORWARD`."""
    per_vertex = sum(counter.neurons.values()) * torch.finfo(dtype).bits // 8
    by_memory = ACTIVATION_BYTES_PER_FORWARD // (group * per_vertex) if per_vertex else VERTICES_PER_FORWARD
    return int(max(1, min(VERTICES_PER_FORWARD // group, by_memory)))


def _check_first_chunk(model: nn.Module, counter: _Counter, layers: Optional[Sequence[str]]) -> None:
    if not counter.seen and not counter.smooth:
        raise ValueError(_NO_ACTIVATION.format(model=type(model).__name__))
    if layers is not None:
        unknown = [name for name in layers if name not in counter.seen]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; the model's piecewise-linear layers are {list(counter.seen)}")


def _result(model, counter: _Counter, num_points: int, radius: float, num_directions: int) -> LocalComplexityResult:
    per_point_layer: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, parts in counter.counts.items():
        values = torch.cat(parts).double()
        if values.shape[0] != num_points:
            raise ValueError(f"layer {name!r} ran on {values.shape[0]} of {num_points} points (data-dependent forward?)")
        per_point_layer[name] = values
    applicable = not counter.smooth and bool(per_point_layer)
    if not applicable:
        if model not in _warned_models:
            _warned_models.add(model)
            warnings.warn(
                f"{type(model).__name__} uses smooth activations ({', '.join(f'{kind} at {name!r}' for name, kind in counter.smooth.items())}): it has no linear "
                "regions, so local complexity is not applicable and is reported as NaN",
                NotPiecewiseLinearWarning,
                stacklevel=3,
            )
        per_point_layer = OrderedDict((n, torch.full_like(v, math.nan)) for n, v in per_point_layer.items())
    per_point = sum(per_point_layer.values(), torch.zeros(num_points, dtype=torch.float64))
    if not applicable:
        per_point = torch.full((num_points,), math.nan, dtype=torch.float64)
    per_layer = OrderedDict((n, float(v.mean())) for n, v in per_point_layer.items())
    return LocalComplexityResult(
        total=float(per_point.mean()),
        per_layer=per_layer,
        fraction_per_layer=OrderedDict((n, per_layer[n] / counter.neurons[n]) for n in per_layer),
        per_point=per_point,
        per_point_layer=per_point_layer,
        neurons=OrderedDict((n, counter.neurons[n]) for n in per_layer),
        radius=radius,
        num_directions=num_directions,
        applicable=applicable,
    )
