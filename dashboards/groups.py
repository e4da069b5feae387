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

The ``training`` group holds the LightningModule's own series (``train_loss``, ``val_acc``, ...),
so a mitigation's effect shows next to what the user watches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

PREFIX = "dynscope"
USER = "training"  # the group of the LightningModule's own metrics (its `self.log` series)
_NOT_OURS = r"(?!dynscope/)(?!.*hp_metric)"


def _anycase(word: str) -> str:
    """``loss`` -> ``[lL][oO][sS][sS]``: TensorBoard's page matches these regexes in JavaScript,
    which has no inline ``(?i)`` flag."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)
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
    # Mitigations whose 0/1 series TensorBoard overlays on this chart (the switch shows as a step);
    # the report draws every mitigation event as a vertical line on every chart.
    events: Tuple[str, ...] = ()
    # A metric of the group drawn as this chart's dashed threshold line in the report, unless the
    # run logged ``threshold_unless`` (then the threshold belongs to that metric's chart).
    threshold: Optional[str] = None
    threshold_unless: Optional[str] = None

    def regex(self, group: str) -> str:
        """The tag regex of this chart (Python ``re`` syntax, as TensorBoard's plugin uses)."""
        if self.pattern:
            return self.pattern
        if group == USER:
            raise ValueError("charts of the user's metrics need a pattern")
        names = "|".join(re.escape(m) for m in self.metrics)
        if self.per_layer:
            return rf"^{PREFIX}/{group}/({names})/(?!r=)[^/]+{self.suffix}$"
        return rf"^{PREFIX}/{group}/({names}){self.suffix}$"

    def matches(self, group: str, tag: str) -> bool:
        return re.match(self.regex(group), tag) is not None

    def event_regex(self) -> Optional[str]:
        """The regex of the mitigations' 0/1 series overlaid on this chart in TensorBoard."""
        if not self.events:
            return None
        return rf"^{PREFIX}/mitigation/({'|'.join(map(re.escape, self.events))})$"


@dataclass(frozen=True)
class Group:
    """A dashboard category: title, a one-paragraph summary, metric descriptions, charts."""

    name: str
    title: str
    summary: str
    metrics: Dict[str, str] = field(default_factory=dict)
    charts: Tuple[Chart, ...] = ()
    table_only: Tuple[str, ...] = ()  # metrics in the final-values table but in no chart
    user: bool = False  # the module's own logged metrics (tags outside dynscope/)
    # (metric, another metric) -> the metric's description in runs that logged the other one
    metrics_when: Dict[Tuple[str, str], str] = field(default_factory=dict)

    @property
    def main_charts(self) -> Tuple[Chart, ...]:
        return tuple(c for c in self.charts if not c.per_layer)

    @property
    def layer_charts(self) -> Tuple[Chart, ...]:
        return tuple(c for c in self.charts if c.per_layer)


_GROUPS = (
    Group(
        USER,
        "Training (your metrics)",
        "The LightningModule's own logged series (self.log), next to what dynscope measured and switched on.",
        {
            "loss": "Every logged series whose name contains 'loss' (train and validation).",
            "acc": "Every logged series whose name contains 'acc' (accuracy, train and validation).",
        },
        (
            Chart("Loss (train / validation)", ("loss",), "loss", pattern=rf"^{_NOT_OURS}.*{_anycase('loss')}.*$"),
            Chart("Accuracy (train / validation)", ("acc",), "accuracy", pattern=rf"^{_NOT_OURS}.*{_anycase('acc')}.*$",
                  events=("stablemax", "orthograd", "ema")),
        ),
        user=True,
    ),
    Group(
        "curvature",
        "Curvature",
        "How sharp the loss surface is where the optimizer stands, against the step size it can take stably.",
        {
            "hessian_trace": "tr(H), Hutchinson/Hutch++ estimate (sum of all Hessian eigenvalues).",
            "hessian_trace_stderr": "Standard error of the trace estimate.",
            "lambda_max": "Largest Hessian eigenvalue (Lanczos).",
            "lambda_max_converged": "1 when Lanczos reached its tolerance.",
            "preconditioned_lambda_max": "Largest eigenvalue of P^-1 H for Adam/AdamW, P with the bias correction (Cohen et al. 2022).",
            "eos_threshold": "Edge-of-stability threshold from the optimizer's update rule: (2+2β)/lr heavy ball, "
                             "(2+2β)/((1+2β)lr) Nesterov, (2+2β1)/((1−β1)lr) Adam on P^-1 H.",
            "eos_ratio": "Largest eigenvalue of the step's stability operator (1 = threshold, per param group): "
                         "hovers at 1 at the edge of stability, above 1 is unstable.",
            "trace_ratio": "lr·tr(H)/2: Wu & Su 2023's bound for single-sample SGD steps (stable ≤ 1 at batch 1 only).",
            "linear_stability_ratio": "lr((1−k)λ_max + k·tr(H))/a*, k = (N−B)/(B(N−1)): batch-B SGD stability "
                                      "(trace bound at B = 1, λ_max at full batch).",
            "batch_sharpness": "Mean of g_bᵀH_b g_b/‖g_b‖² over minibatches (Andreyev & Beneventano 2024).",
            "batch_sharpness_ratio": "batch sharpness / EoS threshold: hovers at 1 under minibatch SGD at the edge.",
            "update_sharpness": "uᵀHu/‖u‖² along the actual optimizer update, H at θ_t (Pan & Li 2023).",
            "update_sharpness_next": "The same with H at θ_t+1.",
            "update_sharpness_unclipped": "Update sharpness of the wrapped optimizer's own step under CoordinateClip.",
            "grad_sharpness": "gᵀHg/‖g‖² along the gradient.",
            "eigenvalues": "The top-k Hessian eigenvalues (Lanczos), eigenvalues/0 = λ_max.",
            "lambda_min": "Most negative Hessian eigenvalue.",
            "density_mass_negative": "Fraction of the Hessian spectrum below 0 (stochastic Lanczos quadrature).",
            "density_moment2": "Second moment tr(H²)/n of the spectral density.",
        },
        (
            Chart("Hessian trace tr(H)", ("hessian_trace",), "tr(H)", band="hessian_trace_stderr"),
            Chart("Edge-of-stability ratio (stable < 1)", ("eos_ratio",), "sharpness / threshold", reference=1.0),
            Chart("Top eigenvalue λ_max", ("lambda_max",), "eigenvalue", threshold="eos_threshold",
                  threshold_unless="preconditioned_lambda_max"),
            Chart("Preconditioned sharpness λ_max(P⁻¹H) (Adam)", ("preconditioned_lambda_max",), "eigenvalue",
                  threshold="eos_threshold"),
            Chart("EoS threshold", ("eos_threshold",), "threshold"),
            Chart("Trace stability ratio lr·tr(H)/2 (stable ≤ 1)", ("trace_ratio",), "lr·tr(H)/2", reference=1.0),
            Chart("Batch-size-aware stability lr((1−k)λ_max + k·tr H)/a* (stable ≤ 1)", ("linear_stability_ratio",),
                  "ratio", reference=1.0),
            Chart("Batch sharpness / threshold (minibatch EoS at 1)", ("batch_sharpness_ratio",), "ratio",
                  reference=1.0),
            Chart("Directional sharpness", ("update_sharpness", "update_sharpness_next", "update_sharpness_unclipped",
                                            "grad_sharpness", "batch_sharpness"), "vᵀHv / ‖v‖²"),
            Chart("Spectrum edges λ_min", ("lambda_min",), "eigenvalue"),
            Chart("Spectral density", ("density_mass_negative", "density_moment2"), "value"),
            Chart("Top-k eigenvalues", ("eigenvalues",), "eigenvalue", per_layer=True),
            Chart("Hessian trace per layer", ("hessian_trace",), "tr(H) of the block", per_layer=True),
            Chart("λ_max per layer (block Hessian)", ("lambda_max",), "λ_max of the block", per_layer=True),
            Chart("EoS ratio per param group", ("eos_ratio",), "ratio of the group's block", per_layer=True,
                  reference=1.0),
        ),
        ("hessian_trace_stderr", "lambda_max_converged"),
        metrics_when={
            ("eos_threshold", "preconditioned_lambda_max"):
                "Edge-of-stability threshold of Adam, (2+2β₁)/((1−β₁)·lr), against the preconditioned sharpness "
                "λ_max(P⁻¹H) with the bias-corrected second moments as P (Cohen et al. 2022).",
            ("eos_ratio", "preconditioned_lambda_max"):
                "Preconditioned sharpness / Adam's threshold: hovers at 1 at the edge of stability, above 1 is unstable.",
        },
    ),
    Group(
        "noise",
        "Gradient noise",
        "How much of the mini-batch gradient is signal and how large a batch the noise calls for.",
        {
            "gsnr": "Mean gradient signal-to-noise ratio mean(g)²/var(g) per coordinate (Liu et al. 2020).",
            "block_gsnr": "Block g-SNR ‖g_p‖/std(g_p) per parameter tensor (SGD-SaI, Xu et al. 2024).",
            "noise_scale": "Simple gradient noise scale B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018).",
            "noise_scale_two_batch": "Under DDP: B_simple from one rank's vs the all-reduced gradient (unbiased "
                                     "two-batch estimate, EMA-smoothed).",
            "noise_scale_over_batch": "Smoothed B_simple / batch size: above 1, a larger batch still helps.",
            "critical_batch": "B_simple from unbiased tr(Σ) and ‖G‖² smoothed separately: the critical batch size.",
            "grad_norm": "Norm of the mini-batch gradient.",
        },
        (
            Chart("Gradient signal-to-noise ratio", ("gsnr",), "mean GSNR"),
            Chart("Gradient noise scale B_simple", ("noise_scale", "critical_batch", "noise_scale_two_batch"), "samples"),
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
            "sc_fraction": "Fraction of samples whose top-class log-probability is exactly 0 in the loss in use (its dtype).",
            "zero_loss_fraction": "Fraction of samples with an exactly-zero loss (the loss in use).",
            "softmax_sc_fraction": "The softmax's collapse fraction, also after a switch to StableMax (how far the logits grew).",
            "nlm_cos": "cos(θ, −∇L): positive when the gradient just scales the weights (naive loss minimisation).",
            "max_logit_gap": "Largest gap between the top logit and the runner-up.",
            "train_accuracy": "Training accuracy on the measured batch.",
            "held_sc_fraction": "Softmax collapse on held-out (validation) batches (held_data='val').",
            "held_zero_loss_fraction": "Exactly-zero losses on the held-out batches.",
            "held_max_logit_gap": "Largest logit gap on the held-out batches.",
            "held_accuracy": "Accuracy on the held-out batches.",
            "held_softmax_sc_fraction": "The softmax's collapse on the held-out batches (also after a switch to StableMax).",
        },
        (
            Chart("Softmax collapse", ("sc_fraction", "zero_loss_fraction", "softmax_sc_fraction", "held_sc_fraction",
                                       "held_zero_loss_fraction", "held_softmax_sc_fraction"), "fraction of samples", events=("stablemax", "orthograd")),
            Chart("Naive loss minimisation cos(θ, −∇L)", ("nlm_cos",), "cosine", events=("stablemax", "orthograd")),
            Chart("Max logit gap", ("max_logit_gap", "held_max_logit_gap"), "logit units"),
            Chart("Accuracy: training batch / held-out", ("train_accuracy", "held_accuracy"), "accuracy",
                  events=("stablemax", "orthograd")),
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
            "metric_ema": "The same metric for the (shadow) EMA of the weights (AutoEMA).",
            "loss": "Training loss over the same window.",
            "swing": "Relative swing of the metric, std(dJ)/|mean J| over the window: an alarm of its own (AutoEMA).",
            "swing_ema": "The same for the EMA of the weights (AutoEMA).",
            "ema_swing_ratio": "std(dJ online) / std(dJ EMA): how many times steadier the EMA is (AutoEMA acts from 3).",
            "amplification_ema": "A of the EMA's metric against the same loss (AutoEMA).",
        },
        (
            Chart("Variance amplification A: online vs EMA", ("amplification", "amplification_ema"), "A (ratio)",
                  events=("ema",)),
            Chart("Relative swing of the metric: online vs EMA", ("swing", "swing_ema"), "std(dJ) / |mean J|",
                  events=("ema",)),
            Chart("EMA steadiness std(dJ online) / std(dJ EMA)", ("ema_swing_ratio",), "ratio", events=("ema",)),
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
    """The chart of the catalogue that shows ``tag`` (``None`` when no chart does).

    >>> chart_for_tag("val_acc").title, chart_for_tag("dynscope/gva/amplification_ema").title
    ('Accuracy (train / validation)', 'Variance amplification A: online vs EMA')
    """
    name = group_of(tag)
    group = GROUPS.get(USER if name is None else name)
    if group is None:
        return None
    for chart in group.charts:
        if chart.matches(group.name, tag):
            return chart
    return None
