"""Writing dynscope scalars and text entries through the trainer's loggers (rank zero only)."""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Mapping, Optional

import numpy as np

from dynscope.dashboards.groups import STABILITY_LINE_TAG, chart_for_tag

from ._lightning import TensorBoardLoggerTypes, is_global_zero

PREFIX = "dynscope"


@functools.lru_cache(maxsize=8192)
def _layer_histogram(name: str) -> Optional[str]:
    """``dynscope/layers/<group>/<metric>[/r=...]`` for a per-layer tag, else ``None``."""
    if not name.startswith(PREFIX + "/"):
        return None
    chart = chart_for_tag(name)
    if chart is None or not chart.per_layer:
        return None
    parts = name.split("/")
    radius = [p for p in parts[4:] if p.startswith("r=")]
    return "/".join([PREFIX, "layers", parts[1], parts[2]] + radius)


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

    On TensorBoard loggers, a stability ratio (a tag whose chart has a reference line) brings the
    constant 1.0 series TensorBoard draws as that line along, and the per-layer values of a metric
    are also written as one histogram, ``dynscope/layers/<group>/<metric>`` (HISTOGRAMS tab: the
    spread over the layers at each measurement step, where the per-layer charts have a line per layer).
    """
    if not metrics or not is_global_zero(trainer):
        return
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if not clean:
        return
    line = any(_has_reference(k) for k in clean)
    layers: Dict[str, List[float]] = {}
    for k, v in clean.items():
        key = _layer_histogram(k)
        if key is not None:
            layers.setdefault(key, []).append(v)
    for logger in getattr(trainer, "loggers", []) or []:
        logger.log_metrics(clean, step=step)
        if isinstance(logger, TensorBoardLoggerTypes):
            if line:  # TensorBoard's way to draw the stability line
                logger.experiment.add_scalar(STABILITY_LINE_TAG, 1.0, step)
            for key, values in layers.items():  # one distribution over the layers instead of a line per layer
                logger.experiment.add_histogram(key, np.asarray(values, dtype=np.float64), step)


def log_text(trainer, name: str, text: str, step: int) -> None:
    """A text entry (TensorBoard's Text tab) on loggers that support it; others are skipped."""
    if not is_global_zero(trainer):
        return
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(name, text, global_step=step)
