"""The catalogue of dynscope's TensorBoard tags: groups and charts over the core's metric declarations.

What each metric is (its one-line description, unit, whether it comes per layer, which chart draws
it) is declared by the diagnostics in :mod:`dynscope.metrics`; this module adds the layout: group
titles and summaries, chart titles, axis labels, reference lines, bands and the mitigation
overlays. A main chart lists no metrics of its own: it draws those the declarations put on its key
(:func:`_on`). One source of truth for the custom-scalars layout (:mod:`dynscope.dashboards.layout`)
and the static report (:mod:`dynscope.dashboards.report`). Every chart knows the regular expression
of the tags it shows, so per-layer series (``dynscope/<group>/<metric>/<layer>``) group themselves.

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

import functools
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from dynscope.metrics import DECLARED, Metrics

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
        return _compiled(self, group).match(tag) is not None

    def event_regex(self) -> Optional[str]:
        """The regex of the mitigations' 0/1 series overlaid on this chart in TensorBoard."""
        if not self.events:
            return None
        return rf"^{PREFIX}/mitigation/({'|'.join(map(re.escape, self.events))})$"


@functools.lru_cache(maxsize=1024)
def _compiled(chart: Chart, group: str) -> "re.Pattern[str]":
    """A chart's tag regex, compiled once (``re``'s own cache holds 512 patterns; every new tag a
    measurement logs is matched against each chart of its group)."""
    return re.compile(chart.regex(group))


@dataclass(frozen=True)
class Group:
    """A dashboard category: title, a one-paragraph summary, metric descriptions, charts.

    For dynscope's own groups the descriptions and ``table_only`` come from the core's
    declarations (``declared``, :mod:`dynscope.metrics`); the user's and the overhead group are
    described here.
    """

    name: str
    title: str
    summary: str
    metrics: Dict[str, str] = field(default_factory=dict)
    charts: Tuple[Chart, ...] = ()
    table_only: Tuple[str, ...] = ()  # metrics in the final-values table but in no chart
    user: bool = False  # the module's own logged metrics (tags outside dynscope/)
    # (metric, another metric) -> the metric's description in runs that logged the other one
    metrics_when: Dict[Tuple[str, str], str] = field(default_factory=dict)
    declared: Optional[Metrics] = field(default=None, compare=False)  # the core's declarations of this group

    def unit(self, metric: str) -> str:
        """The declared unit of ``metric`` (``""`` when undeclared or a pure number)."""
        return self.declared[metric].unit if self.declared is not None and metric in self.declared else ""

    @property
    def main_charts(self) -> Tuple[Chart, ...]:
        return tuple(c for c in self.charts if not c.per_layer)

    @property
    def layer_charts(self) -> Tuple[Chart, ...]:
        return tuple(c for c in self.charts if c.per_layer)


def _on(group: str, chart: str) -> Tuple[str, ...]:
    """The metrics the core declares on ``chart`` of ``group`` (the chart's overlaid series, in order)."""
    return DECLARED[group].on_chart(chart)


def _layers(group: str, *metrics: str) -> Tuple[str, ...]:
    """``metrics`` for a per-layer chart, each checked to be declared per layer."""
    return DECLARED[group].per_layer(*metrics)


