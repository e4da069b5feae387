"""The metric vocabulary: what each diagnostic measures, declared once.

Every core diagnostic declares the metrics it produces as a :class:`Metrics` (one per tag group,
e.g. :data:`COLLAPSE`; the diagnostic's module binds it as ``METRICS``, so
``dynscope.collapse.METRICS is dynscope.metrics.COLLAPSE``): for each metric its name, what it means
(one line), its unit, whether it also comes per layer (``name/<layer>``) and the chart that draws
it. The callbacks log these names under ``dynscope/<group>/``; the dashboards
(:mod:`dynscope.dashboards.groups`) take the descriptions, units and per-layer flags from here and
add the layout (titles, overlays, reference lines); a test checks that every declared metric has a
chart and every charted metric is declared. This module imports neither torch nor the rest of the
core, so that the dashboards and the report read the vocabulary without importing torch.

Example:
    >>> from dynscope.metrics import Metric, Metrics, declarations
    >>> toy = Metrics("toy", Metric("ratio", "a / b.", "ratio", chart="ratio"),
    ...               Metric("norm", "Norm of the gradient.", "‖g‖", per_layer=True, chart="norm"))
    >>> toy["norm"].per_layer, toy.names
    (True, ('ratio', 'norm'))
    >>> toy.on_chart("ratio")
    ('ratio',)
    >>> declarations()["collapse"]["sc_fraction"].unit
    'fraction of samples'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

__all__ = ["ATTENTION", "COLLAPSE", "CURVATURE", "DECLARED", "GVA", "LOGITS", "MITIGATION", "Metric", "Metrics", "NOISE",
           "REGIONS", "SPIKES", "declarations"]


@dataclass(frozen=True)
class Metric:
    """One metric a diagnostic produces.

    Attributes:
        name: the metric's name inside its group (the tag is ``dynscope/<group>/<name>``).
        description: what it means, in one line.
        unit: its unit (``""``: a pure number).
        per_layer: also produced per layer (per parameter tensor, layer or head) as ``<name>/<layer>``.
        chart: the key of the chart that draws its overall series; metrics sharing a key are
            overlaid on one chart. ``None``: no overall chart (a value for the final-values table
            only, or a metric that exists per layer only: see ``layer_only``).
        layer_only: there is no overall series, only ``<name>/<layer>`` (implies ``per_layer``).
    """

    name: str
    description: str
    unit: str = ""
    per_layer: bool = False
    chart: Optional[str] = None
    layer_only: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"a metric name is one tag component, got {self.name!r}")
        if self.layer_only and (not self.per_layer or self.chart is not None):
            raise ValueError(f"{self.name}: a layer_only metric is per_layer and has no overall chart")

    @property
    def table_only(self) -> bool:
        """An overall value with no chart: listed in the final-values table only."""
        return self.chart is None and not self.layer_only


class Metrics:
    """The metrics one diagnostic group declares, in display order.

    ``group`` is the tag group (``dynscope/<group>/...``). Indexing by name gives the
    :class:`Metric`; iteration yields them in order.
    """

    def __init__(self, group: str, *metrics: Metric) -> None:
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"{group}: duplicate metric names {sorted(n for n in names if names.count(n) > 1)}")
        self.group = group
        self.metrics: Tuple[Metric, ...] = tuple(metrics)
        self._by_name = {m.name: m for m in metrics}

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Metric:
        return self._by_name[name]

    def __add__(self, other: "Metrics") -> "Metrics":
        if other.group != self.group:
            raise ValueError(f"cannot join the metrics of {self.group!r} and {other.group!r}")
        return Metrics(self.group, *self.metrics, *other.metrics)

    def __repr__(self) -> str:
        return f"Metrics({self.group!r}, {', '.join(self.names)})"

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self._by_name)

    def on_chart(self, key: str) -> Tuple[str, ...]:
        """The names of the metrics drawn on chart ``key``, in declaration order."""
        names = tuple(m.name for m in self.metrics if m.chart == key)
        if not names:
            raise KeyError(f"{self.group}: no metric is declared on chart {key!r}")
        return names

    def per_layer(self, *names: str) -> Tuple[str, ...]:
        """``names`` after checking that each is declared per layer (for a per-layer chart)."""
        for name in names:
            if not self[name].per_layer:
                raise ValueError(f"{self.group}/{name} is not declared per layer")
        return names

    def descriptions(self) -> Dict[str, str]:
        """``{name: description}`` in order."""
        return {m.name: m.description for m in self.metrics}


# -- the declarations, one constant per group -----------------------------------------------------------------

CURVATURE = Metrics(
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



NOISE = Metrics(
    "noise",
    Metric("gsnr", "Mean gradient signal-to-noise ratio mean(g)²/var(g) per coordinate (Liu et al. 2020).", "ratio",
           per_layer=True, chart="gsnr"),
    Metric("block_gsnr", "Block g-SNR ‖g_p‖/std(g_p) per parameter tensor (SGD-SaI, Xu et al. 2024).", "‖g‖/std(g)",
           per_layer=True, layer_only=True),
    Metric("noise_scale", "Simple gradient noise scale B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018).", "samples",
           chart="noise_scale"),
    Metric("critical_batch", "B_simple from unbiased tr(Σ) and ‖G‖² smoothed separately: the critical batch size.",
           "samples", chart="noise_scale"),
    Metric("noise_scale_two_batch", "Under DDP: B_simple from one rank's vs the all-reduced gradient (unbiased "
                                    "two-batch estimate, EMA-smoothed).", "samples", chart="noise_scale"),
    Metric("noise_scale_over_batch", "Smoothed B_simple / batch size: above 1, a larger batch still helps.", "ratio",
           chart="over_batch"),
    Metric("grad_norm", "Norm of the mini-batch gradient.", "‖g‖", chart="grad_norm"),
)



COLLAPSE = Metrics(
    "collapse",
    Metric("sc_fraction", "Fraction of samples whose top-class log-probability is exactly 0 in the loss in use "
                          "(its dtype).", "fraction of samples", chart="collapse"),
    Metric("zero_loss_fraction", "Fraction of samples with an exactly-zero loss (the loss in use).",
           "fraction of samples", chart="collapse"),
    Metric("softmax_sc_fraction", "The softmax's collapse fraction, also after a switch to StableMax (how far the "
                                  "logits grew).", "fraction of samples", chart="collapse"),
    Metric("nlm_cos", "cos(θ, −∇L): positive when the gradient just scales the weights (naive loss minimisation).",
           "cosine", per_layer=True, chart="nlm"),
    Metric("max_logit_gap", "Mean over samples of the gap between the top logit and the runner-up.", "logit units", chart="gap"),
    Metric("train_accuracy", "Training accuracy on the measured batch.", "accuracy", chart="accuracy"),
    Metric("held_sc_fraction", "Softmax collapse on held-out (validation) batches (held_data='val').",
           "fraction of samples", chart="collapse"),
    Metric("held_zero_loss_fraction", "Exactly-zero losses on the held-out batches.", "fraction of samples",
           chart="collapse"),
    Metric("held_max_logit_gap", "Mean logit gap on the held-out batches.", "logit units", chart="gap"),
    Metric("held_accuracy", "Accuracy on the held-out batches.", "accuracy", chart="accuracy"),
    Metric("held_softmax_sc_fraction", "The softmax's collapse on the held-out batches (also after a switch to "
                                       "StableMax).", "fraction of samples", chart="collapse"),
)


REGIONS = Metrics(
    "regions",
    Metric("lc_train", "Local complexity around training points (falls, rises, falls while grokking).",
           "neurons crossing", per_layer=True, chart="lc"),
    Metric("lc_test", "Local complexity around test points.", "neurons crossing", per_layer=True, chart="lc"),
    Metric("lc_random", "Local complexity around random points.", "neurons crossing", per_layer=True, chart="lc"),
)


GVA = Metrics(
    "gva",
    Metric("amplification", "A = relative spread of the metric's changes / that of the loss's changes.", "ratio",
           chart="amplification"),
    Metric("metric", "The long-horizon metric of the online weights.", "metric", chart="metric"),
    Metric("metric_ema", "The same metric for the (shadow) EMA of the weights (AutoEMA).", "metric", chart="metric"),
    Metric("loss", "Training loss over the same window.", "loss", chart="loss"),
    Metric("swing", "Relative swing of the metric, std(dJ)/|mean J| over the window: an alarm of its own (AutoEMA).",
           "ratio", chart="swing"),
    Metric("swing_ema", "The same for the EMA of the weights (AutoEMA).", "ratio", chart="swing"),
    Metric("ema_swing_ratio", "std(dJ online) / std(dJ EMA): how many times steadier the EMA is (AutoEMA acts from 3).",
           "ratio", chart="steadiness"),
    Metric("amplification_ema", "A of the EMA's metric against the same loss (AutoEMA).", "ratio",
           chart="amplification"),
)


ATTENTION = Metrics(
    "attention",
    Metric("max_logit", "Largest |q·k|·scale over the attended positions (scale = 1/√d unless the layer sets it).",
           "|q·k|·scale", per_layer=True, chart="max_logit"),
    Metric("entropy_min", "Smallest entropy (nats) of a query's attention distribution: near 0, attention sits on "
                          "one token.", "nats", per_layer=True, chart="entropy"),
    Metric("entropy_mean", "Mean attention entropy over the batch's queries.", "nats", per_layer=True, chart="entropy"),
    Metric("head_max_logit", "Largest attention logit of one head (per_head=True).", "|q·k|·scale", per_layer=True,
           layer_only=True),
    Metric("head_entropy_min", "Smallest attention entropy of one head (per_head=True).", "nats", per_layer=True,
           layer_only=True),
)


LOGITS = Metrics(
    "logits",
    Metric("log_z_mean", "Mean log Z = logsumexp of the output logits over the positions.", "log Z", chart="log_z"),
    Metric("log_z_max", "Largest log Z of a position.", "log Z", chart="log_z"),
    Metric("log_z_min", "Smallest log Z of a position.", "log Z", chart="log_z"),
    Metric("log_z_drift", "log_z_mean minus its value at the first measurement (AutoZLoss acts on it).", "nats",
           chart="drift"),
    Metric("max_logit", "Largest output logit.", "logit", chart="max_logit"),
    Metric("z_loss", "mean((log Z)²): the z-loss per unit coefficient.", "(log Z)²", chart="z_loss"),
)


SPIKES = Metrics(
    "spikes",
    Metric("loss_zscore", "Training loss in robust standard deviations (1.4826·MAD) above the running median.",
           "robust std", chart="zscore"),
    Metric("detected", "1 at each detected spike.", "0/1", chart="detected"),
    Metric("zscore", "Robust z-score of the spiking loss.", "robust std", chart="zscore"),
    Metric("loss", "The spiking loss.", "loss"),
    Metric("lambda_max", "Top Hessian eigenvalue at the pre-spike weights (spiking and recent batches).", "eigenvalue",
           chart="lambda_max"),
    Metric("opposition", "1 − |Σ gᵢ·v| / Σ |gᵢ·v|: near 1 when opposing samples cancel along v.", "fraction",
           chart="opposition"),
    Metric("top_positive", "Largest per-sample projection gᵢ·v.", "gᵢ·v", chart="projections"),
    Metric("top_negative", "Most negative per-sample projection gᵢ·v.", "gᵢ·v", chart="projections"),
    Metric("grad_projection", "Batch gradient along the top eigenvector v.", "gᵢ·v", chart="projections"),
    Metric("projection_std", "Spread of the per-sample projections.", "gᵢ·v", chart="projections"),
)


#: The 0/1 switches the mitigating callbacks log (the mitigations themselves are in :mod:`dynscope.nn`,
#: :mod:`dynscope.optim` and :mod:`dynscope.amplification`).
MITIGATION = Metrics(
    "mitigation",
    Metric("stablemax", "StableMax cross-entropy in place of softmax (against softmax collapse).", "0/1", chart="active"),
    Metric("orthograd", "Orthogonal gradient (the component along the weights removed).", "0/1", chart="active"),
    Metric("ema", "EMA of the weights used for evaluation (against variance amplification).", "0/1", chart="active"),
    Metric("zloss", "z-loss 1e-4·(log Z)² added to the loss (against output-logit divergence).", "0/1", chart="active"),
)


#: ``{group: Metrics}`` of every diagnostic, in dashboard order.
DECLARED: Dict[str, Metrics] = {m.group: m for m in (CURVATURE, NOISE, COLLAPSE, REGIONS, GVA, ATTENTION, LOGITS,
                                                      SPIKES, MITIGATION)}


def declarations() -> Dict[str, Metrics]:
    """Every group's declared metrics, ``{group: Metrics}`` (a copy of :data:`DECLARED`)."""
    return dict(DECLARED)
