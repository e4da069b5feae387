"""The side-effect-free objective: the loss of one batch as a pure function of the parameters.

Every curvature and noise metric in dynscope needs ``L(theta)`` for a fixed batch. :class:`Objective`
builds it like :func:`torch.func.functional_call`, so that measuring never touches the model: no
parameter, ``.grad``, buffer (BatchNorm running statistics) or RNG state changes, and every
module attribute holds the very same Parameter and buffer objects afterwards, also for modules
reachable under two names and tied weights.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .context import cuda_devices, measurement
from .params import ParamDict, ParamLayout

LossFn = Callable[[Any, Any], torch.Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]
SampleLossFn = Callable[[nn.Module, Any], torch.Tensor]


class NonFiniteError(ValueError):
    """A loss, gradient or Hessian-vector product that should be finite is not."""


class NotPerSampleError(ValueError):
    """The loss cannot be split into one value per sample (a batch-level loss)."""


def check_finite(value: torch.Tensor, what: str) -> torch.Tensor:
    # One reduction: a sum is finite only if every entry is (it could overflow for entries near
    # the float limit, which is then reported too, rightly so for a metric).
    if not bool(torch.isfinite(value.sum())):
        raise NonFiniteError(f"{what} is not finite ({value.flatten()[:4].tolist()}...); the metric is undefined here")
    return value


def _accepts_reduction(fn: Callable) -> bool:
    try:
        known = _REDUCTION.get(fn)
    except TypeError:  # not weakly referenceable
        return _signature_has_reduction(fn)
    if known is None:
        known = _REDUCTION[fn] = _signature_has_reduction(fn)
    return known


def _signature_has_reduction(fn: Callable) -> bool:
    try:
        return "reduction" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_REDUCTION: "weakref.WeakKeyDictionary[Callable, bool]" = weakref.WeakKeyDictionary()  # inspect.signature: ~20 us a call


def per_sample_loss_fn(loss_fn: LossFn) -> Optional[LossFn]:
    """A version of ``loss_fn`` that returns one loss per sample, or ``None`` if it is not known how.

    torch loss modules are copied with ``reduction="none"``; functions with a ``reduction``
    keyword (``F.cross_entropy``, ``F.mse_loss``, ...) get ``reduction="none"`` passed.
    """
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"
        return unreduced
    if _accepts_reduction(loss_fn):
        return lambda outputs, targets: loss_fn(outputs, targets, reduction="none")
    return None


Slot = Tuple[Dict[str, Any], str, str]  # (a module's _parameters or _buffers dict, attribute, state name)


def tensor_slots(model: nn.Module, named_modules: Optional[Sequence[Tuple[str, nn.Module]]] = None) -> List[Slot]:
    """Every place a module of ``model`` holds a parameter or buffer, with the state name it belongs to.

    A tensor reachable under several names (an aliased module ``self.head = self.body.fc``, tied
    weights such as GPT-2's ``wte``/``lm_head``, a shared submodule) has several slots and one name:
    the one ``named_parameters()``/``named_buffers()`` reports.
    """
    named = list(model.named_modules()) if named_modules is None else named_modules
    return _slots(named, tensor_names(*_named_tensors(named)))


def tensor_names(params: Sequence[Tuple[str, torch.Tensor]], buffers: Sequence[Tuple[str, torch.Tensor]]) -> Dict[int, str]:
    """``{id(tensor): name}`` from ``named_parameters()`` and ``named_buffers()`` (a parameter's name wins).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> net.add_module("alias", net[0])  # the same layer under a second name
        >>> names = tensor_names(list(net.named_parameters()), list(net.named_buffers()))
        >>> names[id(net.alias.weight)]
        '0.weight'
    """
    names = {id(t): n for n, t in buffers}
    names.update({id(t): n for n, t in params})
    return names


def _slots(named_modules: Sequence[Tuple[str, nn.Module]], names: Mapping[int, str]) -> List[Slot]:
    return [(store, attr, names[id(t)]) for _, module in named_modules for store in (module._parameters, module._buffers)
            for attr, t in store.items() if t is not None]


@contextlib.contextmanager
def swapped(slots: Sequence[Slot], state: Mapping[str, torch.Tensor], rnns: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Put ``state[name]`` into every slot of that name; put back exactly the objects that were there.

    Unlike ``torch.func.functional_call(..., tie_weights=True)`` (torch 2.x), whose restore leaves a
    plain tensor in the second slot of a tensor held twice, the restore writes each slot's own
    original object back, so identities survive aliasing and no functorch wrapper can leak.
    """
    saved = [(store, attr, store[attr]) for store, attr, name in slots if name in state]
    # nn.LSTM/GRU cache their weights in _flat_weights and refresh it when they see other tensors:
    # without a restore the swapped-in tensors (or functorch wrappers) would stay there
    caches = [(m.__dict__, {k: m.__dict__[k] for k in _RNN_CACHES if k in m.__dict__}) for m in rnns]
    try:
        for store, attr, name in slots:
            if name in state:
                store[attr] = state[name]
        yield
    finally:
        for store, attr, original in reversed(saved):
            store[attr] = original
        for attributes, cached in caches:
            attributes.update(cached)


_RNN_CACHES = ("_flat_weights", "_flat_weight_refs")


def _named_tensors(named_modules: Sequence[Tuple[str, nn.Module]]) -> Tuple[List[Tuple[str, torch.Tensor]], List[Tuple[str, torch.Tensor]]]:
    """``(named_parameters(), named_buffers())`` of the model whose ``named_modules()`` these are."""
    out: Tuple[list, list] = ([], [])
    for prefix, module in named_modules:
        dot = prefix + "." if prefix else ""
        for store, items in ((module._parameters, out[0]), (module._buffers, out[1])):
            items.extend((dot + k, t) for k, t in store.items() if t is not None)
    # the first name of a tensor reachable under several (tied weights, aliased modules), as named_* dedup
    return tuple(_first_names(items) for items in out)


def _first_names(items: List[Tuple[str, torch.Tensor]]) -> List[Tuple[str, torch.Tensor]]:
    seen = set()
    return [(n, t) for n, t in items if id(t) not in seen and not seen.add(id(t))]


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    return model(inputs)


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        leaves = [batch[0]]  # the first leaf tree_flatten would give, without the pytree walk
    else:
        leaves = [leaf for leaf in tree_flatten(batch)[0] if isinstance(leaf, torch.Tensor)]
    if not leaves:
        raise ValueError("the batch holds no tensors")
    if leaves[0].dim() == 0:
        raise ValueError("the batch's tensors need a leading batch dimension, got a scalar")
    return int(leaves[0].shape[0])


class Objective:
    """The mean loss of one batch as a pure function of the model's parameters.

    Args:
        model: the network. It is never modified: parameters are read, not written.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, a mean-reduced loss (any torch loss
            module or function, or your own callable).
        batch: ``(inputs, targets)``; ``outputs = forward_fn(model, inputs)``.
        forward_fn: how to get outputs from inputs, default ``model(inputs)``. Use it for
            inputs that are dicts or tuples, e.g. ``lambda m, x: m(**x)``.
        sample_loss_fn: the general hook for any batch structure: ``sample_loss_fn(model, batch)``
            returns one loss per sample (shape ``[B]``), or a scalar for a loss that is not a
            mean over samples (then only curvature metrics work). Replaces ``loss_fn`` and
            ``forward_fn``; the objective is the mean of the returned losses.
        mode: ``"eval"`` (default) runs the model in eval mode: dropout off, BatchNorm uses its
            running statistics, so the objective is deterministic. ``"train"`` runs it in train
            mode: BatchNorm normalises with the batch statistics (its running statistics are
            updated on a private copy only), dropout is active and draws a fresh mask per
            evaluation from a forked RNG.
        param_names: restrict the parameters to these names (default: all with
            ``requires_grad``).

    Per-sample losses come from the same functions: ``loss_fn`` with ``reduction="none"``
    where it takes one (torch losses do), otherwise from evaluating ``loss_fn`` on one sample at a
    time (vectorised with :func:`torch.vmap`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> obj = Objective(model, nn.functional.cross_entropy, batch)
        >>> obj.batch_size, obj.layout.numel
        (8, 26)
        >>> float(obj.value()) > 0
        True
        >>> obj.sample_losses().shape
        torch.Size([8])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[LossFn] = None,
        batch: Any = None,
        *,
        forward_fn: Optional[ForwardFn] = None,
        sample_loss_fn: Optional[SampleLossFn] = None,
        mode: Literal["eval", "train"] = "eval",
        param_names: Optional[Sequence[str]] = None,
    ) -> None:
        if batch is None:
            raise ValueError("Objective needs a batch")
        if loss_fn is None and sample_loss_fn is None:
            raise ValueError("Objective needs loss_fn(outputs, targets) or sample_loss_fn(model, batch)")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if sample_loss_fn is None:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    "with loss_fn the batch must be (inputs, targets); for other batch structures "
                    "pass sample_loss_fn(model, batch) -> per-sample losses"
                )
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch
        self.forward_fn = forward_fn or _default_forward
        self.mode = mode
        self.batch_size = batch_size_of(batch)
        if self.batch_size == 0:
            raise ValueError("the batch is empty")
        # one walk of the modules serves the parameters, buffers, slots and the measurement's mode switch
        # (the generic named_* walks cost more than a small model's measurement ops)
        self._named_modules = list(model.named_modules())
        params, buffers = _named_tensors(self._named_modules)
        wanted = None if param_names is None else set(param_names)
        self.params: ParamDict = OrderedDict(
            (n, p.detach()) for n, p in params if p.requires_grad and (wanted is None or n in wanted))
        if not self.params:
            raise ValueError("the model has no trainable parameters to measure")
        if param_names is not None and len(self.params) != len(set(param_names)):
            missing = sorted(set(param_names) - set(self.params))
            raise ValueError(f"unknown or frozen parameter names: {missing}")
        self.layout = ParamLayout.from_params(self.params)
        self._buffers = OrderedDict(buffers)
        self._sample_loss_fn = sample_loss_fn
        self._unreduced = None if loss_fn is None else per_sample_loss_fn(loss_fn)
        self._tensor_names = tensor_names(params, buffers)
        self._slots = _slots(self._named_modules, self._tensor_names)
        self._rnns = [m for _, m in self._named_modules if isinstance(m, nn.RNNBase)]

    # -- pure functions of the parameters ---------------------------------------------------
    def _call(self, params: Mapping[str, torch.Tensor], batch: Any) -> Any:
        state = dict(params)
        buffers = self._buffers
        if self.mode == "train":  # BatchNorm updates its running stats in place: give it copies
            buffers = OrderedDict((n, b.clone()) for n, b in buffers.items())
        state.update(buffers)
        with self.measuring(), swapped(self._slots, state, self._rnns):
            if self._sample_loss_fn is not None:
                return self._sample_loss_fn(self.model, batch)
            return self.forward_fn(self.model, batch[0])

    def outputs(self, params: Optional[Mapping[str, torch.Tensor]] = None, batch: Any = None) -> Any:
        """The model's outputs on the batch (only for ``(inputs, targets)`` objectives)."""
        if self._sample_loss_fn is not None:
            raise ValueError("outputs() is not defined for an objective built from sample_loss_fn")
        return self._call(self.params if params is None else params, self.batch if batch is None else batch)

    def loss(self, params: Mapping[str, torch.Tensor], batch: Any = None) -> torch.Tensor:
        """The scalar objective at ``params``: a pure function for torch.func transforms."""
        batch = self.batch if batch is None else batch
        if self._sample_loss_fn is not None:
            losses = self._call(params, batch)
            return losses.mean() if losses.dim() > 0 else losses
        return self.loss_fn(self._call(params, batch), batch[1])

    def sample_losses(self, params: Optional[Mapping[str, torch.Tensor]] = None, batch: Any = None) -> torch.Tensor:
        """One loss per sample, shape ``[B]``; raises :class:`NotPerSampleError` for a batch-level loss."""
        params = self.params if params is None else params
        batch = self.batch if batch is None else batch
        if self._sample_loss_fn is not None:
            losses = self._call(params, batch)
            if losses.dim() != 1 or losses.shape[0] != batch_size_of(batch):
                raise NotPerSampleError(
                    f"sample_loss_fn returned shape {tuple(losses.shape)}, expected one loss per sample "
                    f"([{batch_size_of(batch)}]); return per-sample losses (reduction='none') to enable "
                    "per-sample metrics"
                )
            return losses
        return self.losses_of(self._call(params, batch), batch[1])

    def losses_of(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The per-sample losses of given ``outputs`` (shape ``[B]``; ``loss_fn`` objectives only).

        Example:
            >>> import torch
            >>> obj = Objective(torch.nn.Linear(2, 2), torch.nn.functional.mse_loss, (torch.zeros(2, 2), torch.zeros(2, 2)))
            >>> obj.losses_of(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.zeros(2, 2)).tolist()  # per-sample means
            [5.0, 4.0]
        """
        if self._sample_loss_fn is not None:
            raise ValueError("losses_of() is not defined for an objective built from sample_loss_fn")
        if self._unreduced is not None:
            losses = self._unreduced(outputs, targets)
            if losses.dim() > 1:  # e.g. MSE keeps the feature dims: average them per sample
                losses = losses.reshape(losses.shape[0], -1).mean(1)
            return losses
        one = lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0))  # noqa: E731
        return torch.vmap(one)(outputs, targets)

    def sample_loss(self, params: Mapping[str, torch.Tensor], sample: Any) -> torch.Tensor:
        """The loss of a single sample (a batch element without its batch dimension).

        Pure and vmappable over samples: ``vmap(grad(obj.sample_loss), in_dims=(None, 0))``.
        """
        batch = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, sample)
        return self.sample_losses(params, batch)[0]

    # -- conveniences at the current parameters --------------------------------------------
    def value(self) -> torch.Tensor:
        """The loss at the current parameters; raises :class:`NonFiniteError` if not finite."""
        with self.measuring(), torch.no_grad():
            return check_finite(self.loss(self.params).detach(), "the loss")

    def gradient(self) -> ParamDict:
        """The gradient of the loss at the current parameters (does not touch ``.grad``)."""
        with self.measuring():
            params = OrderedDict((n, p.detach().requires_grad_(True)) for n, p in self.params.items())
            loss = check_finite(self.loss(params), "the loss")
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        return OrderedDict(
            (n, torch.zeros_like(p) if g is None else g) for (n, p), g in zip(self.params.items(), grads)
        )

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    def _module_list(self) -> Optional[List[nn.Module]]:
        """The modules of the walk at construction (None for an object unpickled from an older version)."""
        modules = self.__dict__.get("_modules_walked")
        if modules is None and getattr(self, "_named_modules", None) is not None:
            modules = self.__dict__["_modules_walked"] = [m for _, m in self._named_modules]
        return modules

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Run the enclosed code in the objective's mode, restoring the model's modes and all RNGs.

        Scaled-dot-product attention uses its math kernel inside (the fused ones cannot be
        differentiated twice).

        Nested use is cheap and safe.
        """
        if getattr(self, "_depth", 0):
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            # buffers are not restored: the loss swaps its own copies in (see ``swapped``)
            with measurement(self.model, self.mode, grad=True, restore_buffers=False, math_attention=True,
                             devices=cuda_devices(self.params.values()), modules=self._module_list()):
                yield
        finally:
            self._depth = 0
