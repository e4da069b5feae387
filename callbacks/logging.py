"""Writing dynscope scalars and text entries through the trainer's loggers (rank zero only)."""

from __future__ import annotations

import functools
import math
import weakref
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
    There all of one call goes into one event (what ``log_metrics``, ``add_scalar`` and
    ``add_histogram`` would write, value by value): an event per value cost 1-2 ms for the 20 tags of
    one measurement, as much as the measurement of a small model, mostly waiting for the writer's
    queue of ten events to drain.
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
        writer = _event_writer(logger)
        if writer is not None:
            _write_event(logger, writer, clean, line, layers, step)
            continue
        logger.log_metrics(clean, step=step)
        if isinstance(logger, TensorBoardLoggerTypes):
            if line:  # TensorBoard's way to draw the stability line
                logger.experiment.add_scalar(STABILITY_LINE_TAG, 1.0, step)
            for key, values in layers.items():  # one distribution over the layers instead of a line per layer
                logger.experiment.add_histogram(key, np.asarray(values, dtype=np.float64), step)


_BINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # a writer's histogram bins as an array


def _event_writer(logger):
    """The event-file writer of a TensorBoard logger whose experiment is torch's ``SummaryWriter``
    (None for other loggers, and for tensorboardX's writer, which gets the calls value by value)."""
    if not isinstance(logger, TensorBoardLoggerTypes):
        return None
    from torch.utils.tensorboard import SummaryWriter  # (imported by the logger already)

    experiment = logger.experiment
    if not isinstance(experiment, SummaryWriter) or not hasattr(experiment, "_get_file_writer"):
        return None
    if experiment not in _BINS:  # (add_histogram converts its list of ~1,500 edges at every call)
        _BINS[experiment] = np.asarray(experiment.default_bins, dtype=np.float64)
    return experiment


def _write_event(logger, writer, clean: Mapping[str, float], line: bool, layers: Mapping[str, List[float]], step: int) -> None:
    """One event holding the values ``log_metrics`` (with the logger's prefix), the stability line
    and the layer histograms would have written one event each."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    prefix = getattr(logger, "_prefix", "")
    join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
    values = [Summary.Value(tag=f"{prefix}{join}{k}" if prefix else k, simple_value=v) for k, v in clean.items()]
    if line:
        values.append(Summary.Value(tag=STABILITY_LINE_TAG, simple_value=1.0))
    bins = _BINS[writer]
    for key, layer_values in layers.items():
        histo = histogram_proto(np.asarray(layer_values, dtype=np.float64), bins)
        if histo is not None:
            values.append(Summary.Value(tag=key, histo=histo))
    writer._get_file_writer().add_summary(Summary(value=values), step)  # (what add_scalar calls)


def histogram_proto(values: np.ndarray, edges: np.ndarray):
    """The distribution ``SummaryWriter.add_histogram(..., bins=edges)`` writes for ``values`` (finite),
    with every run of empty bins between two values as one empty bucket; None where no value lies
    within the edges (add_histogram raises there).

    The buckets' counts over any range of the edges are add_histogram's, as are ``min``, ``max``,
    ``num``, ``sum`` and ``sum_squares``: TensorBoard and the report draw the same bars. Its proto
    holds every bin between the smallest and the largest value, ~600 for signed per-layer values
    on torch's default bins, ~10 KB an event, whose checksum tensorboard's writer computes in pure
    Python (about 1 ms, in a thread that holds the interpreter's lock); and it counts all ~1,500
    bins (0.2 ms for a handful of values). Like add_histogram's, the first bucket is empty and
    ends where the first value's bin starts.

    Example:
        >>> h = histogram_proto(np.array([0.5, 2.5, 2.7]), np.arange(6.0))
        >>> list(h.bucket_limit), list(h.bucket), h.num, h.sum  # bins [0, 1) and [2, 3), nothing between
        ([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.0, 2.0], 3.0, 5.7)
        >>> list(histogram_proto(np.array([0.5, 4.5]), np.arange(6.0)).bucket_limit)  # one empty bucket for [1, 4)
        [0.0, 1.0, 4.0, 5.0]
    """
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    values = values.reshape(-1)
    inside = values[(values >= edges[0]) & (values <= edges[-1])]  # np.histogram drops the others
    if inside.size == 0:
        return None
    # bin i holds edges[i] <= v < edges[i + 1]; the last bin is closed on the right too
    index = np.minimum(np.searchsorted(edges, inside, side="right") - 1, edges.size - 2)
    bins, counts = np.unique(index, return_counts=True)
    limits, bucket = [float(edges[bins[0]])], [0.0]
    for i, (b, count) in enumerate(zip(bins.tolist(), counts.tolist())):
        if i and b > bins[i - 1] + 1:  # empty bins since the previous value's: one empty bucket
            limits.append(float(edges[b]))
            bucket.append(0.0)
        limits.append(float(edges[b + 1]))
        bucket.append(float(count))
    return HistogramProto(min=values.min(), max=values.max(), num=len(values), sum=values.sum(),
                          sum_squares=values.dot(values), bucket_limit=limits, bucket=bucket)


def log_text(trainer, name: str, text: str, step: int) -> None:
    """A text entry (TensorBoard's Text tab) on loggers that support it; others are skipped."""
    if not is_global_zero(trainer):
        return
    for logger in getattr(trainer, "loggers", []) or []:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text(name, text, global_step=step)
