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

__all__ = ["OrthoGrad", "orthogonalize_"]


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


class OrthoGrad(Optimizer):
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
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"OrthoGrad wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # No Optimizer.__init__: groups and state belong to the wrapped optimizer. The hook
        # registries exist so that Optimizer's own methods keep working on the wrapper.
        self.optimizer = optimizer
        for name in (
            "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
        ):
            self.__dict__[name] = {}

    # -- the wrapped optimizer's data ----------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    # -- plumbing ---------------------------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"OrthoGrad({self.optimizer!r})"
