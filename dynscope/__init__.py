"""dynscope: training-dynamics diagnostics.

The core (this package) is plain PyTorch: objectives, batched Hessian-vector products, estimators
and metrics, usable from any training loop. Lightning adapters live in :mod:`dynscope.callbacks`,
TensorBoard layouts and the static report in :mod:`dynscope.dashboards`.
"""

from .eigen import EigenResult, top_eigenvalues
from .hvp import HessianOperator, MatrixOperator, ScaledOperator, hvp
from .objective import NonFiniteError, NotPerSampleError, Objective
from .params import ParamLayout
from .sharpness import clip_top_coordinates, directional_sharpness
from .trace import TraceResult, hessian_trace
from .noise import NoiseScaleResult, SNRResult, TwoBatchNoiseScale, gradient_noise_scale, gradient_snr, two_batch_noise_scale
from .persample import GradientMoments, per_sample_grads, per_sample_moments
from .regions import LocalComplexityResult, NotPiecewiseLinearWarning, local_complexity, orthonormal_directions, random_points_in_box
from .collapse import NLMAlignment, max_logit_gap, nlm_alignment, softmax_collapse, zero_loss_fraction
from .amplification import ProbeResult, amplification_probe, ema_decay, variance_amplification
from .attention import AttentionStats, attention_logits, capture_attention
from .logits import LogitStats, log_partition, output_logit_stats, z_loss
from .spikes import SpikeDetector, SpikeSnapshot, opposing_signals, sample_projections
from . import rollouts  # noqa: E402  dynscope.rollouts (rollout_cost, autoregressive_error)
from . import nn, optim  # noqa: E402  dynscope.nn (StableMax, CrossEntropy), dynscope.optim (OrthoGrad)

__version__ = "0.1.0"

__all__ = [
    "SpikeDetector",
    "SpikeSnapshot",
    "opposing_signals",
    "sample_projections",
    "LogitStats",
    "log_partition",
    "output_logit_stats",
    "z_loss",
    "AttentionStats",
    "attention_logits",
    "capture_attention",
    "ProbeResult",
    "amplification_probe",
    "ema_decay",
    "variance_amplification",
    "EigenResult",
    "HessianOperator",
    "MatrixOperator",
    "ScaledOperator",
    "NonFiniteError",
    "NotPerSampleError",
    "Objective",
    "ParamLayout",
    "TraceResult",
    "clip_top_coordinates",
    "directional_sharpness",
    "hessian_trace",
    "hvp",
    "top_eigenvalues",
    "GradientMoments",
    "NoiseScaleResult",
    "SNRResult",
    "TwoBatchNoiseScale",
    "gradient_noise_scale",
    "gradient_snr",
    "per_sample_grads",
    "per_sample_moments",
    "two_batch_noise_scale",
    "LocalComplexityResult",
    "NotPiecewiseLinearWarning",
    "local_complexity",
    "orthonormal_directions",
    "random_points_in_box",
    "NLMAlignment",
    "max_logit_gap",
    "nlm_alignment",
    "softmax_collapse",
    "zero_loss_fraction",
]
