"""Which networks are piecewise linear in every single weight: a certificate from one traced forward pass.

If the output ``z = f(x; theta)`` is piecewise linear in each scalar parameter ``theta_i`` when the
others are held fixed (ReLU networks: linear and convolution layers, ReLU, max- and average-pooling,
eval-mode BatchNorm, residual sums, each weight used once), then ``d^2 z / d theta_i^2 = 0`` almost
everywhere. The Hessian of a loss ``l(z)`` is ``J^T H_z J + sum_k (dl/dz_k) d^2 z_k / d theta^2``, and
the second term's diagonal vanishes: ``diag(H) = diag(GGN)``, so ``tr(H) = tr(GGN)`` exactly (the
off-diagonal parts still differ: eigenvalues are not the GGN's).

:func:`piecewise_linear_reason` decides it by running the forward pass once (on two samples) under a
:class:`torch.overrides.TorchFunctionMode` that follows, for every tensor, the set of parameters it
depends on. Each call must be one of:

* piecewise linear in each of its inputs (``relu``, ``max_pool2d``, ``abs``, ``maximum``, views,
  sums, concatenation, padding, average pooling, interpolation, embedding lookups, eval-mode dropout,
  comparisons);
* multilinear (``linear``, ``conv2d``, ``matmul``, ``mul``, eval-mode ``batch_norm``) in factors that
  depend on disjoint sets of parameters (``W2 @ relu(W1 x)`` is fine, ``W @ relu(W x)`` and
  ``h * h`` are not), or a division by a constant;
* anything at all whose tensor inputs depend on no parameter (preprocessing, constants).

Everything else (softmax, GELU, LayerNorm, batch-statistics BatchNorm, attention, an operation the
mode cannot see that returns a tensor requiring grad) refuses the certificate, with the operation's
name as the reason. So do a custom ``autograd.Function`` (autograd differentiates its backward, a
surrogate gradient say, not the forward seen here), an in-place write that makes a tensor with live views depend on more
parameters (the views would escape the bookkeeping), a view written in place, and a
parameter-dependent tensor turned into a Python value (``if h.sum() > 0``, ``.item()``).

The exact trace takes per-sample Jacobians, so the same two samples are also run alone: their outputs
and a vector-Jacobian product must match the batch's (``h - h.mean(0)``, a flip over the batch, a
forward that changes from call to call are refused). The check is conservative: a refusal only means
the estimate falls back to probes.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .objective import Objective

Deps = FrozenSet[str]
_NONE: Deps = frozenset()

# Piecewise linear in every tensor input jointly with any dependence: output deps = union of inputs'.
_PIECEWISE = frozenset(
    """add __add__ __radd__ __iadd__ add_ sub __sub__ __rsub__ __isub__ sub_ subtract neg __neg__ negative neg_
    sum mean nansum cumsum view view_as reshape reshape_as flatten unflatten permute transpose transpose_ t t_
    contiguous unsqueeze unsqueeze_ squeeze squeeze_ expand expand_as __getitem__ __setitem__ cat concat
    concatenate stack hstack vstack split split_with_sizes chunk unbind narrow select index_select gather
    masked_fill masked_fill_ movedim moveaxis swapaxes swapdims flip roll repeat tile clone to float double half
    bfloat16 type_as pad avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
    adaptive_avg_pool3d pixel_shuffle pixel_unshuffle channel_shuffle identity T mT interpolate upsample
    upsample_nearest upsample_bilinear
    relu relu_ relu6 leaky_relu leaky_relu_ hardtanh hardtanh_ threshold threshold_ abs abs_ absolute clamp
    clamp_ clip clip_ clamp_min clamp_max maximum minimum fmax fmin max min amax amin where
    max_pool1d max_pool2d max_pool3d _max_pool1d _max_pool2d _max_pool3d max_pool1d_with_indices
    max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    _adaptive_max_pool1d _adaptive_max_pool2d _adaptive_max_pool3d adaptive_max_pool1d_with_indices
    adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices""".split()
)
# Piecewise constant: no derivative, no dependence.
_CONSTANT = frozenset(
    """gt lt ge le eq ne __gt__ __lt__ __ge__ __le__ __eq__ __ne__ greater less greater_equal less_equal
    sign signbit argmax argmin argsort isnan isinf isfinite floor ceil round trunc detach detach_ logical_not
    logical_and logical_or __and__ __or__ __invert__ zeros_like ones_like empty_like new_zeros new_ones
    new_empty""".split()
)
_DROPOUT = frozenset("dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout".split())
# Multilinear: (positions, keywords) of the factors, of the additive terms; every other tensor must be constant.
_FACTORS: Dict[str, Tuple[Tuple[int, ...], Tuple[str, ...], Tuple[int, ...], Tuple[str, ...]]] = {}
for _name in "linear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d".split():
    _FACTORS[_name] = ((0, 1), ("input", "weight"), (2,), ("bias",))
for _name in "mul __mul__ __rmul__ __imul__ mul_ multiply matmul __matmul__ __rmatmul__ mm bmm mv dot outer ger inner vdot kron tensordot".split():
    _FACTORS[_name] = ((0, 1), ("input", "other", "mat2", "vec", "tensor"), (), ())
for _name in "addmm addmv addbmm baddbmm addr".split():
    _FACTORS[_name] = ((1, 2), ("mat1", "mat2", "vec", "batch1", "batch2", "vec1", "vec2"), (0,), ("input",))
_IN_PLACE = frozenset("__iadd__ __isub__ __imul__ __itruediv__ __setitem__".split())
_DIVIDE = frozenset("div __truediv__ __itruediv__ true_divide divide div_".split())


class _Refused(Exception):
    pass


# a parameter-dependent tensor turned into a Python value: control flow (or a constant) decided by the parameters
_TO_PYTHON = frozenset("__bool__ item tolist __int__ __float__ __index__ __iter__".split())


class _DependenceMode(TorchFunctionMode):
    """Follows which parameters each tensor depends on; raises :class:`_Refused` at the first call
    that could make the output curved in a single parameter."""

    def __init__(self, params: Dict[str, torch.Tensor], constants: Iterable[torch.Tensor]):
        super().__init__()
        self.deps: Dict[int, Deps] = {id(t): frozenset([name]) for name, t in params.items()}
        for t in constants:
            self.deps.setdefault(id(t), _NONE)
        self.alive: List[Any] = [*params.values(), *constants]  # ids stay unique while the forward runs
        self.viewed: set = set()  # ids of tensors some tracked view aliases
        self.outside = {id(t) for t in constants}  # inputs, buffers: their views may predate the forward

    def of(self, t: torch.Tensor) -> Deps:
        known = self.deps.get(id(t))
        if known is not None:
            if t.requires_grad and isinstance(t.grad_fn, BackwardCFunction):
                # autograd differentiates its backward (a surrogate gradient, a straight-through estimator),
                # not the forward this mode saw
                raise _Refused(f"a custom autograd.Function ({type(t.grad_fn).__name__}) defines its own derivative")
            return known
        if t.requires_grad:  # made by an operation this mode cannot see (a custom op, an extension)
            raise _Refused("a tensor requiring grad comes from an operation dynscope cannot follow")
        return _NONE  # a constant: a module attribute, a tensor made outside the forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property (.T, .mT, .real, .data)
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        outputs = _tensors(out)
        in_place = name.endswith("_") and not name.startswith("__") or name in _IN_PLACE
        if name in _TO_PYTHON and args and isinstance(args[0], torch.Tensor) and self.of(args[0]):
            raise _Refused(f"a parameter-dependent tensor becomes a Python value ({name}): data-dependent control flow")
        if not outputs and not in_place:  # .size(), .dim(): no tensor, nothing to follow
            return out
        deps = self._deps(name, args, kwargs)
        target = args[0] if in_place and args and isinstance(args[0], torch.Tensor) else None
        before = self.of(target) if target is not None else _NONE
        for t in outputs:
            self.deps[id(t)] = deps
            if t._base is not None:
                self.viewed.add(id(t._base))
        self.alive.append(out)
        if deps and target is not None:
            if target._base is not None:
                raise _Refused(f"an in-place {name} writes into a view")
            if not deps <= before and (id(target) in self.viewed or id(target) in self.outside):
                # its views (seen here, or made before the forward) would silently depend on more
                raise _Refused(f"an in-place {name} writes parameter-dependent values into a tensor that has views "
                               "(or an input or buffer)")
            self.deps[id(target)] = deps
        return out

    def _deps(self, name: str, args, kwargs) -> Deps:
        tensors = _tensors((args, kwargs))
        every = [self.of(t) for t in tensors]
        union = frozenset().union(*every)
        if not union or name in _CONSTANT:
            return _NONE
        if name in _PIECEWISE:
            return union
        if name in _DROPOUT:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if training and p > 0:
                raise _Refused(f"{name} in training mode draws a random mask at every evaluation")
            return union
        if name == "embedding":  # a row lookup: linear in the table, unless max_norm renormalises it in place
            max_norm = kwargs.get("max_norm", args[3] if len(args) > 3 else None)
            if max_norm is not None or self.of(args[0] if args else kwargs["input"]):
                raise _Refused("embedding with max_norm (or parameter-dependent indices)")
            return union
        if name == "batch_norm":
            return self._batch_norm(args, kwargs, union)
        if name in _DIVIDE or name == "__rtruediv__":
            denominator = args[1] if len(args) > 1 else kwargs.get("other")
            if name == "__rtruediv__":
                denominator = args[0]
            if isinstance(denominator, torch.Tensor) and self.of(denominator):
                raise _Refused(f"{name} by a tensor that depends on the parameters")
            return union
        if name == "einsum":
            return self._disjoint(name, [t for t in tensors], union)
        spec = _FACTORS.get(name)
        if spec is None:
            raise _Refused(f"{name!r} is not piecewise linear in the parameters")
        positions, keywords, additive, additive_keywords = spec
        factors = [args[i] for i in positions if i < len(args)] + [kwargs[k] for k in keywords if k in kwargs]
        terms = [args[i] for i in additive if i < len(args)] + [kwargs[k] for k in additive_keywords if k in kwargs]
        roles = {id(t) for t in factors + terms if isinstance(t, torch.Tensor)}
        if any(self.of(t) for t in tensors if id(t) not in roles):
            raise _Refused(f"{name!r} with a parameter-dependent argument dynscope does not know the role of")
        return self._disjoint(name, [t for t in factors if isinstance(t, torch.Tensor)], union)

    def _disjoint(self, name: str, factors: List[torch.Tensor], union: Deps) -> Deps:
        seen: set = set()
        for t in factors:
            d = self.of(t)
            if seen & d:
                raise _Refused(f"{name!r} multiplies two tensors that depend on the same parameter ({sorted(seen & d)[0]})")
            seen |= d
        return union

    def _batch_norm(self, args, kwargs, union: Deps) -> Deps:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training")
        given = dict(zip(names, args))
        given.update({k: v for k, v in kwargs.items() if k in names})
        if given.get("training", False) and self.of(given["input"]):
            raise _Refused("batch_norm with batch statistics normalises by parameter-dependent statistics")
        for key in ("running_mean", "running_var"):
            t = given.get(key)
            if isinstance(t, torch.Tensor) and self.of(t):
                raise _Refused("batch_norm with parameter-dependent statistics")
        return self._disjoint("batch_norm", [t for t in (given.get("input"), given.get("weight")) if isinstance(t, torch.Tensor)], union)


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[Any, Optional[str]]]" = weakref.WeakKeyDictionary()


def piecewise_linear_reason(objective: Objective) -> Optional[str]:
    """``None`` if the objective's network output is certified piecewise linear in every single
    parameter (so ``diag(H) = diag(GGN)``), otherwise why not, in a few words.

    Only objectives built from ``loss_fn`` (outputs, then loss) are traced; the answer is cached per
    model, forward function, mode, parameter set, input shapes and the model's module types.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dynscope import Objective
        >>> batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
        >>> relu_net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        >>> piecewise_linear_reason(Objective(relu_net, nn.functional.cross_entropy, batch)) is None
        True
        >>> print(piecewise_linear_reason(Objective(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)),
        ...                                         nn.functional.cross_entropy, batch)))
        'tanh' is not piecewise linear in the parameters
    """
    if objective._sample_loss_fn is not None:
        return "the objective is built from sample_loss_fn (the network output is not separate from the loss)"
    inputs = objective.batch[0]
    leaves = _tensors(inputs)
    structure = tuple(type(m) for m in objective.model.modules())  # a layer swapped since the last answer
    key = (objective.forward_fn, objective.mode, tuple(objective.params), tuple((t.shape[1:], t.dtype) for t in leaves),
           structure)
    known = _CACHE.setdefault(objective.model, {})
    if key not in known:
        known[key] = _trace(objective, inputs)
    return known[key]


class NotPiecewiseLinear(ValueError):
    """Raised by :func:`certifying` at the first operation that could make the output curved."""


@contextlib.contextmanager
def certifying(objective: Objective, inputs: Any, params: Dict[str, torch.Tensor]) -> Iterator[Callable[[Any], Any]]:
    """Certify the forward pass run inside (``objective.outputs(params, (inputs, None))``) as it runs:
    raises :class:`NotPiecewiseLinear` at the first operation that could make it curved in a parameter.
    Pass the outputs to the function it gives, inside.

    :func:`dynscope.gauss_newton.gauss_newton_trace` certifies the very forward pass it measures this way,
    on the whole batch (the cached answer of :func:`piecewise_linear_reason` is for two samples and
    a model that may have changed since).
    """
    mode = _mode(objective, inputs, params)
    try:
        with mode:
            yield lambda outputs: [mode.of(t) for t in _tensors(outputs)]  # the outputs' own grad_fn
    except _Refused as refusal:
        raise NotPiecewiseLinear(str(refusal)) from None


def _mode(objective: Objective, inputs: Any, params: Dict[str, torch.Tensor]) -> _DependenceMode:
    constants = _tensors(inputs)
    constants += list(objective._buffers.values())
    constants += list(objective.model.parameters())  # the ones not measured (param_names) are constants
    return _DependenceMode(params, constants)


def _trace(objective: Objective, inputs: Any) -> Optional[str]:
    two = tree_map(lambda t: t[:2] if isinstance(t, torch.Tensor) else t, inputs)
    params = {n: p.detach().requires_grad_(True) for n, p in objective.params.items()}
    mode = _mode(objective, two, params)
    try:
        with torch.enable_grad(), mode:
            for t in _tensors(objective.outputs(params, (two, None))):
                mode.of(t)
        return _independence_reason(objective, two, params)
    except _Refused as refusal:
        return str(refusal)
    except Exception as error:  # the forward itself failed on two samples: no certificate
        return f"the forward pass could not be traced ({type(error).__name__}: {error})"


def _tensors(out: Any) -> List[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _independence_reason(objective: Objective, two: Any, params: Dict[str, torch.Tensor]) -> Optional[str]:
    """``None`` if each sample's outputs, and their vector-Jacobian products, are the same in the batch of
    two as alone (the exact trace takes per-sample Jacobians: ``x - x.mean(0)`` or a flip over the batch
    would make them wrong), otherwise why not."""
    leaves = _tensors(two)
    if not leaves or leaves[0].dim() == 0 or leaves[0].shape[0] < 2:
        return None
    why = "the outputs of a sample depend on the other samples of the batch (or change from one forward to the next)"
    with torch.enable_grad():
        joint = _tensors(objective.outputs(params, (two, None)))
        for i in range(2):
            one = tree_map(lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) else t, two)
            alone = _tensors(objective.outputs(params, (one, None)))
            if len(alone) != len(joint) or any(j.shape[:1] != (2,) or j.numel() != 2 * a.numel() for a, j in zip(alone, joint)):
                return "the outputs have no leading batch dimension"
            mine = [j[i : i + 1].reshape(a.shape) for a, j in zip(alone, joint)]  # a squeeze() may drop B = 1
            if not all(_close(a, m) for a, m in zip(alone, mine)):
                return why
            generator = torch.Generator().manual_seed(i)
            cotangents = [torch.randn(a.shape, generator=generator, dtype=torch.float64).to(a) for a in alone]
            grads = []
            for outs in (mine, alone):
                pairs = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
                if not pairs:
                    return None if not any(o.requires_grad for o in joint) else why
                dot = sum((o * c).sum() for o, c in pairs)
                g = torch.autograd.grad(dot, list(params.values()), allow_unused=True, retain_graph=True)
                grads.append([torch.zeros_like(p) if x is None else x for p, x in zip(params.values(), g)])
            if not all(_close(a, b) for a, b in zip(*grads)):
                return why
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    # batched and one-sample kernels round differently (TF32 convolutions on GPUs: ~5e-4); mixing is O(1)
    rtol = {torch.float64: 1e-9, torch.float32: 2e-3}.get(a.dtype, 5e-2)
    a, b = a.detach().double(), b.detach().double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return False
    norm = torch.linalg.vector_norm
    return float(norm(a - b)) <= rtol * float(norm(a) + norm(b))
