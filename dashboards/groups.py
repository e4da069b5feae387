"""The catalogue of dynscope's TensorBoard tags: groups, charts and one-line metric descriptions.

One source of truth for the custom-scalars layout (:mod:`dynscope.dashboards.layout`) and the
static report (:mod:`dynscope.dashboards.report`). Every chart knows the regular expression of the
tags it shows, so per-layer series (``dynscope/<group>/<metric>/<layer>``) group themselves.

Example:
    >>> from dynscope.dashboards.groups import GROUPS, chart_for_tag
    >>> GROUPS["curvature"].title
    'Curvature'
    >>> chart_for_tag("dynscope/curvature/hessian_trace/net.0.weight").title
    'Hessian trace per layer'
    >>> chart_for_tag("dynscope/curvature/eos_ratio").reference
    1.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

PREFIX = "dynscope"
#: A constant 1.0 series written next to the stability ratios so TensorBoard can draw the line.
STABILITY_LINE_TAG = f"{PREFIX}/reference/stability_line"
_RADIUS = r"(/r=[^/]+)?"  # the optional radius suffix of the regions group


@dataclass(frozen=True)
class Chart:
    """One chart: the metrics it overlays (names inside its group) and how to label it.

    ``per_layer`` charts show ``<metric>/<layer>`` series; ``reference`` is a horizontal
    stability line (drawn in the report, and as a constant series in TensorBoard).
    """

    title: str
    metrics: Tuple[str, ...]
    ylabel: str
    reference: Optional[float] = None
    reference_label: str = "stability limit"
    shade_above: bool = True  # shade the zone above the reference line (unstable)
    band: Optional[str] = None  # a standard-error metric drawn as a band around the first metric
    steps: bool = False  # draw as a step function (0/1 series)
    per_layer: bool = False
    suffix: str = ""  # regex appended after the metric (e.g. the regions radius)
    pattern: Optional[str] = None  # overrides the computed regex

    def regex(self, group: str) -> str:
        """The tag regex of this chart (Python ``re`` syntax, as TensorBoard's plugin uses)."""
        if self.pattern:
            return self.pattern
        names = "|".join(re.escape(m) for m in self.metrics)
        if self.per_layer:
            return rf"^{PREFIX}/{group}/({names})/(?!r=)[^/]+{self.suffix}$"
        return rf"^{PREFIX}/{group}/({names}){self.suffix}$"

    def matches(self, group: str, tag: str) -> bool:
        return re.match(self.regex(group), tag) is not None


@dataclass(frozen=True)
class Group:
    """A dashboard category: title, a one-paragraph summary, metric descriptions, charts."""

    name: str
    title: str
    summary: str
    metrics: Dict[str, str] = field(default_factory=dict)
    charts: Tuple[Chart, ...] = ()
    table_only: Tuple[str, ...] = ()  # metrics in the final-values table but in no chart

    @property
    def main_charts(self) -> Tuple[Chart, ...]:
        return tuple(c for c in self.charts if not c.per_layer)

    @property
    def layer_charts(self) -> Tuple[Chart, ...]:
        return tuple(c for c in self.charts if c.per_layer)


_GROUPS = (
    Group(
        "curvature",
        "Curvature",
        "How sharp the loss surface is where the optimizer stands, against the step size it can take stably.",
        {
            "hessian_trace": "tr(H), Hutchinson/Hutch++ estimate (sum of all Hessian eigenvalues).",
            "hessian_trace_stderr": "Standard error of the trace estimate.",
            "lambda_max": "Largest Hessian eigenvalue (Lanczos).",
            "lambda_max_converged": "1 when Lanczos reached its tolerance.",
            "preconditioned_lambda_max": "Largest eigenvalue of P^-1 H for Adam-type optimizers.",
            "eos_threshold": "Edge-of-stability threshold (2+2β)/lr (Cohen et al. 2021).",
            "eos_ratio": "λ_max / threshold: hovers at 1 at the edge of stability, above 1 is unstable.",
            "trace_ratio": "lr·tr(H)/2: above 1, SGD cannot stay in this minimum (Wu & Su 2023).",
            "update_sharpness": "uᵀHu/‖u‖² along the actual optimizer update (Pan & Li 2023).",
            "grad_sharpness": "gᵀHg/‖g‖² along the gradient.",
        },
        (
            Chart("Hessian trace tr(H)", ("hessian_trace",), "tr(H)", band="hessian_trace_stderr"),
            Chart("Top eigenvalue λ_max vs EoS threshold", ("lambda_max", "preconditioned_lambda_max", "eos_threshold"), "eigenvalue"),
            Chart("Edge-of-stability ratio (stable < 1)", ("eos_ratio",), "λ_max / threshold", reference=1.0),
            Chart("Trace stability ratio lr·tr(H)/2 (stable ≤ 1)", ("trace_ratio",), "lr·tr(H)/2", reference=1.0),
            Chart("Directional sharpness", ("update_sharpness", "grad_sharpness"), "vᵀHv / ‖v‖²"),
            Chart("Hessian trace per layer", ("hessian_trace",), "tr(H) of the block", per_layer=True),
        ),
        ("hessian_trace_stderr", "lambda_max_converged"),
    ),
    Group(
        "noise",
        "Gradient noise",
        "How much of the mini-batch gradient is signal and how large a batch the noise calls for.",
        {
            "gsnr": "Mean gradient signal-to-noise ratio mean(g)²/var(g) per coordinate (Liu et al. 2020).",
            "block_gsnr": "Block g-SNR ‖g_p‖/std(g_p) per parameter tensor (SGD-SaI, Xu et al. 2024).",
            "noise_scale": "Simple gradient noise scale B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018).",
            "noise_scale_over_batch": "B_simple / batch size: above 1, a larger batch still helps.",
            "grad_norm": "Norm of the mini-batch gradient.",
        },
        (
            Chart("Gradient signal-to-noise ratio", ("gsnr",), "mean GSNR"),
            Chart("Gradient noise scale B_simple", ("noise_scale",), "samples"),
            Chart(
                "Noise scale / batch size (critical = 1)", ("noise_scale_over_batch",), "B_simple / B", reference=1.0,
                reference_label="batch = noise scale", shade_above=False,
            ),
            Chart("Gradient norm", ("grad_norm",), "‖g‖"),
            Chart("GSNR per layer", ("gsnr",), "mean GSNR", per_layer=True),
            Chart("Block g-SNR per layer", ("block_gsnr",), "‖g‖ / std(g)", per_layer=True),
        ),
    ),
    Group(
        "collapse",
        "Softmax collapse",
        "Whether the softmax saturates in floating point, zeroing losses and gradients (Prieto et al. 2025).",
        {
            "sc_fraction": "Fraction of samples whose softmax sums to exactly 1 in the loss dtype.",
            "zero_loss_fraction": "Fraction of samples with an exactly-zero loss.",
            "nlm_cos": "cos(θ, −∇L): positive when the gradient just scales the weights (naive loss minimisation).",
            "max_logit_gap": "Largest gap between the top logit and the runner-up.",
            "train_accuracy": "Training accuracy on the measured batch.",
        },
        (
            Chart("Softmax collapse", ("sc_fraction", "zero_loss_fraction"), "fraction of samples"),
            Chart("Naive loss minimisation cos(θ, −∇L)", ("nlm_cos",), "cosine"),
            Chart("Max logit gap", ("max_logit_gap",), "logit units"),
            Chart("Train accuracy", ("train_accuracy",), "accuracy"),
            Chart("NLM cosine per layer", ("nlm_cos",), "cosine", per_layer=True),
        ),
    ),
    Group(
        "regions",
        "Linear regions",
        "Local complexity: neurons whose ReLU pattern changes near a point (Humayun et al. 2024).",
        {
            "lc_train": "Local complexity around training points (falls, rises, falls while grokking).",
            "lc_test": "Local complexity around test points.",
            "lc_random": "Local complexity around random points.",
        },
        (
            Chart("Local complexity: train / test / random", ("lc_train", "lc_test", "lc_random"), "neurons crossing", suffix=_RADIUS),
            Chart("Local complexity per layer", ("lc_train", "lc_test", "lc_random"), "neurons crossing", per_layer=True, suffix=_RADIUS),
        ),
    ),
    Group(
        "gva",
        "Amplification",
        "Gradient variance amplification: small loss changes, large swings of a long-horizon metric (Block et al. 2023).",
        {
            "amplification": "A = relative spread of the metric's changes / that of the loss's changes.",
            "metric": "The long-horizon metric of the online weights.",
            "metric_ema": "The same metric for the EMA of the weights.",
            "loss": "Training loss over the same window.",
        },
        (
            Chart("Variance amplification A", ("amplification",), "A (ratio)"),
            Chart("Long-horizon metric: online vs EMA", ("metric", "metric_ema"), "metric"),
            Chart("Training loss", ("loss",), "loss"),
        ),
    ),
    Group(
        "attention",
        "Attention",
        "Attention-logit growth and entropy collapse per attention layer (Wortsman et al. 2023; Zhai et al. 2023).",
        {
            "max_logit": "Largest |q·k|·scale over the attended positions (scale = 1/√d unless the layer sets it).",
            "entropy_min": "Smallest entropy (nats) of a query's attention distribution: near 0, attention sits on one token.",
            "entropy_mean": "Mean attention entropy over the batch's queries.",
            "head_max_logit": "Largest attention logit of one head (per_head=True).",
            "head_entropy_min": "Smallest attention entropy of one head (per_head=True).",
        },
        (
            Chart("Largest attention logit", ("max_logit",), "|q·k|·scale"),
            Chart("Attention entropy", ("entropy_min", "entropy_mean"), "nats"),
            Chart("Largest attention logit per layer", ("max_logit",), "|q·k|·scale", per_layer=True),
            Chart("Minimum attention entropy per layer", ("entropy_min",), "nats", per_layer=True),
            Chart("Mean attention entropy per layer", ("entropy_mean",), "nats", per_layer=True),
            Chart("Largest attention logit per head", ("head_max_logit",), "|q·k|·scale", per_layer=True),
            Chart("Minimum attention entropy per head", ("head_entropy_min",), "nats", per_layer=True),
        ),
    ),
    Group(
        "logits",
        "Output logits",
        "The level of the output logits, which cross-entropy does not see: log Z drifting away is the output-logit "
        "divergence the z-loss fixes (Wortsman et al. 2023).",
        {
            "log_z_mean": "Mean log Z = logsumexp of the output logits over the positions.",
            "log_z_max": "Largest log Z of a position.",
            "log_z_min": "Smallest log Z of a position.",
            "log_z_drift": "log_z_mean minus its value at the first measurement (AutoZLoss acts on it).",
            "max_logit": "Largest output logit.",
            "z_loss": "mean((log Z)²): the z-loss per unit coefficient.",
        },
        (
            Chart("log Z of the output logits", ("log_z_mean", "log_z_max", "log_z_min"), "log Z"),
            Chart("log Z drift since the first measurement", ("log_z_drift",), "nats"),
            Chart("Largest output logit", ("max_logit",), "logit"),
            Chart("z-loss term mean((log Z)²)", ("z_loss",), "(log Z)²"),
        ),
    ),
    Group(
        "spikes",
        "Loss spikes",
        "Loss spikes and what caused them: the sharpest direction at the pre-spike weights and the samples whose "
        "gradients oppose each other along it (Rosenfeld & Risteski 2023).",
        {
            "loss_zscore": "Training loss in robust standard deviations (1.4826·MAD) above the running median.",
            "detected": "1 at each detected spike.",
            "zscore": "Robust z-score of the spiking loss.",
            "loss": "The spiking loss.",
            "lambda_max": "Top Hessian eigenvalue at the pre-spike weights (spiking and recent batches).",
            "grad_projection": "Batch gradient along the top eigenvector v.",
            "opposition": "1 − |Σ gᵢ·v| / Σ |gᵢ·v|: near 1 when opposing samples cancel along v.",
            "top_positive": "Largest per-sample projection gᵢ·v.",
            "top_negative": "Most negative per-sample projection gᵢ·v.",
            "projection_std": "Spread of the per-sample projections.",
        },
        (
            Chart("Loss z-score (robust)", ("loss_zscore", "zscore"), "robust std above median"),
            Chart("Spikes detected", ("detected",), "spike", steps=True),
            Chart("Top Hessian eigenvalue at spikes", ("lambda_max",), "λ_max"),
            Chart("Opposing signals along v", ("opposition",), "opposition"),
            Chart("Per-sample projections on v", ("top_positive", "top_negative", "grad_projection", "projection_std"), "gᵢ·v"),
        ),
        ("loss",),
    ),
    Group(
        "mitigation",
        "Mitigations",
        "What dynscope switched on: 1 while a mitigation is active, 0 otherwise.",
        {
            "stablemax": "StableMax cross-entropy in place of softmax (against softmax collapse).",
            "orthograd": "Orthogonal gradient (the component along the weights removed).",
            "ema": "EMA of the weights used for evaluation (against variance amplification).",
            "zloss": "z-loss 1e-4·(log Z)² added to the loss (against output-logit divergence).",
        },
        (Chart("Mitigations active (0/1)", ("stablemax", "orthograd", "ema", "zloss"), "active", steps=True,
                      pattern=rf"^{PREFIX}/mitigation/[^/]+$"),),
    ),
    Group(
        "overhead",
        "Overhead",
        "Cost of the diagnostics.",
        {
            "overhead": "Fraction of training time spent in dynscope (DynScope's own account, every hook timed).",
            "overhead/<diagnostic>": "The part of it spent in one diagnostic's measurements.",
            "overhead/stretch/<diagnostic>": "How much the budget slowed a cadence down (< 1: sped up near an event).",
        },
        (
            Chart("Diagnostics overhead", ("overhead",), "fraction of time", pattern=rf"^{PREFIX}/overhead$"),
            Chart("Overhead per diagnostic", ("overhead",), "fraction of time",
                  pattern=rf"^{PREFIX}/overhead/(?!stretch/)[^/]+$"),
            Chart("Cadence stretch per diagnostic", ("overhead",), "x base period", steps=True,
                  pattern=rf"^{PREFIX}/overhead/stretch/[^/]+$"),
        ),
    ),
)

#: group name -> :class:`Group`, in display order.
GROUPS: Dict[str, Group] = {g.name: g for g in _GROUPS}


def group_of(tag: str) -> Optional[str]:
    """The group of a dynscope tag (``None`` for other tags).

    >>> group_of("dynscope/noise/gsnr/fc.weight"), group_of("dynscope/overhead"), group_of("loss")
    ('noise', 'overhead', None)
    """
    parts = tag.split("/")
    if len(parts) < 2 or parts[0] != PREFIX:
        return None
    return parts[1]


def chart_for_tag(tag: str) -> Optional[Chart]:
    """The chart of the catalogue that shows ``tag`` (``None`` when no chart does)."""
    group = GROUPS.get(group_of(tag) or "")
    if group is None:
        return None
    for chart in group.charts:
        if chart.matches(group.name, tag):
            return chart
    return None
