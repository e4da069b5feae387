"""Ready-made long-horizon metrics for gradient variance amplification.

Both take the model first, so ``functools.partial`` turns them into the ``metric(module) -> float``
that :func:`dynscope.variance_amplification`'s callbacks and :func:`dynscope.amplification_probe`
expect::

    metric = functools.partial(rollout_cost, dynamics=linear_dynamics(A, B), x0=x0, horizon=50)

They run under ``torch.no_grad`` and do not change the model's mode; the callbacks and the probe
evaluate them in eval mode with forked RNGs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

Dynamics = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StageCost = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_dynamics(A: torch.Tensor, B: torch.Tensor) -> Dynamics:
    """``f(x, u) = x A^T + u B^T`` for batches of row vectors: ``x_{t+1} = A x_t + B u_t``.

    Example:
        >>> import torch
        >>> f = linear_dynamics(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
        >>> f(torch.tensor([[1.0]]), torch.tensor([[-0.5]]))
        tensor([[1.5000]])
    """
    A, B = torch.as_tensor(A), torch.as_tensor(B)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or B.dim() != 2 or B.shape[0] != A.shape[0]:
        raise ValueError(f"need A [n, n] and B [n, m], got {tuple(A.shape)} and {tuple(B.shape)}")
    return lambda x, u: x @ A.T.to(x.dtype) + u @ B.T.to(x.dtype)


def quadratic_cost(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The stage cost ``|x|^2 + |u|^2`` per sample."""
    return (x * x).sum(-1) + (u * u).sum(-1)


def rollout_cost(
    policy: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    dynamics: Dynamics,
    x0: torch.Tensor,
    horizon: int,
    *,
    cost: StageCost = quadratic_cost,
    max_cost: Optional[float] = None,
) -> float:
    """Closed-loop rollout cost of a policy: ``mean over x0 of sum_{t<H} cost(x_t, u_t)``.

    ``u_t = policy(x_t)``, ``x_{t+1} = dynamics(x_t, u_t)``, all initial states rolled out as one
    batch. On an unstable system a slightly wrong policy lets some trajectories grow geometrically;
    ``max_cost`` caps each trajectory's total cost (a trajectory whose state stops being finite
    counts as ``max_cost``), which keeps the metric finite and its swings readable.

    Args:
        policy: ``policy(x [N, n]) -> u [N, m]`` (a module or any callable).
        dynamics: ``dynamics(x, u) -> next x``, e.g. :func:`linear_dynamics`.
        x0: initial states ``[N, n]``.
        horizon: number of steps ``H`` (>= 1).
        cost: stage cost ``cost(x, u) -> [N]``, default ``|x|^2 + |u|^2``.
        max_cost: cap on one trajectory's total cost (``None``: no cap).

    Example:
        >>> import torch
        >>> f = linear_dynamics(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
        >>> # u = -1.5 x: x_{t+1} = 0.5 x_t, so x = 1, 0.5, 0.25 and u = -1.5 x
        >>> rollout_cost(lambda x: -1.5 * x, f, torch.ones(1, 1), horizon=3)  # (1 + 2.25) * 1.3125
        4.265625
    """
    x0 = torch.as_tensor(x0)
    if x0.dim() != 2:
        raise ValueError(f"x0 must be a batch of initial states [N, n], got shape {tuple(x0.shape)}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if max_cost is not None and not max_cost > 0:
        raise ValueError(f"max_cost must be > 0, got {max_cost}")
    x = x0
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    with torch.no_grad():
        for _ in range(horizon):
            u = policy(x)
            if u.dim() != 2 or u.shape[0] != x.shape[0]:
                raise ValueError(f"the policy must map states [N, n] to controls [N, m], got {tuple(u.shape)}")
            total = total + cost(x, u).double()
            x = dynamics(x, u)
            if max_cost is not None:  # once over the cap, a trajectory's value is fixed: stop it overflowing
                x = torch.where((total < max_cost).unsqueeze(-1), x, torch.zeros_like(x))
        if max_cost is not None:
            total = torch.nan_to_num(total, nan=max_cost, posinf=max_cost).clamp(max=max_cost)
    return float(total.mean())


def autoregressive_error(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    sequences: torch.Tensor,
    prompt_len: int,
    steps: int,
) -> float:
    """Error of a greedy ``steps``-step autoregressive rollout against the true continuation.

    The model predicts the next element at every position (``model(seq[:, :t])[:, -1]`` is the
    prediction for ``seq[:, t]``), which is what teacher forcing trains. Here it is fed its own
    predictions instead: starting from ``sequences[:, :prompt_len]``, each step appends the
    prediction, and the ``steps`` generated elements are compared with the teacher-forced targets
    ``sequences[:, prompt_len:prompt_len + steps]``.

    * integer sequences ``[B, T]`` (tokens): the model returns logits ``[B, t, V]``, the greedy
      prediction is the arg-max, the error is the fraction of generated tokens that differ;
    * float sequences ``[B, T, D]``: the model returns ``[B, t, D]``, the error is the mean squared
      error over the generated elements.

    Example:
        >>> import torch
        >>> seq = torch.tensor([[1, 2, 3, 4, 5]])
        >>> plus_one = lambda s: torch.nn.functional.one_hot(s + 1, 8).float()  # perfect model
        >>> autoregressive_error(plus_one, seq, prompt_len=2, steps=3)
        0.0
        >>> autoregressive_error(lambda s: torch.nn.functional.one_hot(s + 2, 9).float(), seq, 2, 3)
        1.0
    """
    sequences = torch.as_tensor(sequences)
    tokens = not torch.is_floating_point(sequences)
    if tokens and sequences.dim() != 2:
        raise ValueError(f"token sequences must be [B, T], got {tuple(sequences.shape)}")
    if not tokens and sequences.dim() != 3:
        raise ValueError(f"continuous sequences must be [B, T, D], got {tuple(sequences.shape)}")
    if prompt_len < 1 or steps < 1 or prompt_len + steps > sequences.shape[1]:
        raise ValueError(
            f"need prompt_len >= 1, steps >= 1 and prompt_len + steps <= T = {sequences.shape[1]}, "
            f"got prompt_len={prompt_len}, steps={steps}"
        )
    seq = sequences[:, :prompt_len]
    with torch.no_grad():
        for _ in range(steps):
            out = model(seq)
            if out.dim() != 3 or out.shape[:2] != seq.shape[:2]:
                raise ValueError(f"the model must return [B, t, V or D] for inputs {tuple(seq.shape)}, got {tuple(out.shape)}")
            last = out[:, -1]
            next_ = last.argmax(-1, keepdim=True) if tokens else last.unsqueeze(1).to(seq.dtype)
            seq = torch.cat([seq, next_], dim=1)
    generated, target = seq[:, prompt_len:], sequences[:, prompt_len:prompt_len + steps]
    if tokens:
        return float((generated != target).double().mean())
    return float(((generated.double() - target.double()) ** 2).mean())
