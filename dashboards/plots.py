"""Matplotlib figures of the report: one PNG per group, one subplot per chart.

Mitigation events are vertical lines (solid when a mitigation switches on, dotted when off),
stability thresholds horizontal dashed lines over a lightly shaded unstable zone.

Example:
    >>> import numpy as np
    >>> from dynscope.dashboards.events import Series
    >>> panel = Panel("Edge-of-stability ratio", "λ_max / threshold",
    ...               {"eos_ratio": Series(np.arange(5), np.linspace(0.2, 1.1, 5))}, reference=1.0)
    >>> png = render_panels([panel], [Marker(3, "ema", "on")])
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .events import Series

_EVENT_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_MAX_LABELLED = 10


@dataclass
class Panel:
    """One subplot: its series by label, the y label and an optional stability line."""

    title: str
    ylabel: str
    series: Dict[str, Series] = field(default_factory=dict)
    reference: Optional[float] = None
    reference_label: str = "stability limit"
    shade_above: bool = True
    band: Optional[Series] = None  # standard error around the first series
    steps: bool = False
    threshold: Optional[Series] = None  # a threshold that moves with the step (e.g. with the learning rate)
    threshold_label: str = "threshold"


@dataclass(frozen=True)
class Marker:
    """A vertical event line: a mitigation switching ``on`` or ``off`` at ``step``."""

    step: int
    mitigation: str
    action: str


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plain_log_ticks(ax) -> None:
    """Tick labels of a log axis as plain numbers: its default labels are mathtext, which the
    figures turn off so that tag names with ``$`` stay plain text."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def render_panels(panels: Sequence[Panel], markers: Sequence[Marker] = (), ncols: int = 3) -> bytes:
    """The panels as one PNG (bytes). Tag names are drawn as plain text (``$`` is not math)."""
    plt = _pyplot()
    with plt.rc_context({"text.parse_math": False, "text.usetex": False}):
        return _render(plt, panels, markers, ncols)


def _render(plt, panels: Sequence[Panel], markers: Sequence[Marker], ncols: int) -> bytes:
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False, dpi=100)
    colors = _marker_colors(markers)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel, markers, colors)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = _marker_handles(plt, colors, markers)
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=8, frameon=False, ncol=min(len(handles), 4))
    fig.tight_layout(rect=(0, 0, 1, 0.94 if handles else 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _draw(ax, panel: Panel, markers: Sequence[Marker], colors: Dict[str, str]) -> None:
    items = list(panel.series.items())
    labelled = _labelled(items)
    for i, (label, s) in enumerate(items):
        style = dict(marker="o", markersize=3) if len(s.steps) <= 40 else {}
        if panel.steps:
            style["drawstyle"] = "steps-post"
        lines = ax.plot(s.steps, s.values, lw=1.4, label=label if label in labelled else None,
                        color=None if len(items) <= 10 else _plt_cmap(i, len(items)), **style)
        if i == 0 and panel.band is not None:
            _draw_band(ax, s, panel.band, lines[0].get_color())
    if panel.threshold is not None and len(panel.threshold.steps):
        ax.plot(panel.threshold.steps, panel.threshold.values, color="#c0392b", ls="--", lw=1.2,
                drawstyle="steps-post", label=panel.threshold_label)
        items_for_scale = items + [("threshold", panel.threshold)]
    else:
        items_for_scale = items
    values = np.concatenate([s.values for _, s in items_for_scale]) if items else np.array([])
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 1e3 and panel.reference is None:
        ax.set_yscale("log")
        plain_log_ticks(ax)
    if panel.reference is not None:
        label = f"{panel.reference_label} ({panel.reference:g})"
        ax.axhline(panel.reference, color="#c0392b", ls="--", lw=1.2, label=label)
        low, high = ax.get_ylim()
        high = max(high, panel.reference * 1.15)
        if panel.shade_above:
            ax.axhspan(panel.reference, high, color="#c0392b", alpha=0.06, lw=0)
        ax.set_ylim(min(low, 0.0) if low >= 0 else low, high)
    for m in markers:
        ax.axvline(m.step, color=colors[m.mitigation], ls="-" if m.action != "off" else ":", lw=1.1, alpha=0.8)
    title = panel.title
    if len(items) > len(labelled):
        title += f"\n({len(items)} series, {len(labelled)} largest labelled)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step", fontsize=9)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.25)
    if items and (len(items) > 1 or panel.reference is not None or panel.band is not None or panel.threshold is not None):
        ax.legend(fontsize=7, loc="best", framealpha=0.8)


def _draw_band(ax, s: Series, band: Series, color) -> None:
    err = dict(zip(band.steps.tolist(), band.values.tolist()))
    keep = [i for i, step in enumerate(s.steps.tolist()) if step in err]
    if not keep:
        return
    steps = s.steps[keep]
    values = s.values[keep]
    e = np.array([err[int(step)] for step in steps])
    ax.fill_between(steps, values - e, values + e, color=color, alpha=0.18, lw=0, label="± standard error")


def _labelled(items) -> set:
    if len(items) <= _MAX_LABELLED:
        return {label for label, _ in items}
    ranked = sorted(items, key=lambda kv: -abs(float(kv[1].values[-1])) if np.isfinite(kv[1].values[-1]) else 0.0)
    return {label for label, _ in ranked[:_MAX_LABELLED]}


def _plt_cmap(i: int, n: int):
    import matplotlib

    return matplotlib.colormaps["viridis"](i / max(n - 1, 1))


def _marker_colors(markers: Sequence[Marker]) -> Dict[str, str]:
    names: List[str] = []
    for m in markers:
        if m.mitigation not in names:
            names.append(m.mitigation)
    return {name: _EVENT_COLORS[i % len(_EVENT_COLORS)] for i, name in enumerate(names)}


def _marker_handles(plt, colors: Dict[str, str], markers: Sequence[Marker]):
    from matplotlib.lines import Line2D

    handles = []
    for name, color in colors.items():
        actions = {m.action for m in markers if m.mitigation == name}
        if actions - {"off"}:
            handles.append(Line2D([], [], color=color, lw=1.2, label=f"{name} on"))
        if "off" in actions:
            handles.append(Line2D([], [], color=color, lw=1.2, ls=":", label=f"{name} off"))
    return handles
