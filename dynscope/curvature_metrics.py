"""The metrics of the curvature diagnostics (trace, eigenvalues, stability ratios, sharpness, spectrum).

Declared here, apart from the estimators (:mod:`dynscope.trace`, :mod:`dynscope.eigen`,
:mod:`dynscope.stability`, :mod:`dynscope.sharpness`, :mod:`dynscope.spectrum`), because one
curvature measurement combines them; see :mod:`dynscope.metrics`.

Example:
    >>> METRICS["eos_ratio"].per_layer, METRICS.on_chart("density")
    (True, ('density_mass_negative', 'density_moment2'))
"""

from .metrics import Metric, Metrics

__all__ = ["METRICS"]

METRICS = Metrics(
    "curvature",
    Metric("hessian_trace", "tr(H), Hutchinson/Hutch++ estimate (sum of all Hessian eigenvalues).", "tr(H)",
           per_layer=True, chart="trace"),
    Metric("hessian_trace_stderr", "Standard error of the trace estimate.", "tr(H)"),
    Metric("lambda_max", "Largest Hessian eigenvalue (Lanczos).", "eigenvalue", per_layer=True, chart="lambda_max"),
    Metric("lambda_max_converged", "1 when Lanczos reached its tolerance.", "0/1"),
    Metric("preconditioned_lambda_max",
           "Largest eigenvalue of P^-1 H for Adam/AdamW, P with the bias correction (Cohen et al. 2022).", "eigenvalue",
           chart="preconditioned"),
    Metric("eos_threshold", "Edge-of-stability threshold from the optimizer's update rule: (2+2β)/lr heavy ball, "
                            "(2+2β)/((1+2β)lr) Nesterov, (2+2β1)/((1−β1)lr) Adam on P^-1 H.", "eigenvalue",
           chart="eos_threshold"),
    Metric("eos_ratio", "Largest eigenvalue of the step's stability operator (1 = threshold, per param group): "
                        "hovers at 1 at the edge of stability, above 1 is unstable.", "ratio", per_layer=True,
           chart="eos_ratio"),
    Metric("trace_ratio", "lr·tr(H)/2: Wu & Su 2023's bound for single-sample SGD steps (stable ≤ 1 at batch 1 only).",
           "ratio", chart="trace_ratio"),
    Metric("linear_stability_ratio", "lr((1−k)λ_max + k·tr(H))/a*, k = (N−B)/(B(N−1)): batch-B SGD stability "
                                     "(trace bound at B = 1, λ_max at full batch).", "ratio", chart="linear_stability"),
    Metric("batch_sharpness_ratio", "batch sharpness / EoS threshold: hovers at 1 under minibatch SGD at the edge.",
           "ratio", chart="batch_sharpness_ratio"),
    Metric("update_sharpness", "uᵀHu/‖u‖² along the actual optimizer update, H at θ_t (Pan & Li 2023).", "vᵀHv/‖v‖²",
           chart="directional"),
    Metric("update_sharpness_next", "The same with H at θ_t+1.", "vᵀHv/‖v‖²", chart="directional"),
    Metric("update_sharpness_unclipped", "Update sharpness of the wrapped optimizer's own step under CoordinateClip.",
           "vᵀHv/‖v‖²", chart="directional"),
    Metric("grad_sharpness", "gᵀHg/‖g‖² along the gradient.", "vᵀHv/‖v‖²", chart="directional"),
    Metric("batch_sharpness", "Mean of g_bᵀH_b g_b/‖g_b‖² over minibatches (Andreyev & Beneventano 2024).",
           "vᵀHv/‖v‖²", chart="directional"),
    Metric("eigenvalues", "The top-k Hessian eigenvalues (Lanczos), eigenvalues/0 = λ_max.", "eigenvalue",
           per_layer=True, layer_only=True),
    Metric("lambda_min", "Most negative Hessian eigenvalue.", "eigenvalue", chart="lambda_min"),
    Metric("density_mass_negative", "Fraction of the Hessian spectrum below 0 (stochastic Lanczos quadrature).",
           "fraction", chart="density"),
    Metric("density_moment2", "Second moment tr(H²)/n of the spectral density.", "eigenvalue²", chart="density"),
)
