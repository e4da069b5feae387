"""The Curvature callback: Hessian trace, top eigenvalue, directional sharpness, stability ratios."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map

from dynscope import HessianOperator, ScaledOperator, hessian_trace, top_eigenvalues
from dynscope.params import detached_params
from dynscope.tracking import CurvatureTracker

from .base import DiagnosticCallback
from .distributed import mean_over_ranks, on_every_rank
from .protocol import find_loss_fn


def optimizer_hparams(trainer) -> Dict[str, Any]:
    """Learning rate and momentum of the first optimizer's first param group.

    ``kind`` is ``"adam"`` for optimizers with ``betas`` (Adam, AdamW, ...), else ``"sgd"``.
    """
    optimizers = getattr(trainer, "optimizers", None) or []
    if not optimizers:
        return {}
    optimizer = optimizers[0]
    group = optimizer.param_groups[0]
    info: Dict[str, Any] = {"lr": float(group["lr"]), "optimizer": optimizer}
    if "betas" in group:
        info.update(kind="adam", beta1=float(group["betas"][0]), beta2=float(group["betas"][1]), eps=float(group["eps"]))
    else:
        info.update(kind="sgd", momentum=float(group.get("momentum", 0.0) or 0.0))
    return info


def adam_preconditioner(pl_module, objective, info) -> Optional[torch.Tensor]:
    """``P^{-1/2}`` flattened in the objective's layout, ``P = sqrt(v_hat) + eps`` from Adam's state."""
    state = info["optimizer"].state
    by_id = {id(p): n for n, p in pl_module.named_parameters()}
    pieces = {}
    for p in (p for g in info["optimizer"].param_groups for p in g["params"]):
        s = state.get(p, {})
        name = by_id.get(id(p))
        if name is None or "exp_avg_sq" not in s:
            continue
        step = float(s["step"])
        v_hat = s["exp_avg_sq"] / (1.0 - info["beta2"] ** step)
        pieces[name] = (v_hat.sqrt() + info["eps"]).rsqrt()
    if set(pieces) != set(objective.layout.names):
        return None
    return objective.layout.flatten(pieces, batch_dims=0)


_MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 4, "tracked": 2}


def batch_slice(batch: Any, size: Optional[int]) -> Any:
    """The first ``size`` samples of ``batch``: every tensor whose first dimension is the batch size
    (that of the first tensor in the batch) is sliced along it; other leaves pass through.

    Example:
        >>> import torch
        >>> x, y = batch_slice((torch.zeros(8, 3), torch.arange(8)), 2)
        >>> x.shape, y.tolist()
        (torch.Size([2, 3]), [0, 1])
    """
    if size is None:
        return batch
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not leaves or leaves[0].shape[0] <= size:
        return batch
    full = leaves[0].shape[0]
    return tree_map(lambda t: t[:size] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == full else t, batch)

class Curvature(DiagnosticCallback):
    """Hessian trace (Hutchinson / Hutch++), top eigenvalue (Lanczos), directional sharpness of the
    actual update and of the gradient, and the stability ratios against ``2 / lr``.

    Logged under ``dynscope/curvature/``:

    * ``hessian_trace`` (+ ``hessian_trace_stderr``; per parameter tensor under
      ``hessian_trace/<layer>``) and ``trace_ratio = lr * tr(H) / 2``: at a minimum that SGD can
      stay in, ``tr(H) <= 2 / lr`` (Wu and Su 2023).
    * ``lambda_max`` (largest Hessian eigenvalue), ``eos_threshold = (2 + 2 beta) / lr`` and
      ``eos_ratio = lr * lambda_max / (2 + 2 beta)`` for SGD with heavy-ball momentum ``beta``
      (Cohen et al. 2021: under full-batch GD it rises to 1 and hovers there). The ratio is for
      SGD-type steps; for Adam-type optimizers the callback also logs
      ``preconditioned_lambda_max`` (of ``P^{-1} H`` with ``P = sqrt(v_hat) + eps``) and uses it
      for ``eos_ratio`` with the threshold ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al. 2022).
    * ``update_sharpness``: ``u^T H u / ||u||^2`` for the optimizer's last actual update
      ``u = theta_{t+1} - theta_t``, and ``grad_sharpness`` for the gradient direction (Pan and Li
      2023).

    Everything is measured after the optimizer step of a scheduled step, on that step's batch (or
    the fixed batch; with gradient accumulation, the step's micro-batches joined), at the new
    parameters. Under ``"*-mixed"`` precision the model is evaluated outside autocast, in the
    parameters' dtype (float32): the curvature of the float32 objective.

    With ``method="tracked"`` the measurements share their work (:class:`dynscope.tracking.CurvatureTracker`):
    Lanczos starts from the top Ritz vector of a subspace carried over from the previous measurement,
    and the trace is the exact trace on that subspace plus the Lanczos vectors (whose products
    ``lambda_max`` paid for) plus Hutchinson on the rest; the subspace follows the top of the
    spectrum by one subspace-iteration step per measurement. ``hessian_trace_stderr`` is then the
    probes' standard error (the exact part has none).

    ``sub_batch=k`` measures on the first ``k`` samples of the batch (every tensor whose first
    dimension is the batch size is sliced): the HVPs cost about ``k / batch`` of the full batch's,
    and the values are those of the Hessian of a ``k``-sample batch (noisier, and the sharpness of a
    smaller batch is typically larger). Under DDP each rank slices its own batch (``k`` samples per
    rank, averaged over the ranks).

    Args:
        num_matvecs: Hessian-vector products for the trace (batched). ``"tracked"``: half of them
            (up to 8) carry the sketch, the rest are probes.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` (see :func:`dynscope.hessian_trace`)
            or ``"tracked"`` (needs ``eigen``).
        sub_batch: measure on the first ``sub_batch`` samples of each batch (``None``: all).
        hvp_method: the HVP kernel (``"auto"``: chosen from the model's structure, see
            :func:`dynscope.hvp.choose_method`; or ``"loop"``, ``"reverse"``, ``"forward"``).
        eigen: compute ``lambda_max`` (Lanczos, warm-started from the previous eigenvector).
        eigen_tol: relative accuracy of ``lambda_max`` (default 1%): Lanczos stops when its error
            bound is below ``eigen_tol * lambda_max`` (:func:`dynscope.eigen.lanczos`);
            ``lambda_max_converged`` is 0 when the step limit came first.
        eigen_max_iter: Lanczos steps at most.
        sharpness: compute ``update_sharpness`` and ``grad_sharpness``.
        per_layer: log the per-tensor traces.
        seed: base seed of the probe vectors (the step is added, the same on every rank).
        chunk_size: probes per batched HVP call (default: sized to a memory cap).
        Other arguments: see :class:`~dynscope.callbacks.base.DiagnosticCallback`.

    Example:
        >>> import pytorch_lightning as pl
        >>> import torch.nn.functional as F
        >>> from dynscope.callbacks import Curvature
        >>> callback = Curvature(every_n_steps=100, loss_fn=F.cross_entropy, num_matvecs=32)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    group = "curvature"
    needs_snapshot = True

    def __init__(
        self,
        every_n_steps: int = 50,
        loss_fn=None,
        num_matvecs: int = 32,
        method: str = "hutchinson",
        *,
        eigen: bool = True,
        eigen_tol: float = 1e-2,
        eigen_max_iter: int = 60,
        sharpness: bool = True,
        per_layer: bool = True,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        seed: int = 0,
        chunk_size: Optional[int] = None,
        strict: bool = False,
        sub_batch: Optional[int] = None,
        hvp_method: str = "auto",
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            schedule=schedule,
            points_per_decade=points_per_decade,
            loss_fn=loss_fn,
            fixed_batch=fixed_batch,
            mode=mode,
            strict=strict,
        )
        if method not in _MIN_MATVECS:
            raise ValueError(f"method must be 'hutchinson', 'hutch++', 'xtrace' or 'tracked', got {method!r}")
        if num_matvecs < _MIN_MATVECS[method]:
            raise ValueError(f"num_matvecs={num_matvecs} is too small for {method}")
        if method == "tracked" and not eigen:
            raise ValueError("method='tracked' reuses the lambda_max run: it needs eigen=True")
        if sub_batch is not None and sub_batch < 1:
            raise ValueError(f"sub_batch must be a positive number of samples or None, got {sub_batch}")
        if hvp_method not in ("auto", "forward", "reverse", "loop"):
            raise ValueError(f"hvp_method must be 'auto', 'forward', 'reverse' or 'loop', got {hvp_method!r}")
        self.sub_batch = sub_batch
        self.hvp_method = hvp_method
        sketch = min(num_matvecs // 2, 8)
        self.tracker = CurvatureTracker(
            trace_matvecs=num_matvecs - sketch, sketch=sketch, eigen_tol=eigen_tol, eigen_max_iter=eigen_max_iter,
            seed=seed,
        ) if method == "tracked" else None
        self.num_matvecs = num_matvecs
        self.method = method
        self.eigen = eigen
        self.eigen_tol = eigen_tol
        self.eigen_max_iter = eigen_max_iter
        self.sharpness = sharpness
        self.per_layer = per_layer
        self.seed = seed
        self.chunk_size = chunk_size
        self._before: Optional[Dict[str, torch.Tensor]] = None
        self._eigvec: Optional[torch.Tensor] = None
        self._pre_eigvec: Optional[torch.Tensor] = None

    def check_module(self, trainer, pl_module) -> None:
        find_loss_fn(pl_module, self.loss_fn)

    def before_update(self, trainer, pl_module, batch) -> None:
        if self.sharpness:
            self._before = OrderedDict((n, p.clone()) for n, p in detached_params(pl_module).items())

    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        objective = self.objective(pl_module, batch_slice(batch, self.sub_batch))
        # raises (on every rank) on a non-finite loss before spending any HVP
        on_every_rank(trainer, objective.value, pl_module.device)
        step = trainer.global_step
        reduce = mean_over_ranks(trainer)
        op = HessianOperator(objective, method=self.hvp_method, chunk_size=self.chunk_size, reduce=reduce)
        out: Dict[str, float] = {}

        tracked = None
        if self.tracker is not None:
            tracked = self.tracker.measure(op, seed=self.seed + step)
            trace = tracked.trace
        else:
            trace = hessian_trace(op, self.num_matvecs, method=self.method, seed=self.seed + step)
        out["hessian_trace"] = trace.value
        out["hessian_trace_stderr"] = trace.stderr
        if self.per_layer:
            out.update({f"hessian_trace/{name}": v for name, v in trace.per_layer.items()})

        info = optimizer_hparams(trainer)
        lr = info.get("lr", math.nan)
        out["trace_ratio"] = lr * trace.value / 2.0

        if self.eigen:
            if tracked is not None:
                eig = tracked.eigen
            else:
                eig = top_eigenvalues(
                    op, which="LA", tol=self.eigen_tol, max_iter=self.eigen_max_iter, seed=self.seed,
                    return_eigenvectors=True, start=self._eigvec,
                )
                self._eigvec = eig.eigenvectors[0]
            out["lambda_max"] = eig.value
            out["lambda_max_converged"] = float(eig.converged)
            if info.get("kind") == "sgd":
                beta = info["momentum"]
                out["eos_threshold"] = (2.0 + 2.0 * beta) / lr
                out["eos_ratio"] = eig.value / out["eos_threshold"]
            elif info.get("kind") == "adam":
                scale = adam_preconditioner(pl_module, objective, info)
                if scale is not None:
                    pre = top_eigenvalues(
                        ScaledOperator(op, scale), which="LA", tol=self.eigen_tol, max_iter=self.eigen_max_iter,
                        seed=self.seed, return_eigenvectors=True, start=self._pre_eigvec,
                    )
                    self._pre_eigvec = pre.eigenvectors[0]
                    beta1 = info["beta1"]
                    out["preconditioned_lambda_max"] = pre.value
                    out["eos_threshold"] = (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)
                    out["eos_ratio"] = pre.value / out["eos_threshold"]

        if self.sharpness:
            if self._before is not None and self._snapshot_step == step:
                update = OrderedDict(
                    (n, p.detach() - self._before[n]) for n, p in detached_params(pl_module).items()
                    if n in self._before
                )
                if update.keys() == set(objective.layout.names) and any(bool(u.any()) for u in update.values()):
                    out["update_sharpness"] = _reduced_sharpness(op, update)
            self._before = None
            gradient = objective.gradient()
            if reduce is not None:
                gradient = OrderedDict((n, reduce(g)) for n, g in gradient.items())
            if any(bool(g.any()) for g in gradient.values()):
                out["grad_sharpness"] = _reduced_sharpness(op, gradient)
        return out

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["eigenvector"] = self._eigvec
        state["preconditioned_eigenvector"] = self._pre_eigvec
        if self.tracker is not None:
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._eigvec = state_dict.get("eigenvector")
        self._pre_eigvec = state_dict.get("preconditioned_eigenvector")
        if self.tracker is not None and "tracker" in state_dict:
            self.tracker.load_state_dict(state_dict["tracker"])


def _reduced_sharpness(op: HessianOperator, direction: Dict[str, torch.Tensor]) -> float:
    """``u^T H u / ||u||^2`` through the operator (so that it is all-reduced under DDP)."""
    layout = op.layout
    u = layout.flatten(direction, batch_dims=0).to(op.dtype).unsqueeze(0)
    hu = op.matmat(u)
    return float((u.double() * hu.double()).sum() / (u.double() ** 2).sum())

