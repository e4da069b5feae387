"""The GradientNoise callback: per-sample gradient SNR, block g-SNR and the gradient noise scale."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from torch import nn

from dynscope.noise import SmoothedNoiseScale, TwoBatchNoiseScale, gradient_noise_scale, gradient_snr
from dynscope.objective import NotPerSampleError
from dynscope.kernel_choice import DEFAULT_MEMORY_CAP
from dynscope.persample import per_sample_moments
from dynscope.step_capture import NOT_FINITE, StepCapture

from .base import DiagnosticCallback, memory_cap_bytes
from .distributed import on_every_rank, sum_over_ranks, world_size
from .protocol import LossProtocolError, find_loss_fn

PER_SAMPLE_HELP = (
    "GradientNoise needs the loss as a mean of independent per-sample losses. Ways out: return one loss per "
    "sample (shape [B], e.g. reduction='none') from `dynscope_loss(self, batch)`; or use a mean-reduced "
    "loss_fn that accepts `reduction=` (torch losses do) without class weights; keep BatchNorm out of "
    "mode='train'. A batch-level loss (contrastive, listwise, ...) has no per-sample gradients: use the "
    "Curvature callback for it instead"
)


class GradientNoise(DiagnosticCallback):
    """Gradient signal-to-noise and noise scale from per-sample gradients of the training batch.

    Logged under ``dynscope/noise/``:

    * ``gsnr``: mean per-coordinate GSNR ``mean_i(g_ij)**2 / var_i(g_ij)`` over coordinates with
      non-zero variance (Liu et al. 2020; Cockpit's MeanGSNR up to its biased variance and eps),
      and per parameter tensor under ``gsnr/<layer>``.
    * ``block_gsnr/<layer>``: SGD-SaI's ``||G_p|| / std(G_p)`` per tensor (Xu et al. 2024).
    * ``noise_scale``: ``B_simple = tr(Sigma) / |G_B|**2`` of this batch (McCandlish et al. 2018;
      biased low when ``B_simple`` is comparable to ``B``: it cannot exceed about ``B`` much).
    * ``critical_batch``: ``B_simple`` from unbiased per-batch estimates of ``tr(Sigma)`` and
      ``|G|**2 = |G_B|**2 - tr(Sigma)/B``, each smoothed over measurements (bias-corrected EMA
      ``noise_ema``, McCandlish et al.'s appendix A.1); their estimate of the critical batch size.
      ``noise_scale_over_batch = critical_batch / B``: above 1, a larger batch would still help.
    * ``grad_norm``: ``||G_B||``, the norm of the batch gradient.
    * under DDP also ``noise_scale_two_batch``: the two-batch estimate from this rank's gradient
      vs the all-reduced one, EMA-smoothed (``two_batch_ema``).

    ``g_i`` is the gradient of sample ``i``'s own loss; the batch gradient is ``G_B = mean_i g_i``;
    variances are unbiased.

    After the first measurement (which checks the per-sample decomposition with a forward and
    backward of its own, after the optimizer step), the training step's own forward and backward
    give the per-sample gradients (:class:`dynscope.step_capture.StepCapture`: read-only hooks,
    the step's batch at the parameters it computed its gradient with), where the step's loss is
    certified to be ``loss_fn(module(x), y)``'s mean on the batch (the module called once on it,
    the same loss value and output gradient, every parameter in a Linear, Conv1d/2d or Embedding
    layer and used only there, no autocast, the same outputs in eval and train mode for
    ``mode="eval"``) and the trainer leaves ``.grad`` as the step computed it (one process,
    automatic optimization, no accumulation, 32- or 64-bit precision). Then a measurement costs
    the sums of squares alone: 0.7x a training step on the benchmark CNN and a 1.3M-parameter MLP,
    1.3x on an 85k-parameter MLP, against 1.6x and 2.1x with its own backward. Otherwise, and from
    the first step that cannot be captured on, it measures with its own backward as the first time
    (``capture_reason`` says why). Under DDP the per-sample moments of all ranks are summed (one
    all-reduce of ``2P`` numbers), so ``B`` is the global batch. Per-sample gradients come from the
    hook fast path for Linear, Conv1d/2d and Embedding layers and from ``vmap`` for the rest (see
    :mod:`dynscope.persample`); with ``method="vmap"`` all from ``vmap``. Models vmap cannot trace
    (Hugging Face attention masks, ``nn.GRU``) get a per-sample loop instead, automatically.

    Complex parameters are refused at ``setup`` (with a message saying so). The loss must be a
    mean of per-sample losses (checked on the first measurement, within a
    tolerance scaled to the loss's dtype); otherwise training stops with a
    :class:`~dynscope.callbacks.LossProtocolError` saying how to provide per-sample losses
    (:class:`~dynscope.callbacks.DynScope` drops the diagnostic instead). A non-finite loss (a NaN
    sample) skips that measurement with one warning, and the check waits for a finite batch.

    Args:
        per_layer: log ``gsnr/<layer>``.
        block: log ``block_gsnr/<layer>``.
        method: ``"auto"`` (hooks where they apply) or ``"vmap"`` (no hooks; a loop where vmap fails).
        chunk_size: items (here: samples) per vectorized call (default: as many as fit in ``memory_cap``).
        memory_cap: working memory of the per-sample gradients, in bytes (default 2 GiB).
        memory_cap_mb: the same in MiB (older name, kept as an alias).
        two_batch_ema: EMA factor of the two-batch estimator under DDP (0 = no smoothing).
        noise_ema: EMA factor of ``critical_batch``'s numerator and denominator (0 = this batch only).
        Other arguments: see :class:`~dynscope.callbacks.base.DiagnosticCallback`.

    Example:
        >>> import pytorch_lightning as pl
        >>> import torch.nn.functional as F
        >>> from dynscope.callbacks import GradientNoise
        >>> callback = GradientNoise(every_n_steps=100, loss_fn=F.cross_entropy)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    group = "noise"

    def __init__(
        self,
        every_n_steps: int = 50,
        loss_fn=None,
        *,
        per_layer: bool = True,
        block: bool = True,
        method: str = "auto",
        chunk_size: Optional[int] = None,
        memory_cap: Optional[int] = None,
        memory_cap_mb: Optional[float] = None,
        two_batch_ema: float = 0.9,
        noise_ema: float = 0.9,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        strict: bool = False,
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
        if method not in ("auto", "vmap"):
            raise ValueError(f"method must be 'auto' or 'vmap', got {method!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of samples, got {chunk_size}")
        self.memory_cap = memory_cap_bytes(memory_cap, memory_cap_mb, DEFAULT_MEMORY_CAP, "GradientNoise")
        self.per_layer = per_layer
        self.block = block
        self.method = method
        self.chunk_size = chunk_size
        self.two_batch = TwoBatchNoiseScale(two_batch_ema)
        self.smoothed = SmoothedNoiseScale(noise_ema)
        self._checked = False
        self._capture: Optional[StepCapture] = None  # recording the training step to measure
        self._captured = None  # the moments it gave, for this step's measurement
        #: why the last measurement did not come from the training step's own backward (None: it did)
        self.capture_reason: Optional[str] = "not measured yet"
        self._refused: Optional[str] = None  # why a step could not be captured: then no step is (it is the model's way)

    @property
    def memory_cap_mb(self) -> float:
        """The memory cap in MiB (older name)."""
        return self.memory_cap / 2**20

    def check_module(self, trainer, pl_module) -> None:
        find_loss_fn(pl_module, self.loss_fn, per_sample=True)
        complex_params = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.is_complex()]
        if complex_params:
            raise LossProtocolError(
                f"GradientNoise does not support complex parameters ({', '.join(complex_params[:3])}"
                f"{', ...' if len(complex_params) > 3 else ''}): its per-sample moments, GSNR and noise scale are "
                "defined for real gradients (products g*g of complex gradients are not |g|**2). Keep it for real "
                "models, or view complex weights as real pairs (torch.view_as_real) in the module"
            )
        if self.mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pl_module.modules()):
            raise LossProtocolError(
                "GradientNoise(mode='train') cannot measure a model with BatchNorm: in train mode it mixes the "
                "samples of a batch, so per-sample gradients are undefined; use mode='eval' (the default)"
            )

    def expected_cost(self, batch_size: Optional[int] = None) -> float:
        """One measurement in training steps: per-sample gradient moments, about 4 steps (2-4 on the
        benchmark MLP and CNN; ``benchmarks/bench_noise.py``)."""
        declared = getattr(self, "expected_steps", None)
        return 4.0 if declared is None else float(declared)

    # -- measuring from the training step's own forward and backward ------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._end_capture()  # one a step left open (a training_step that skipped its backward)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._run_at is None:
            return
        self.capture_reason = self._capture_refusal(trainer)
        if self.capture_reason is None:
            try:
                capture = StepCapture(self.objective(pl_module, batch), self.memory_cap)
            except Exception as error:  # noqa: BLE001 - the measurement builds its objective again and says what is wrong
                self.capture_reason = f"{type(error).__name__}: {error}"
                return
            if capture.reason is not None:
                self.capture_reason = self._refused = capture.reason
                return
            self._capture = capture.__enter__()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._capture is not None:
            self._capture.saw_loss(loss)

    def on_after_backward(self, trainer, pl_module) -> None:
        """The moments of a captured step, while the parameters' ``.grad`` is still this step's."""
        capture, self._capture = self._capture, None
        if capture is None:
            return
        start = self.clock()
        try:
            self._captured = capture.moments()
            self.capture_reason = capture.reason
        except Exception as error:  # noqa: BLE001 - the measurement falls back to its own backward
            self._captured, self.capture_reason = None, f"{type(error).__name__}: {error}"
        finally:  # (moments() removed the hooks first)
            self.seconds_spent += self.clock() - start
        if self._captured is None and self.capture_reason != NOT_FINITE:
            self._refused = self.capture_reason

    def _capture_refusal(self, trainer) -> Optional[str]:
        """Why this step's forward and backward cannot stand for the measurement's own (None: try;
        the conditions of :class:`~dynscope.step_capture.StepCapture` that the trainer settles)."""
        if self._refused is not None:
            return self._refused
        if not self._checked:
            return "the first measurement checks the per-sample decomposition on its own backward"
        if self.method != "auto" or self.fixed_batch or self.schedule.at_epoch_end:
            return "method='vmap', a fixed batch or an epoch-end schedule"
        if not self._automatic or getattr(trainer, "accumulate_grad_batches", 1) != 1:
            return "manual optimization or accumulated gradients"
        if world_size(trainer) != 1:
            return "data-parallel gradients are averaged over the ranks"
        if str(getattr(trainer, "precision", "32-true")) not in ("32-true", "64-true", "32", "64"):
            return "mixed or low precision"
        return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._close_capture()  # armed, but the step ran no backward (training_step returned None)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _close_capture(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    def _end_capture(self) -> None:
        self._close_capture()
        self._captured = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._end_capture()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._end_capture()

    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        def local():
            objective = self.objective(pl_module, batch)
            try:
                return per_sample_moments(
                    objective, self.method, chunk_size=self.chunk_size,
                    memory_cap=self.memory_cap, check=not self._checked,
                )
            except NotPerSampleError as error:  # does not apply: dropped (on every rank alike under DDP)
                raise LossProtocolError(f"{error}. {PER_SAMPLE_HELP}") from error

        # A non-finite loss skips this measurement (NonFiniteError) and leaves the check for the next.
        moments, self._captured = self._captured, None
        if moments is None:
            moments = on_every_rank(trainer, local, pl_module.device)
        self._checked = True
        out: Dict[str, float] = {}
        reduce = sum_over_ranks(trainer)
        if reduce is not None:
            local = moments
            moments = moments.all_reduced(reduce)
            if world_size(trainer) > 1 and moments.count > local.count:
                small = float(sum(m.square().sum() for m in local.mean.values()))
                big = float(sum(m.square().sum() for m in moments.mean.values()))
                out["noise_scale_two_batch"] = self.two_batch.update(small, big, local.count, moments.count).value
        snr = gradient_snr(moments)
        noise = gradient_noise_scale(moments)
        out["gsnr"] = snr.value
        out["noise_scale"] = noise.value
        critical = self.smoothed.update(noise.trace_sigma, noise.grad_sq_norm, moments.count)
        out["critical_batch"] = critical
        out["noise_scale_over_batch"] = critical / moments.count
        out["grad_norm"] = math.sqrt(noise.grad_sq_norm)
        if self.per_layer:
            out.update({f"gsnr/{name}": v for name, v in snr.per_layer.items()})
        if self.block:
            out.update({f"block_gsnr/{name}": v for name, v in snr.block.items()})
        return out

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["two_batch"] = self.two_batch.state_dict()
        state["smoothed_noise_scale"] = self.smoothed.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "two_batch" in state_dict:
            self.two_batch.load_state_dict(state_dict["two_batch"])
        if "smoothed_noise_scale" in state_dict:
            self.smoothed.load_state_dict(state_dict["smoothed_noise_scale"])
