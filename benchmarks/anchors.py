"""The anchors dynscope is measured against, each optional: a missing one is ``None`` (tables read "n/a").

``pip install --no-deps pyhessian curvlinops-for-pytorch hessian-eigenthings`` (curvlinops also wants
scipy, einops, einconv, opt-einsum and linear_operator, each installable with ``--no-deps`` next to
any torch). Also the calls that every benchmark makes of them the same way.
"""

from __future__ import annotations

from torch import nn

try:
    from pyhessian import hessian as PyHessian
except Exception:  # noqa: BLE001 - optional anchor
    PyHessian = None
try:
    import curvlinops
    from scipy.sparse.linalg import eigsh
except Exception:  # noqa: BLE001 - optional anchor
    curvlinops = eigsh = None
try:
    import hessian_eigenthings as eigenthings
except Exception:  # noqa: BLE001 - optional anchor
    eigenthings = None


def available() -> str:
    """One line: which anchors imported."""
    return ", ".join(f"{name} {'available' if module else 'n/a'}" for name, module in
                     (("PyHessian", PyHessian), ("curvlinops", curvlinops), ("hessian-eigenthings", eigenthings)))


def pyhessian_trace(model: nn.Module, x, y, probes: int, cuda: bool = False) -> float:
    """PyHessian's Hutchinson trace with every one of ``probes`` spent (its stopping rule divides by
    the previous mean without ``abs()``: with ``tol=0`` a negative running mean, common early on a
    transformer, stops it after two probes; ``tol=-inf`` never stops it). PyHessian leaves the model
    in eval mode and its gradients set: they are cleared."""
    model.zero_grad(set_to_none=True)
    values = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=cuda).trace(maxIter=probes, tol=float("-inf"))
    assert len(values) == probes, len(values)
    model.zero_grad(set_to_none=True)
    return sum(values) / len(values)


def pyhessian_lambda_max(model: nn.Module, x, y, tol: float, cuda: bool = False) -> float:
    """PyHessian's power iteration for the top eigenvalue (gradients cleared before and after)."""
    model.zero_grad(set_to_none=True)
    value = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=cuda).eigenvalues(top_n=1, tol=tol)[0][0]
    model.zero_grad(set_to_none=True)
    return value


def curvlinops_hessian(model: nn.Module, x, y):
    """curvlinops' ``HessianLinearOperator`` of the cross-entropy on one batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    return curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
