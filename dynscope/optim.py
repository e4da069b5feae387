"""Orthogonal-gradient optimizer wrapper (perpGrad / "⊥Grad", Prieto et al. 2025).

Under naive loss minimisation the gradient mostly points along the weights: following it only
scales the logits up, which drives softmax collapse. :class:`OrthoGrad` removes that component
from each parameter tensor's gradient before the wrapped optimizer sees it:

    g_perp = g - (theta . g / theta . theta) theta,    g <- g_perp * ||g|| / ||g_perp||
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch.optim import Optimizer

__all__ = ["CoordinateClip", "OrthoGrad", "orthogonalize_"]


def orthogonalize_(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Replace ``grad`` in place by its component orthogonal to ``param``, rescaled to ``||grad||``.

    Dot products are taken in float64. A zero ``param`` leaves ``grad`` unchanged (every direction
    is orthogonal to it); a ``grad`` parallel to ``param`` becomes zero (nothing orthogonal is left
    to rescale).

    Example:
        >>> theta, g = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 4.0])
        >>> orthogonalize_(theta, g)
        tensor([0., 5.])
    """
    if grad.is_sparse:
        raise ValueError("OrthoGrad does not support sparse gradients")
    t, g = param.detach().double().flatten(), grad.detach().double().flatten()
    tt = t @ t
    if float(tt) == 0.0:
        return grad
    perp = g - (t @ g / tt) * t
    norm_perp = perp.norm()
    scale = g.norm() / norm_perp if float(norm_perp) > 0 else torch.zeros((), dtype=torch.float64)
    grad.copy_((perp * scale).reshape(grad.shape))
    return grad


class WrappedOptimizer(Optimizer):
    """An optimizer that delegates its groups, state and checkpoints to the optimizer it wraps.

    Subclasses change what ``step`` does (OrthoGrad, CoordinateClip); ``param_groups``, ``state``,
    ``defaults``, ``zero_grad``, ``add_param_group`` and the state dicts are the wrapped optimizer's,
    so a checkpoint of the wrapper is the wrapped optimizer's checkpoint.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # No Optimizer.__init__: groups and state belong to the wrapped optimizer. The hook
        # registries exist so that Optimizer's own methods keep working on the wrapper.
        self.optimizer = optimizer
        for name in (
            "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
        ):
            self.__dict__[name] = {}

    param_groups = property(lambda self: self.optimizer.param_groups,
                            lambda self, v: setattr(self.optimizer, "param_groups", v))
    state = property(lambda self: self.optimizer.state, lambda self, v: setattr(self.optimizer, "state", v))
    defaults = property(lambda self: self.optimizer.defaults, lambda self, v: setattr(self.optimizer, "defaults", v))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)


class OrthoGrad(WrappedOptimizer):
    """Wraps any torch optimizer: before each step, per parameter tensor, the gradient's component
    along the weights is removed and the rest rescaled to the original gradient norm.

    Args:
        optimizer: the optimizer to wrap (its param groups, state and hyper-parameters are used
            as they are; ``param_groups``, ``state`` and ``defaults`` here are the wrapped ones).

    ``step(closure)`` runs the closure first (as Lightning's automatic optimization passes one),
    then orthogonalises the ``.grad`` of every parameter in a param group whose ``"orthograd"``
    entry is not ``False`` (add ``{"params": ..., "orthograd": False}`` groups to exempt e.g.
    biases), then steps the wrapped optimizer. After the step, ``.grad`` holds the orthogonalised
    gradient. ``state_dict()`` is the wrapped optimizer's, so a checkpoint written through the
    wrapper loads into the bare optimizer and back. Decoupled weight decay (AdamW) is applied by
    the wrapped optimizer and is not orthogonalised. Reference: Prieto et al. 2025, "Grokking at
    the edge of numerical stability".

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        >>> opt = OrthoGrad(torch.optim.SGD([w], lr=0.1))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> opt.step()
        >>> w.detach()                # moved by -0.1 * [0, 5], orthogonal to the old w
        tensor([ 1.0000, -0.5000])
        >>> opt.zero_grad(); w.grad is None
        True
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if isinstance(optimizer, OrthoGrad):
            raise ValueError("this optimizer is already wrapped in OrthoGrad")
        super().__init__(optimizer)

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def orthogonalize_grads(self) -> None:
        """Orthogonalise the current ``.grad`` of every participating parameter (what ``step`` does first)."""
        for group in self.optimizer.param_groups:
            if group.get("orthograd", True) is False:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    orthogonalize_(p, p.grad)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.orthogonalize_grads()
        self.optimizer.step()
        return loss

    def __repr__(self) -> str:
        return f"OrthoGrad({self.optimizer!r})"


class CoordinateClip(WrappedOptimizer):
    """Wraps any torch optimizer and clips the largest coordinates of each update (Pan and Li 2023).

    Pan and Li ("Toward understanding why Adam converges faster than SGD for Transformers") show
    that the loss decrease of a step ``u`` is governed by its directional sharpness
    ``u^T H u / ||u||^2`` and that clipping the top ``fraction`` of the update's coordinates by
    magnitude lowers it. Each ``step`` lets the wrapped optimizer step (its state, momentum and
    second moments, is updated as usual), then rewrites the parameters to
    ``theta_t + clip(u)``, where ``u`` is the wrapped optimizer's update over all parameters
    together and ``clip`` maps the top ``fraction`` of ``|u_j|`` to ``threshold`` (sign kept;
    default threshold: the largest magnitude left unclipped). The last unclipped update is kept
    in ``last_update`` (by parameter), so that the Curvature callback can log its sharpness next
    to the clipped one's.

    Args:
        optimizer: the optimizer to wrap.
        fraction: the top fraction of coordinates to clip, in ``[0, 1]``.
        threshold: the magnitude they are clipped to (None: the ``1 - fraction`` quantile of ``|u|``).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(4))
        >>> opt = CoordinateClip(torch.optim.SGD([w], lr=1.0), fraction=0.25)
        >>> w.grad = torch.tensor([-0.1, 0.2, -4.0, 0.3])
        >>> opt.step()
        >>> w.detach()                # the largest coordinate is clipped to the next largest, 0.3
        tensor([ 0.1000, -0.2000,  0.3000, -0.3000])
    """

    def __init__(self, optimizer: Optimizer, fraction: float = 0.1, threshold: Optional[float] = None) -> None:
        super().__init__(optimizer)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"threshold must be non-negative, got {threshold}")
        self.fraction, self.threshold = float(fraction), threshold
        self.last_update: Dict[int, torch.Tensor] = {}
        self.num_steps = 0

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            before = [p.detach().clone() for p in params]
            self.optimizer.step()
            updates = [p.detach() - b for p, b in zip(params, before)]
            self.last_update = {id(p): u.clone() for p, u in zip(params, updates)}
            self.num_steps += 1
            flat = torch.cat([u.reshape(-1).abs().double() for u in updates]) if updates else torch.zeros(0)
            count = int(round(self.fraction * flat.numel()))
            if count == 0:
                return loss
            cutoff = flat.kthvalue(flat.numel() - count + 1).values
            if self.threshold is not None:
                tau = float(self.threshold)
            else:
                rest = flat[flat < cutoff]
                tau = float(rest.max()) if rest.numel() else float(cutoff)
            for p, b, u in zip(params, before, updates):
                big = u.abs().double() >= cutoff
                if bool(big.any()):
                    p.copy_(b + torch.where(big, u.clamp(-tau, tau), u))
        return loss

    def __repr__(self) -> str:
        return f"CoordinateClip({self.optimizer!r}, fraction={self.fraction}, threshold={self.threshold})"
