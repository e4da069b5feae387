"""TensorBoard's custom-scalars layout for dynscope's groups.

One category per group (Curvature, Gradient noise, Softmax collapse, Linear regions,
Amplification, Mitigations, Overhead) with multiline charts whose tags are regular expressions,
so per-layer series group themselves; per-layer charts sit in a collapsed "<group> · per layer"
category. Charts of stability ratios also match :data:`STABILITY_LINE_TAG`, a constant 1.0
series, which TensorBoard draws as the stability line.

Example:
    >>> from dynscope.dashboards.layout import build_layout, layout_summary
    >>> layout = build_layout(["noise", "curvature"])
    >>> [c.title for c in layout.category]
    ['Curvature', 'Curvature · per layer', 'Gradient noise', 'Gradient noise · per layer']
    >>> layout.category[0].chart[0].multiline.tag[0]
    '^dynscope/curvature/(hessian_trace)$'
    >>> layout_summary(["noise"]).value[0].tag
    'custom_scalars__config__'
"""

from __future__ import annotations

from typing import Iterable, List

from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

from .groups import GROUPS, STABILITY_LINE_TAG, Chart

__all__ = ["STABILITY_LINE_TAG", "build_layout", "known_groups", "layout_summary", "needs_stability_line"]


def known_groups(groups: Iterable[str]) -> List[str]:
    """``groups`` restricted to the catalogue, in display order (unknown names are dropped)."""
    wanted = set(groups)
    return [name for name in GROUPS if name in wanted]


def needs_stability_line(groups: Iterable[str]) -> bool:
    """Whether any chart of these groups draws a stability line."""
    return any(c.reference is not None for name in known_groups(groups) for c in GROUPS[name].charts)


def _chart(group: str, chart: Chart) -> layout_pb2.Chart:
    tags = [chart.regex(group)]
    if chart.reference is not None:
        tags.append("^" + STABILITY_LINE_TAG + "$")
    if chart.event_regex():
        tags.append(chart.event_regex())
    return layout_pb2.Chart(title=chart.title, multiline=layout_pb2.MultilineChartContent(tag=tags))


def build_layout(groups: Iterable[str]) -> layout_pb2.Layout:
    """The layout proto for these groups (catalogue order; per-layer charts in closed categories)."""
    categories = []
    for name in known_groups(groups):
        group = GROUPS[name]
        categories.append(layout_pb2.Category(title=group.title, chart=[_chart(name, c) for c in group.main_charts]))
        if group.layer_charts:
            categories.append(
                layout_pb2.Category(
                    title=f"{group.title} · per layer", closed=True, chart=[_chart(name, c) for c in group.layer_charts]
                )
            )
    return layout_pb2.Layout(category=categories)


def layout_summary(groups: Iterable[str]) -> Summary:
    """A ``Summary`` proto carrying the layout, ready for a file writer's ``add_summary``."""
    return _summary(build_layout(groups))


def _summary(layout: layout_pb2.Layout) -> Summary:
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    meta = metadata.create_summary_metadata()
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=meta)])
