"""What each diagnostic measures, declared once next to its math: the metric vocabulary.

Every core diagnostic module declares the metrics it produces as a :class:`Metrics` constant
named ``METRICS``: for each metric its name, what it means (one line), its unit, whether it also
comes per layer (``name/<layer>``) and the chart that draws it. The callbacks log these names under
``dynscope/<group>/``; the dashboards (:mod:`dynscope.dashboards.groups`) take the descriptions,
units and per-layer flags from here and add the layout (titles, overlays, reference lines); a test
checks that every declared metric has a chart and every charted metric is declared.

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

import importlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

__all__ = ["DECLARING_MODULES", "Metric", "Metrics", "declarations"]


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


#: The 0/1 switches the mitigating callbacks log (the mitigations themselves are in :mod:`dynscope.nn`,
#: :mod:`dynscope.optim` and :mod:`dynscope.amplification`).
METRICS = Metrics(
    "mitigation",
    Metric("stablemax", "StableMax cross-entropy in place of softmax (against softmax collapse).", "0/1", chart="active"),
    Metric("orthograd", "Orthogonal gradient (the component along the weights removed).", "0/1", chart="active"),
    Metric("ema", "EMA of the weights used for evaluation (against variance amplification).", "0/1", chart="active"),
    Metric("zloss", "z-loss 1e-4·(log Z)² added to the loss (against output-logit divergence).", "0/1", chart="active"),
)

#: The core modules declaring a ``METRICS`` constant (several may add to one group).
DECLARING_MODULES = (
    "dynscope.curvature_metrics", "dynscope.noise", "dynscope.collapse", "dynscope.regions",
    "dynscope.amplification", "dynscope.attention", "dynscope.logits", "dynscope.spikes", "dynscope.metrics",
)


def declarations() -> Dict[str, Metrics]:
    """Every group's declared metrics, ``{group: Metrics}``, in :data:`DECLARING_MODULES` order."""
    out: Dict[str, Metrics] = {}
    for module in DECLARING_MODULES:
        declared: Metrics = importlib.import_module(module).METRICS
        out[declared.group] = out[declared.group] + declared if declared.group in out else declared
    return out