def _declared_group(name: str, title: str, summary: str, charts: Tuple[Chart, ...], **kwargs) -> Group:
    """A group whose metric descriptions and table-only metrics come from the core's declarations."""
    declared = DECLARED[name]
    return Group(name, title, summary, declared.descriptions(), charts,
                 tuple(m.name for m in declared if m.table_only), declared=declared, **kwargs)


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
    _declared_group(
        "curvature",
        "Curvature",
        "How sharp the loss surface is where the optimizer stands, against the step size it can take stably.",
        (
            Chart("Hessian trace tr(H)", _on("curvature", "trace"), "tr(H)", band="hessian_trace_stderr"),
            Chart("Edge-of-stability ratio (stable < 1)", _on("curvature", "eos_ratio"), "sharpness / threshold",
                  reference=1.0),
            Chart("Top eigenvalue λ_max", _on("curvature", "lambda_max"), "eigenvalue", threshold="eos_threshold",
                  threshold_unless="preconditioned_lambda_max"),
            Chart("Preconditioned sharpness λ_max(P⁻¹H) (Adam)", _on("curvature", "preconditioned"), "eigenvalue",
                  threshold="eos_threshold"),
            Chart("EoS threshold", _on("curvature", "eos_threshold"), "threshold"),
            Chart("Trace stability ratio lr·tr(H)/2 (stable ≤ 1)", _on("curvature", "trace_ratio"), "lr·tr(H)/2",
                  reference=1.0),
            Chart("Batch-size-aware stability lr((1−k)λ_max + k·tr H)/a* (stable ≤ 1)",
                  _on("curvature", "linear_stability"), "ratio", reference=1.0),
            Chart("Batch sharpness / threshold (minibatch EoS at 1)", _on("curvature", "batch_sharpness_ratio"), "ratio",
                  reference=1.0),
            Chart("Directional sharpness", _on("curvature", "directional"), "vᵀHv / ‖v‖²"),
            Chart("Spectrum edges λ_min", _on("curvature", "lambda_min"), "eigenvalue"),
            Chart("Spectral density", _on("curvature", "density"), "value"),
            Chart("Top-k eigenvalues", _layers("curvature", "eigenvalues"), "eigenvalue", per_layer=True),
            Chart("Hessian trace per layer", _layers("curvature", "hessian_trace"), "tr(H) of the block", per_layer=True),
            Chart("λ_max per layer (block Hessian)", _layers("curvature", "lambda_max"), "λ_max of the block",
                  per_layer=True),
            Chart("EoS ratio per param group", _layers("curvature", "eos_ratio"), "ratio of the group's block",
                  per_layer=True, reference=1.0),
        ),
        metrics_when={
            ("eos_threshold", "preconditioned_lambda_max"):
                "Edge-of-stability threshold of Adam, (2+2β₁)/((1−β₁)·lr), against the preconditioned sharpness "
                "λ_max(P⁻¹H) with the bias-corrected second moments as P (Cohen et al. 2022).",
            ("eos_ratio", "preconditioned_lambda_max"):
                "Preconditioned sharpness / Adam's threshold: hovers at 1 at the edge of stability, above 1 is unstable.",
        },
    ),
    _declared_group(
        "noise",
        "Gradient noise",
        "How much of the mini-batch gradient is signal and how large a batch the noise calls for.",
        (
            Chart("Gradient signal-to-noise ratio", _on("noise", "gsnr"), "mean GSNR"),
            Chart("Gradient noise scale B_simple", _on("noise", "noise_scale"), "samples"),
            Chart(
                "Noise scale / batch size (critical = 1)", _on("noise", "over_batch"), "B_simple / B", reference=1.0,
                reference_label="batch = noise scale", shade_above=False,
            ),
            Chart("Gradient norm", _on("noise", "grad_norm"), "‖g‖"),
            Chart("GSNR per layer", _layers("noise", "gsnr"), "mean GSNR", per_layer=True),
            Chart("Block g-SNR per layer", _layers("noise", "block_gsnr"), "‖g‖ / std(g)", per_layer=True),
        ),
    ),
    _declared_group(
        "collapse",
        "Softmax collapse",
        "Whether the softmax saturates in floating point, zeroing losses and gradients (Prieto et al. 2025).",
        (
            Chart("Softmax collapse", _on("collapse", "collapse"), "fraction of samples",
                  events=("stablemax", "orthograd")),
            Chart("Naive loss minimisation cos(θ, −∇L)", _on("collapse", "nlm"), "cosine",
                  events=("stablemax", "orthograd")),
            Chart("Max logit gap", _on("collapse", "gap"), "logit units"),
            Chart("Accuracy: training batch / held-out", _on("collapse", "accuracy"), "accuracy",
                  events=("stablemax", "orthograd")),
            Chart("NLM cosine per layer", _layers("collapse", "nlm_cos"), "cosine", per_layer=True),
        ),
    ),
    _declared_group(
        "regions",
        "Linear regions",
        "Local complexity: neurons whose ReLU pattern changes near a point (Humayun et al. 2024).",
        (
            Chart("Local complexity: train / test / random", _on("regions", "lc"), "neurons crossing", suffix=_RADIUS),
            Chart("Local complexity per layer", _layers("regions", "lc_train", "lc_test", "lc_random"), "neurons crossing",
                  per_layer=True, suffix=_RADIUS),
        ),
    ),
    _declared_group(
        "gva",
        "Amplification",
        "Gradient variance amplification: small loss changes, large swings of a long-horizon metric (Block et al. 2023).",
        (
            Chart("Variance amplification A: online vs EMA", _on("gva", "amplification"), "A (ratio)", events=("ema",)),
            Chart("Relative swing of the metric: online vs EMA", _on("gva", "swing"), "std(dJ) / |mean J|",
                  events=("ema",)),
            Chart("EMA steadiness std(dJ online) / std(dJ EMA)", _on("gva", "steadiness"), "ratio", events=("ema",)),
            Chart("Long-horizon metric: online vs EMA", _on("gva", "metric"), "metric"),
            Chart("Training loss", _on("gva", "loss"), "loss"),
        ),
    ),
    _declared_group(
        "attention",
        "Attention",
        "Attention-logit growth and entropy collapse per attention layer (Wortsman et al. 2023; Zhai et al. 2023).",
        (
            Chart("Largest attention logit", _on("attention", "max_logit"), "|q·k|·scale"),
            Chart("Attention entropy", _on("attention", "entropy"), "nats"),
            Chart("Largest attention logit per layer", _layers("attention", "max_logit"), "|q·k|·scale", per_layer=True),
            Chart("Minimum attention entropy per layer", _layers("attention", "entropy_min"), "nats", per_layer=True),
            Chart("Mean attention entropy per layer", _layers("attention", "entropy_mean"), "nats", per_layer=True),
            Chart("Largest attention logit per head", _layers("attention", "head_max_logit"), "|q·k|·scale",
                  per_layer=True),
            Chart("Minimum attention entropy per head", _layers("attention", "head_entropy_min"), "nats", per_layer=True),
        ),
    ),
    _declared_group(
        "logits",
        "Output logits",
        "The level of the output logits, which cross-entropy does not see: log Z drifting away is the output-logit "
        "divergence the z-loss fixes (Wortsman et al. 2023).",
        (
            Chart("log Z of the output logits", _on("logits", "log_z"), "log Z"),
            Chart("log Z drift since the first measurement", _on("logits", "drift"), "nats"),
            Chart("Largest output logit", _on("logits", "max_logit"), "logit"),
            Chart("z-loss term mean((log Z)²)", _on("logits", "z_loss"), "(log Z)²"),
        ),
    ),
    _declared_group(
        "spikes",
        "Loss spikes",
        "Loss spikes and what caused them: the sharpest direction at the pre-spike weights and the samples whose "
        "gradients oppose each other along it (Rosenfeld & Risteski 2023).",
        (
            Chart("Loss z-score (robust)", _on("spikes", "zscore"), "robust std above median"),
            Chart("Spikes detected", _on("spikes", "detected"), "spike", steps=True),
            Chart("Top Hessian eigenvalue at spikes", _on("spikes", "lambda_max"), "λ_max"),
            Chart("Opposing signals along v", _on("spikes", "opposition"), "opposition"),
            Chart("Per-sample projections on v", _on("spikes", "projections"), "gᵢ·v"),
        ),
    ),
    _declared_group(
        "mitigation",
        "Mitigations",
        "What dynscope switched on: 1 while a mitigation is active, 0 otherwise.",
        (Chart("Mitigations active (0/1)", _on("mitigation", "active"), "active", steps=True,
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
