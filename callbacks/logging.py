"""Writing dynscope scalars and text entries through the trainer's loggers (rank zero only)."""

from __future__ import annotations

import functools
import math
from typing import Mapping

from dynscope.dashboards.groups import STABILITY_LINE_TAG, chart_for_tag

from ._lightning import TensorBoardLoggerTypes, is_global_zero

PREFIX = "dynscope"


@functools.lru_cache(maxsize=4096)
def _has_reference(name: str) -> bool:
    if not name.startswith(PREFIX + "/"):
        return False
    chart = chart_for_tag(name)
    return chart is not None and chart.reference is not None


def tag(group: str, metric: str, layer: str | None = None) -> str:
    """``dynscope/<group>/<metric>`` or ``dynscope/<group>/<metric>/<layer>``."""
    parts = [PREFIX, group, metric] + ([layer] if layer else [])
    return "/".join(parts)


def log_scalars(trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send finite scalars to every logger of the trainer, on global rank zero.

    A stability ratio (a tag whose chart has a reference line) brings the constant 1.0 series
    TensorBoard draws as that line along, at the same step, on TensorBoard loggers.
    """
    if not metrics or not is_global_zero(trainer):
        return
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if not clean:
        return
    line = any(_has_reference(k) for k in clean)
    for logger in getattr(trainer, "loggers", []) or []:
        logger.log_metrics(clean, step=step)
        if line and isinstance(logger, TensorBoardLoggerTypes):  # TensorBoard's way to draw the line
            logger.experiment.add_scalar(STABILITY_LINE_TAG, 1.0, step)


def log_text(trainer, name: str, text: str, step: int) -> None:
    """A text entry (TensorBoard's Text tab) on loggers that support it; others are skipped."""
    if not is_global_zero(trainer):
        return
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(name, text, global_step=step)
