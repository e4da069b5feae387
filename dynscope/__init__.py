"""dynscope: training-dynamics diagnostics.

The core (this package) is plain PyTorch: objectives, batched Hessian-vector products, estimators
and metrics, usable from any training loop. Lightning adapters live in :mod:`dynscope.callbacks`,
TensorBoard layouts and the static report in :mod:`dynscope.dashboards`.
"""

import importlib
import sys
import types

# Lazy: ``import dynscope`` (and the ``dynscope`` command's --help) must not pay for importing
# torch. A name is imported from its submodule on first use.
_SUBMODULE_OF = {
    "EigenResult": "eigen", "top_eigenvalues": "eigen",
    "HessianOperator": "operators", "MatrixOperator": "operators", "ScaledOperator": "operators", "hvp": "hvp",
    "Operator": "operators", "OperatorWrapper": "operators", "DiagonalOperator": "operators",
    "NonFiniteError": "objective", "NotPerSampleError": "objective", "Objective": "objective",
    "ParamLayout": "params",
    "clip_top_coordinates": "sharpness", "directional_sharpness": "sharpness",
    "TraceResult": "trace", "hessian_trace": "trace",
    "NotExact": "gauss_newton", "gauss_newton_trace": "gauss_newton", "piecewise_linear_reason": "piecewise",
    "SpectralDensity": "spectrum", "lambda_min": "spectrum", "spectral_density": "spectrum",
    "StabilityScaling": "stability", "stability_scaling": "stability",
    "NoiseScaleResult": "noise", "SNRResult": "noise", "TwoBatchNoiseScale": "noise",
    "gradient_noise_scale": "noise", "gradient_snr": "noise", "two_batch_noise_scale": "noise",
    "GradientMoments": "persample", "per_sample_grads": "persample", "per_sample_moments": "persample",
    "LocalComplexityResult": "regions", "NotPiecewiseLinearWarning": "regions", "local_complexity": "regions",
    "orthonormal_directions": "regions", "random_points_in_box": "regions",
    "NLMAlignment": "collapse", "max_logit_gap": "collapse", "nlm_alignment": "collapse",
    "softmax_collapse": "collapse", "zero_loss_fraction": "collapse",
    "CollapseCounts": "collapse", "count_collapse": "collapse",
    "CurvatureResult": "curvature", "measure_curvature": "curvature",
    "AmplificationWindow": "amplification", "EMAWindow": "amplification", "WarmupEMA": "amplification",
    "ema_window": "amplification",
    "Metric": "metrics", "Metrics": "metrics",
    "ProbeResult": "amplification", "amplification_probe": "amplification", "ema_decay": "amplification",
    "variance_amplification": "amplification",
    "AttentionStats": "attention", "attention_logits": "attention", "capture_attention": "attention",
    "LogitStats": "logits", "log_partition": "logits", "output_logit_stats": "logits", "z_loss": "logits",
    "SpikeDetector": "spikes", "SpikeSnapshot": "spikes", "opposing_signals": "spikes", "sample_projections": "spikes",
}
_SUBPACKAGES = ("rollouts", "nn", "optim")  # dynscope.rollouts, dynscope.nn (StableMax, CrossEntropy), dynscope.optim


def __getattr__(name):
    if name in _SUBMODULE_OF:
        value = getattr(importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
        if name != "hvp":
            globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULE_OF) | set(_SUBPACKAGES))


class _Package(types.ModuleType):
    # ``dynscope.hvp`` is the function, although importing the submodule dynscope.hvp binds the
    # module under the same name (a data descriptor on the class wins over that binding).
    @property
    def hvp(self):
        return getattr(importlib.import_module(".hvp", __name__), "hvp")

    @hvp.setter
    def hvp(self, value):
        pass


sys.modules[__name__].__class__ = _Package

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
    "DiagonalOperator",
    "HessianOperator",
    "MatrixOperator",
    "Operator",
    "OperatorWrapper",
    "ScaledOperator",
    "NonFiniteError",
    "NotPerSampleError",
    "Objective",
    "ParamLayout",
    "TraceResult",
    "clip_top_coordinates",
    "SpectralDensity",
    "StabilityScaling",
    "lambda_min",
    "spectral_density",
    "stability_scaling",
    "directional_sharpness",
    "hessian_trace",
    "NotExact",
    "gauss_newton_trace",
    "piecewise_linear_reason",
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
    "CollapseCounts",
    "count_collapse",
    "CurvatureResult",
    "measure_curvature",
    "AmplificationWindow",
    "EMAWindow",
    "WarmupEMA",
    "ema_window",
    "Metric",
    "Metrics",
]
