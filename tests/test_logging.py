"""What ``log_scalars`` writes to TensorBoard: the values the logger's own calls would write, one event per call."""

from __future__ import annotations

import glob
from types import SimpleNamespace

import numpy as np
import pytest

from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from dynscope.callbacks.logging import histogram_proto, log_scalars
from dynscope.dashboards.groups import STABILITY_LINE_TAG
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

METRICS = {
    "dynscope/noise/gsnr": 0.25,
    "dynscope/noise/gsnr/net.0.weight": 0.5,
    "dynscope/noise/gsnr/net.0.bias": 2.0,
    "dynscope/curvature/eos_ratio": 0.75,  # a stability ratio: the 1.0 line comes along
    "dynscope/noise/grad_norm": float("nan"),  # not finite: left out
}


def _trainer(*loggers):
    return SimpleNamespace(loggers=list(loggers), is_global_zero=True, global_rank=0)


def _events(log_dir):
    """``[(step, [(tag, value or histogram buckets), ...]), ...]``, one entry per event with a summary."""
    out = []
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        for event in LegacyEventFileLoader(path).Load():
            if event.HasField("summary"):
                out.append((event.step, [(v.tag, v.simple_value if v.HasField("simple_value") else _distribution(v.histo))
                                         for v in event.summary.value]))
    return out


def _distribution(histo):
    """What a histogram says: its statistics and its non-empty buckets ``(left, right, count)``."""
    lefts = [histo.min] + list(histo.bucket_limit[:-1])
    buckets = tuple((left, right, count) for left, right, count in zip(lefts, histo.bucket_limit, histo.bucket) if count)
    return histo.min, histo.max, histo.num, histo.sum, histo.sum_squares, buckets


def _by_tag(events):
    return sorted((step, tag, value) for step, values in events for tag, value in values)


@pytest.mark.parametrize("prefix", ["", "run"])
def test_one_event_per_call_with_the_values_the_logger_calls_write(tmp_path, prefix):
    ours = TensorBoardLogger(tmp_path, name="ours", prefix=prefix)
    for step in (3, 7):
        log_scalars(_trainer(ours), METRICS, step)
    ours.experiment.flush()

    # the reference: what Lightning's log_metrics and the writer's own add_scalar / add_histogram write
    reference = TensorBoardLogger(tmp_path, name="reference", prefix=prefix)
    finite = {k: v for k, v in METRICS.items() if v == v}
    for step in (3, 7):
        reference.log_metrics(finite, step=step)
        reference.experiment.add_scalar(STABILITY_LINE_TAG, 1.0, step)
        reference.experiment.add_histogram("dynscope/layers/noise/gsnr", np.array([0.5, 2.0]), step)
    reference.experiment.flush()

    written, expected = _events(ours.log_dir), _events(reference.log_dir)
    assert [step for step, _ in written] == [3, 7]  # one event per call
    assert _by_tag(written) == _by_tag(expected)
    assert ("run-dynscope/noise/gsnr" if prefix else "dynscope/noise/gsnr") in {t for _, t, _ in _by_tag(written)}


def test_other_loggers_get_log_metrics(tmp_path):
    csv = CSVLogger(tmp_path, name="csv")
    log_scalars(_trainer(csv), METRICS, 5)
    csv.save()
    text = open(glob.glob(f"{csv.log_dir}/metrics.csv")[0]).read()
    header, row = text.strip().splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    assert float(values["dynscope/noise/gsnr/net.0.bias"]) == 2.0 and values["step"] == "5"
    assert "dynscope/noise/grad_norm" not in values


def test_histogram_proto_is_add_histograms_distribution_in_few_buckets(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import make_histogram

    writer = SummaryWriter(str(tmp_path))
    edges = np.asarray(writer.default_bins)
    writer.close()
    rng = np.random.default_rng(0)
    cases = [np.array([0.0]), np.array([1.0]), np.array([-3.0, 3.0]), edges[[700, 700, 701, 900]],  # on edges
             np.array([edges[-1]]), np.array([edges[0], 0.0])]
    cases += [rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6) for n in (1, 2, 5, 17, 100)]
    cases += [np.exp(rng.uniform(-20, 20, 30))]
    for values in cases:
        ours, theirs = histogram_proto(values, edges), make_histogram(values.astype(float), edges)
        assert _distribution(ours) == _distribution(theirs), values
        assert list(ours.bucket_limit) == sorted(set(ours.bucket_limit)) and set(ours.bucket_limit) <= set(theirs.bucket_limit)
        assert ours.bucket[0] == 0 and ours.bucket_limit[0] == theirs.bucket_limit[0]  # the empty one on the left
        assert len(ours.bucket) <= 2 * len(np.unique(values)) + 1  # a bucket per value's bin and per gap
    assert histogram_proto(np.array([1e30]), edges) is None  # outside every bin (add_histogram raises)

