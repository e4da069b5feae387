"""Exact references: the dense Hessian of an objective, row by row with plain autograd.

``torch.func.hessian`` would be the natural reference, but in torch 2.13 it returns an asymmetric
(wrong) Hessian for models with LayerNorm (checked against central finite differences in float64),
while double-backward through plain autograd matches the finite differences to 1e-10.
"""

from __future__ import annotations

import torch

from dynscope import Objective


def exact_hessian(objective: Objective) -> torch.Tensor:
    """The dense ``[n, n]`` Hessian of the objective's loss in the layout's flat order."""
    with objective.measuring():
        params = {n: p.detach().clone().requires_grad_(True) for n, p in objective.params.items()}
        loss = objective.loss(params)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        flat = torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params.values(), grads)
        ])
        rows = []
        for i in range(flat.numel()):
            if not flat[i].requires_grad:
                rows.append(torch.zeros_like(flat))
                continue
            row = torch.autograd.grad(flat[i], list(params.values()), retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if r is None else r).reshape(-1) for p, r in zip(params.values(), row)]))
    return torch.stack(rows).detach()


def finite_difference_hessian(objective: Objective, eps: float = 1e-5) -> torch.Tensor:
    """Central differences of the gradient (use on float64 models) to cross-check ``exact_hessian``."""
    layout = objective.layout
    theta = layout.flatten(objective.params, batch_dims=0)

    def gradient(flat):
        with objective.measuring():
            params = {n: t.detach().requires_grad_(True) for n, t in layout.unflatten(flat.clone()).items()}
            grads = torch.autograd.grad(objective.loss(params), list(params.values()), allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params.values(), grads)])

    cols = []
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = eps
        cols.append((gradient(theta + e) - gradient(theta - e)) / (2 * eps))
    return torch.stack(cols, 1)
