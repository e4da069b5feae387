"""dynscope's dashboards: the TensorBoard custom-scalars layout and the static HTML report.

* :mod:`~dynscope.dashboards.groups` — the catalogue of groups and charts over the metrics :mod:`dynscope.metrics` declares.
* :mod:`~dynscope.dashboards.layout` — the custom-scalars layout proto (written by the callbacks).
* :mod:`~dynscope.dashboards.events` — reading event files; the text of mitigation events.
* :mod:`~dynscope.dashboards.report` — ``write_report(logdir, output)``, behind ``dynscope report``.

Importing this package is light (no matplotlib); the report's names load on first use.

Example:
    >>> from dynscope.dashboards import GROUPS, build_layout
    >>> [c.title for c in build_layout(["gva"]).category]
    ['Amplification']
"""

from .groups import GROUPS, STABILITY_LINE_TAG
from .layout import build_layout, layout_summary

__all__ = ["GROUPS", "STABILITY_LINE_TAG", "ReportError", "build_layout", "layout_summary", "write_report"]


def __getattr__(name):
    if name in ("ReportError", "write_report"):
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
