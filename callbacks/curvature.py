"""The Curvature callback: Hessian trace, top eigenvalue, directional sharpness, stability ratios
(measured by :func:`dynscope.curvature.measure_curvature`)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import torch

from dynscope import HessianOperator, Objective
from dynscope.curvature import adam_preconditioner, batch_slice, measure_curvature, objective_at, optimizer_hparams
from dynscope.curvature import with_batch_statistics
from dynscope.curvature import density_histogram, optimizer_scaling
from dynscope.eigen import lanczos
from dynscope.gauss_newton import exact_trace_reason
from dynscope.objective import batch_size_of
from dynscope.operators import DiagonalOperator
from dynscope.optim import CoordinateClip
from dynscope.params import detached_params
from dynscope.stability import UnsupportedOptimizer
from dynscope.tracking import CurvatureTracker

from .base import DiagnosticCallback, _detached_copy, join_batches
from .distributed import mean_over_ranks, on_every_rank, reduce_computed
from .protocol import find_loss_fn, module_objective

__all__ = ["Curvature", "adam_preconditioner", "batch_slice", "batch_statistics_objective", "objective_at",
           "optimizer_hparams"]


def batch_statistics_objective(pl_module, batch, loss_fn=None) -> Objective:
    """The module's objective with BatchNorm normalising by the batch (dropout off): the gradients
    Adam's statistics come from: :func:`dynscope.curvature.with_batch_statistics` of the protocol's objective."""
    return with_batch_statistics(module_objective(pl_module, batch, loss_fn, mode="eval"))


_MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 4, "tracked": 2}
_EXACT_TRACE_MATVECS = 3  # what the exact trace costs in HVPs, about (0.3-0.8x of 8 on the benchmark models)
PILOT_STEPS = 3  # timed Lanczos steps of the pilot (Curvature.pilot)


class Curvature(DiagnosticCallback):
    """Hessian trace (Hutchinson / Hutch++ / XTrace), top eigenvalues (Lanczos), the spectrum,
    directional sharpness of the actual update and of the gradient, and stability ratios derived
    from the optimizer's actual update rule.

    Logged under ``dynscope/curvature/``:

    * ``hessian_trace`` (+ ``hessian_trace_stderr``; per parameter tensor under
      ``hessian_trace/<layer>``) and ``trace_ratio = lr * tr(H) / 2`` (Wu and Su 2023's bound
      ``tr(H) <= 2 / lr`` for single-sample SGD steps).
    * ``linear_stability_ratio`` (SGD): ``lr * ((1 - k) lambda_max + k tr(H)) / a*`` with
      ``k = (N - B) / (B (N - 1))`` for batch ``B`` out of ``N`` samples (``1 / B`` when ``N`` is
      unknown) and ``a*`` the optimizer's critical ``lr * lambda`` (2 for plain SGD). Mean-square
      stability along the top eigendirection when the per-sample Hessians are rank one with equal
      norms (Wu and Su's setting): it is ``trace_ratio`` at ``B = 1`` and ``eos_ratio`` at full batch.
    * ``lambda_max`` (largest Hessian eigenvalue), ``eos_ratio`` and ``eos_threshold``. The ratio
      is the largest eigenvalue of ``S^1/2 H S^1/2`` where ``S`` holds each coordinate's
      ``lr / a*`` from the update rule of its param group (:mod:`dynscope.stability`): heavy
      ball ``(2 + 2 mu) / (1 - dampening)``, Nesterov ``(2 + 2 mu) / (1 + 2 mu)``, L2 weight decay
      added to ``H``; for Adam/AdamW (and AMSGrad) ``S = P^-1 (1 - beta1) / ((1 + beta1)(1 + r) lr)``
      with Cohen et al. 2022's bias-corrected ``P = (1 - beta1^t)(sqrt(v_hat) + eps)`` of the last
      step, and ``preconditioned_lambda_max`` (of ``P^-1 H``). Under full-batch GD the ratio rises to
      1 and hovers there (Cohen et al. 2021). ``eos_threshold`` is the common threshold on
      ``lambda_max`` (SGD) or ``preconditioned_lambda_max`` (Adam), when the groups share one.
      Coordinates the optimizer does not move (no state; never a gradient) are left out. For a
      model with BatchNorm the Adam ratio is measured with BatchNorm on batch statistics, as the
      gradients behind ``P`` were. Other optimizers (NAdam, RAdam, RMSprop, ...): a warning, no ratio.
    * ``batch_sharpness`` (Andreyev and Beneventano 2024): the mean over minibatches of
      ``g_b^T H_b g_b / ||g_b||^2``, each minibatch's Hessian along its own gradient; under
      minibatch SGD this, not ``lambda_max``, hovers at the threshold: ``batch_sharpness_ratio``.
      On the training batch it is one sample of that mean (the value of ``grad_sharpness``); with
      ``eval_batches`` the mean over those batches.
    * ``update_sharpness``: ``u^T H u / ||u||^2`` for the optimizer's last update
      ``u = theta_{t+1} - theta_t`` with ``H`` at ``theta_t`` (Pan and Li 2023's Taylor
      expansion), ``update_sharpness_next`` the same at ``theta_{t+1}``, and ``grad_sharpness``
      for the gradient at ``theta_{t+1}``. With :class:`dynscope.optim.CoordinateClip` the update
      is the clipped one; ``update_sharpness_unclipped`` is the wrapped optimizer's own update.
    * options: ``eigenvalues/<i>`` (top ``num_eigenvalues``), ``lambda_min`` (most negative),
      ``lambda_max/<layer>`` (block Hessian of each tensor), ``spectral_density`` (stochastic
      Lanczos quadrature, as a TensorBoard histogram of eigenvalue counts, with the scalars
      ``density_mass_negative`` and ``density_moment2``).

    The measurement itself is :func:`dynscope.curvature.measure_curvature` (framework-free); this
    callback picks the batch or evaluation set, the optimizer and its last update, wires the
    reduction over data-parallel ranks, logs, and keeps the warm starts in checkpoints.

    Everything is measured after the optimizer step of a scheduled step, on that step's batch (or
    the fixed batch, or the first ``eval_batches`` training batches joined: full-batch quantities
    on a fixed evaluation set; with gradient accumulation, the step's micro-batches joined), at the
    new parameters. Under ``"*-mixed"`` precision the model is evaluated outside autocast, in the
    parameters' dtype (float32): the curvature of the float32 objective.

    With ``method="tracked"`` the measurements share their work (:class:`dynscope.tracking.CurvatureTracker`):
    Lanczos starts from the top Ritz vector of a subspace carried over from the previous measurement,
    and the trace is the exact trace on that subspace plus the Lanczos vectors (whose products
    ``lambda_max`` paid for) plus Hutchinson on the rest; the subspace follows the top of the
    spectrum by one subspace-iteration step per measurement. ``hessian_trace_stderr`` is then the
    probes' standard error (the exact part has none). On a fixed evaluation set (``eval_batches``,
    as in :class:`~dynscope.callbacks.DynScope`) consecutive Hessians differ by the training alone,
    and the trace probes are carried instead: each probe set is used at two consecutive
    measurements, whose difference it estimates, weighted against the fresh probes by their
    variances (``memory="auto"`` of :class:`~dynscope.tracking.CurvatureTracker`). How far that
    gets depends on the model: the trace of a flat spectrum needs hundreds of probes for 5%, which
    no tracking replaces (``benchmarks/bench_tracking.py``).

    ``sub_batch=k`` measures on the first ``k`` samples of the batch (every tensor whose first
    dimension is the batch size is sliced): the HVPs cost about ``k / batch`` of the full batch's,
    and the values are those of the Hessian of a ``k``-sample batch (noisier, and the sharpness of a
    smaller batch is typically larger). Under DDP each rank slices its own batch (``k`` samples per
    rank, averaged over the ranks). With ``eval_batches`` the evaluation set is sliced the same way.

    Args:
        num_matvecs: Hessian-vector products for the trace (batched). ``"tracked"``: half of them
            (up to 8) carry the sketch, the rest are probes; with ``eval_batches`` all are probes,
            half of them carried to the next measurement.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` (see :func:`dynscope.hessian_trace`)
            or ``"tracked"`` (needs ``eigen``).
        exact_trace: where the network is piecewise linear in every weight (ReLU networks: linear,
            convolution, pooling and eval-mode BatchNorm layers, each weight used once; checked by
            :func:`dynscope.piecewise.piecewise_linear_reason`) and the loss is cross-entropy or
            mean squared error, ``hessian_trace`` is exact: ``tr(H) = tr(GGN)``
            (:mod:`dynscope.gauss_newton`), with ``hessian_trace_stderr`` 0, at less than the cost of
            8 HVPs for 10 classes; ``method`` and ``num_matvecs`` then apply only where it does not.
            ``False``: always estimate.
        sub_batch: measure on the first ``sub_batch`` samples of each batch, or of the evaluation
            set (``None``: all).
        hvp_method: the HVP kernel (``"auto"``: chosen from the model's structure, see
            :func:`dynscope.hvp.choose_method`; or ``"loop"``, ``"reverse"``, ``"forward"``).
        eigen: compute ``lambda_max`` (Lanczos, warm-started from the previous eigenvector).
        eigen_tol: relative accuracy of ``lambda_max`` (default 1%): Lanczos stops when its error
            bound is below ``eigen_tol * lambda_max`` (:func:`dynscope.eigen.lanczos`);
            ``lambda_max_converged`` is 0 when the step limit came first.
        eigen_max_iter: Lanczos steps at most.
        num_eigenvalues: log the top ``k`` eigenvalues as ``eigenvalues/<i>`` (when ``k > 1``).
        lambda_min: also the most negative eigenvalue (one more Lanczos run).
        layer_eigen: ``lambda_max/<layer>`` per parameter tensor (one Lanczos run each).
        density: log the spectral density (``density_probes * density_steps`` matvecs).
        density_probes: probes of the spectral density.
        density_steps: Lanczos steps per probe.
        eval_batches: measure on ``eval_batches`` fixed batches (joined) instead of the step's
            batch: full-batch quantities on a fixed evaluation set; 0: the step's batch.
        eval_data: where the evaluation batches come from: ``"train"`` (the first training
            batches) or ``"val"`` (the first batches of the validation dataloader; falls back to
            the training batches with a warning when there is none).
        sharpness: compute ``update_sharpness`` and ``grad_sharpness``.
        per_layer: log the per-tensor traces.
        seed: base seed of the probe vectors (the step is added, the same on every rank).
        chunk_size: items (here: probes) per vectorized call of the HVP kernel (default: as many as
            fit in ``memory_cap``).
        memory_cap: bytes a batched HVP call may use (default: about twice the per-probe loop's
            memory, at least 16 MiB on CPU and 2 GiB on an accelerator; see :func:`dynscope.hvp.kernel_plan`).
        checkpoint_eigenvectors: keep the last top eigenvector(s) in checkpoints, to warm-start
            Lanczos after a resume exactly as in an uninterrupted run. Each is parameter-sized (two
            with an Adam-type optimizer: the preconditioned one too), so the callback's state adds
            one or two copies of the weights to each checkpoint; ``False`` leaves them out (a
            resumed run then starts Lanczos afresh: ``lambda_max`` agrees to ``eigen_tol``). With
            ``method="tracked"`` the tracker's sketch (a few parameter-sized vectors) goes with them.
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
        exact_trace: bool = True,
        eigen: bool = True,
        eigen_tol: float = 1e-2,
        eigen_max_iter: int = 60,
        num_eigenvalues: int = 1,
        lambda_min: bool = False,
        layer_eigen: bool = False,
        density: bool = False,
        density_probes: int = 4,
        density_steps: int = 32,
        eval_batches: int = 0,
        eval_data: str = "train",
        sharpness: bool = True,
        per_layer: bool = True,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        seed: int = 0,
        chunk_size: Optional[int] = None,
        checkpoint_eigenvectors: bool = True,
        strict: bool = False,
        sub_batch: Optional[int] = None,
        hvp_method: str = "auto",
        memory_cap: Optional[int] = None,
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
        if num_eigenvalues < 1:
            raise ValueError(f"num_eigenvalues must be at least 1, got {num_eigenvalues}")
        if eval_batches < 0:
            raise ValueError(f"eval_batches must be >= 0, got {eval_batches}")
        if eval_data not in ("train", "val"):
            raise ValueError(f"eval_data must be 'train' or 'val', got {eval_data!r}")
        if method == "tracked" and not eigen:
            raise ValueError("method='tracked' reuses the lambda_max run: it needs eigen=True")
        if sub_batch is not None and sub_batch < 1:
            raise ValueError(f"sub_batch must be a positive number of samples or None, got {sub_batch}")
        if memory_cap is not None and memory_cap < 1:
            raise ValueError(f"memory_cap must be a positive number of bytes or None, got {memory_cap}")
        if hvp_method not in ("auto", "forward", "reverse", "loop"):
            raise ValueError(f"hvp_method must be 'auto', 'forward', 'reverse' or 'loop', got {hvp_method!r}")
        self.sub_batch = sub_batch
        self.hvp_method = hvp_method
        # on a fixed evaluation set consecutive Hessians differ by the training alone: the probes are
        # carried to the next measurement (memory); on the step's batch they would not be the same matrix
        memory = "auto" if eval_batches and num_matvecs >= 4 else 0.0
        sketch = 0 if memory else min(num_matvecs // 2, 8)
        self.tracker = CurvatureTracker(
            trace_matvecs=num_matvecs - sketch, sketch=sketch, eigen_tol=eigen_tol, eigen_max_iter=eigen_max_iter,
            seed=seed, memory=memory,
        ) if method == "tracked" else None
        self.num_matvecs = num_matvecs
        self.method = method
        self.exact_trace = exact_trace
        self._trace_exact: Optional[bool] = None  # known after the first measurement
        self._exact_expected = False  # before it, what the pilot's structural check expects
        self.eigen = eigen
        self.eigen_tol = eigen_tol
        self.eigen_max_iter = eigen_max_iter
        self.num_eigenvalues = num_eigenvalues
        self.lambda_min = lambda_min
        self.layer_eigen = layer_eigen
        self.density = density
        self.density_probes = density_probes
        self.density_steps = density_steps
        self.eval_batches = eval_batches
        self.eval_data = eval_data
        self.sharpness = sharpness
        self.per_layer = per_layer
        self.seed = seed
        self.chunk_size = chunk_size
        self.memory_cap = memory_cap
        self.checkpoint_eigenvectors = checkpoint_eigenvectors
        self._before: Optional[Dict[str, torch.Tensor]] = None
        self._clip_steps: Optional[int] = None
        self._eigvec: Optional[torch.Tensor] = None
        self._pre_eigvec: Optional[torch.Tensor] = None
        self._eval: List[Any] = []
        self.last_density = None

    @property
    def idle_between_measurements(self) -> bool:  # type: ignore[override]
        """Idle between measurements once the evaluation batches are collected (from the first steps)."""
        if not self.eval_batches or (self.eval_data == "val" and self._eval):
            return True
        return len(self._eval) >= self.eval_batches

    @property
    def trace_exact(self) -> Optional[bool]:
        """Whether the last measurement's trace was exact (``tr(H) = tr(GGN)`` of a piecewise-linear
        network) rather than estimated; ``None`` before the first measurement."""
        return self._trace_exact

    def check_module(self, trainer, pl_module) -> None:
        find_loss_fn(pl_module, self.loss_fn)

    def expected_cost(self, batch_size: Optional[int] = None) -> float:
        """One measurement in training steps: about 1.5 per HVP on the full batch, less on a
        sub-batch (a fifth of an HVP is per-call overhead that does not shrink). The HVPs are the
        trace's (about 3 once a measurement found it exact, or once the pilot's structural check
        expects it to be), Lanczos' (at its step limit from a
        random start, where the tracked method also places the second eigenvalue; at half of it
        from the previous eigenvector), two for the sharpness, and those of the options
        (``lambda_min``, per-layer Lanczos, the spectral density). The budget learns the seconds
        per expected step from the measurements, so the ratio between the first (cold) and later
        expectations is what must be right: on the 85k MLP under Lightning the first cost 16-18
        steps and later ones 6-8.

        The 1.5 is measured in the steps of a Lightning training loop (``benchmarks/bench_budget.py``,
        the suite's curvature on 16 samples): 0.5 (the 2.4k-parameter digits MLP, whose step is
        mostly Lightning's own overhead), 0.8-1.3 (CNN), 1.4 (transformer) and 1.5-2 (85k MLP) per
        full-batch HVP. A measurement that costs more than expected is paid back by the budget's
        allowance (later measurements wait); one expected to cost too much waits for nothing. Under
        a budget the first measurement is expected at what a pilot timed (:meth:`pilot`), which
        puts this guess's 0.5-2 right for the model at hand.

        Example:
            >>> Curvature(num_matvecs=16, eigen_max_iter=30).expected_cost()  # the first measurement
            72.0
            >>> Curvature(num_matvecs=8, eigen_max_iter=20, sub_batch=32).expected_cost(batch_size=128)
            18.0
            >>> round(Curvature(num_matvecs=8, eigen_max_iter=20, sub_batch=16, eval_batches=1).expected_cost(batch_size=128), 6)
            13.5
        """
        declared = getattr(self, "expected_steps", None)
        if declared is not None:
            return float(declared)
        warm = (self.tracker.eigenvector if self.tracker is not None else self._eigvec) is not None
        lanczos = self.eigen_max_iter / 2 if warm else self.eigen_max_iter
        exact = self._exact_expected if self._trace_exact is None else self._trace_exact
        trace = _EXACT_TRACE_MATVECS if exact else self.num_matvecs
        matvecs = trace + (lanczos if self.eigen else 0) + (2 if self.sharpness else 0)
        matvecs += (lanczos if self.lambda_min else 0) + (self.density_probes * self.density_steps if self.density else 0)
        return 1.5 * matvecs * self._batch_fraction(batch_size)

    def _batch_fraction(self, batch_size: Optional[int]) -> float:
        """The full batches one HVP is expected to cost (1.5 training steps each)."""
        fraction = float(self.eval_batches or 1)  # batches measured on; a sub-batch slices the evaluation set too
        if self.sub_batch is not None and batch_size:
            fraction = 0.2 + 0.8 * min(fraction, self.sub_batch / batch_size)
        return fraction

    def pilot(self, trainer, pl_module, batch, clock: Callable[[], float],
              batch_size: Optional[int] = None) -> Optional[float]:
        """What one expected step of :meth:`expected_cost` costs on this model, in ``clock`` seconds,
        from a few timed products before the first measurement (``None``: nothing to time yet).

        The prior's steps per HVP are a guess that is off by the model: 0.5x-2x on the benchmark
        models, since what an HVP on a sub-batch costs next to a training step depends on how much of
        the step is the loop's own overhead and how much the network's arithmetic. So an overhead
        budget asks for a pilot: the Hessian of the measurement set (the evaluation set, or this
        batch) is built and ``PILOT_STEPS`` Lanczos steps run on it, timed after one untimed product
        (the gradient graph and the kernel's one-time set-up) and an untimed Lanczos run on a diagonal
        of the same size (the bookkeeping's first calls in the process), from a start vector made before
        the timer (a random one costs a few products of a small model, once per measurement: timed
        over three steps it made the first measurement look 1.4x dearer than it was). The pilot
        also settles whether the trace will be exact (the structural check the first measurement
        would make, cached), so that the expectation counts the trace's products as they will be.
        No result is kept and nothing the training sees is touched; on a data-parallel run each
        rank times its own, without collectives.
        """
        if self.disabled or (self.eval_batches and not self._eval):
            return None
        measured = list(self._eval) if self.eval_batches else [batch]
        joined = join_batches(measured, self.warn_once) if len(measured) > 1 else measured[0]
        objective = self.objective(pl_module, batch_slice(joined, self.sub_batch))
        if self.exact_trace and self._trace_exact is None:
            self._exact_expected = exact_trace_reason(objective) is None
        op = self._operator(objective)
        with op.measuring():
            op.matmat(torch.zeros(1, op.size, dtype=op.dtype, device=op.device))
            first = torch.ones(op.size, dtype=op.dtype, device=op.device)
            # the bookkeeping's first calls in a process (LAPACK, numpy, buffers of this size): ~2 ms
            # on the 85k MLP, which made a user's pilot (the first in its process) expect the first
            # measurement at 1.7x its cost. Paid once here, on a diagonal of the same size, untimed
            spread = torch.linspace(1.0, 2.0, op.size, dtype=op.dtype, device=op.device)
            lanczos(DiagonalOperator(spread), k=1, which="LA", tol=self.eigen_tol, max_iter=PILOT_STEPS, start=first)
            start = clock()
            steps = lanczos(op, k=1, which="LA", tol=self.eigen_tol, max_iter=PILOT_STEPS, start=first).num_matvecs
            seconds = clock() - start
        if not seconds > 0:
            return None
        return seconds / (steps * 1.5 * self._batch_fraction(batch_size))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.eval_batches and self.eval_data == "val" and not self._eval:
            self._eval = self._validation_batches(trainer)
        if self.eval_batches and len(self._eval) < self.eval_batches and self.eval_data == "train":
            self._eval.append(_detached_copy(batch))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def before_update(self, trainer, pl_module, batch) -> None:
        if self.sharpness:
            self._before = OrderedDict((n, p.clone()) for n, p in detached_params(pl_module).items())
            clip = _coordinate_clip(trainer)
            self._clip_steps = None if clip is None else clip.num_steps

    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        train_batch = batch
        if self.eval_batches and self._eval:
            batches = list(self._eval)
            batch = batch_slice(join_batches(batches, self.warn_once) if len(batches) > 1 else batches[0], self.sub_batch)
        else:
            batch = batch_slice(batch, self.sub_batch)
            batches = [batch]

        def local():
            objective = self.objective(pl_module, batch)
            objective.value()  # raises (on every rank) on a non-finite loss before spending any HVP
            return objective

        objective = on_every_rank(trainer, local, pl_module.device)
        step = trainer.global_step
        reduce = mean_over_ranks(trainer)
        before, unclipped = self._update(trainer, pl_module, objective)
        result = measure_curvature(
            self._operator(objective, reduce), num_matvecs=self.num_matvecs, method=self.method, seed=self.seed,
            probe_seed=self.seed + step, tracker=self.tracker, exact_trace=self.exact_trace, eigen=self.eigen, eigen_tol=self.eigen_tol,
            eigen_max_iter=self.eigen_max_iter, num_eigenvalues=self.num_eigenvalues, lambda_min=self.lambda_min,
            layer_eigen=self.layer_eigen, density=self.density, density_probes=self.density_probes,
            density_steps=self.density_steps, scaling=self._scaling(trainer, objective),
            lr=optimizer_hparams(trainer).get("lr", math.nan), batch_size=self._global_batch_size(trainer, train_batch),
            num_samples=self._num_samples(trainer), sharpness=self.sharpness, before=before,
            unclipped_update=unclipped,
            batches=(self.objective(pl_module, b) for b in batches) if len(batches) > 1 else None,
            gradient_of=None if reduce is None else (lambda obj: _reduced_gradient(obj, reduce)),
            eigenvector=self._eigvec, preconditioned_eigenvector=self._pre_eigvec,
        )
        self._trace_exact = result.trace.method == "exact"
        if result.eigenvector is not None:
            self._eigvec = result.eigenvector
        if result.preconditioned_eigenvector is not None:
            self._pre_eigvec = result.preconditioned_eigenvector
        if result.density is not None:
            self.last_density = result.density
            _log_histogram(trainer, "dynscope/curvature/spectral_density", result.density, step)
        return result.metrics(per_layer=self.per_layer)

    def _validation_batches(self, trainer) -> List[Any]:
        loaders = getattr(trainer, "val_dataloaders", None)
        if loaders is None:
            try:  # before the first validation run Lightning has not built its loader yet
                source = trainer.fit_loop.epoch_loop.val_loop._data_source
                loaders = source.dataloader() if source.is_defined() else None
            except Exception:  # noqa: BLE001 - no validation data, or another Lightning version
                loaders = None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        batches: List[Any] = []
        if loaders is not None:
            for b in loaders:
                batches.append(_detached_copy(trainer.strategy.batch_to_device(b)))
                if len(batches) == self.eval_batches:
                    break
        if not batches:
            self.warn_once("eval-data", "eval_data='val' but there is no validation data: the first training "
                                        "batches are the evaluation set instead")
            self.eval_data = "train"
        return batches

    # -- what measure reads from the trainer --------------------------------------------------------
    def _scaling(self, trainer, objective):
        """The stability scaling of the first optimizer (None, warning once, when there is none to derive)."""
        optimizers = getattr(trainer, "optimizers", None) or []
        if not optimizers:
            return None
        if len(optimizers) > 1:
            self.warn_once("eos-multi", "several optimizers: the stability ratios use the first one only")
        try:
            return optimizer_scaling(optimizers[0], objective.model, objective.layout)
        except UnsupportedOptimizer as error:
            self.warn_once("eos-unsupported", f"{error}; eos_ratio, eos_threshold and the other stability "
                                              "ratios are not logged")
            return None

    @staticmethod
    def _global_batch_size(trainer, batch) -> int:
        return batch_size_of(batch) * max(1, int(getattr(trainer, "world_size", 1) or 1))

    @staticmethod
    def _num_samples(trainer) -> Optional[int]:
        try:
            return len(trainer.train_dataloader.dataset)
        except Exception:  # noqa: BLE001 - iterable datasets have no length
            return None

    def _update(self, trainer, pl_module, objective):
        """The parameters before this step's update (None unless snapshotted for this step) and, under
        :class:`~dynscope.optim.CoordinateClip`, the wrapped optimizer's own update, by name."""
        before, self._before = self._before, None
        if before is None or self._snapshot_step != self._planned_step:
            return None, None
        clip = _coordinate_clip(trainer)
        unclipped = None
        if clip is not None and self._clip_steps is not None and clip.num_steps == self._clip_steps + 1:
            named = dict(pl_module.named_parameters())
            unclipped = {n: clip.last_update.get(id(named[n])) for n in objective.layout.names}
        return before, unclipped

    def _operator(self, objective: Objective, reduce=None) -> HessianOperator:
        """The Hessian of ``objective`` with this callback's kernel settings (``reduce``: over ranks)."""
        return HessianOperator(objective, method=self.hvp_method, chunk_size=self.chunk_size,
                               memory_cap=self.memory_cap, reduce=reduce)

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        if self.checkpoint_eigenvectors:  # parameter-sized vectors (the tracker's sketch too)
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


def _coordinate_clip(trainer) -> Optional[CoordinateClip]:
    optimizers = getattr(trainer, "optimizers", None) or []
    opt = optimizers[0] if optimizers else None
    for _ in range(8):
        if opt is None or isinstance(opt, CoordinateClip):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def _log_histogram(trainer, tag: str, density, step: int) -> None:
    """The spectral density as a TensorBoard histogram of eigenvalue counts (rank zero, TensorBoard only)."""
    from ._lightning import is_global_zero

    histogram = density_histogram(density) if is_global_zero(trainer) else None
    if histogram is None:
        return
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_histogram_raw"):
            experiment.add_histogram_raw(tag, **histogram, global_step=step)


def _reduced_gradient(objective, reduce) -> Dict[str, torch.Tensor]:
    """The gradient averaged over ranks, in one reduction that a failing rank still joins."""
    layout = objective.layout
    like = torch.zeros(layout.numel, dtype=objective.dtype, device=objective.device)
    return layout.unflatten(reduce_computed(reduce, lambda: layout.flatten(objective.gradient(), batch_dims=0), like))
