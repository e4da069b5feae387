"""The TensorBoard side: the custom-scalars layout, how the callbacks write it, mitigation events."""

from __future__ import annotations

import glob
import logging
import re

import pytest
import torch

import pytorch_lightning as pl
from dashboard_logs import run_logs  # noqa: F401 - the session fixture
from dynscope.callbacks import Curvature
from dynscope.callbacks.dashboard import log_mitigation_event, write_layout
from dynscope.dashboards.events import EVENTS_TAG, parse_event, read_logs
from dynscope.dashboards.groups import GROUPS, STABILITY_LINE_TAG, chart_for_tag
from dynscope.dashboards.layout import build_layout
from models import Classifier, classification_data, loader, mlp, trainer
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

# Every tag the product promises (issue #7), with a layer name or radius where it has one.
PROMISED_TAGS = [
    "dynscope/curvature/" + m for m in (
        "hessian_trace", "hessian_trace_stderr", "hessian_trace/net.0.weight", "lambda_max", "lambda_max_converged",
        "preconditioned_lambda_max", "eos_threshold", "eos_ratio", "trace_ratio", "update_sharpness", "grad_sharpness",
        "linear_stability_ratio", "batch_sharpness", "batch_sharpness_ratio", "update_sharpness_next",
        "update_sharpness_unclipped", "eigenvalues/0", "lambda_min", "lambda_max/net.0.weight", "eos_ratio/group0", "density_mass_negative",
        "density_moment2")
] + [
    "dynscope/noise/" + m for m in (
        "gsnr", "gsnr/net.0.weight", "block_gsnr/net.0.weight", "noise_scale", "noise_scale_over_batch", "critical_batch",
        "grad_norm", "noise_scale_two_batch")
] + [
    "dynscope/collapse/" + m for m in (
        "sc_fraction", "zero_loss_fraction", "nlm_cos", "nlm_cos/fc.weight", "max_logit_gap", "train_accuracy",
        "held_sc_fraction", "held_zero_loss_fraction", "held_max_logit_gap", "held_accuracy")
] + [
    "dynscope/regions/" + m for m in (
        "lc_train", "lc_test", "lc_random", "lc_train/net.1", "lc_test/r=0.1", "lc_random/net.1/r=0.5")
] + ["dynscope/gva/" + m for m in ("metric", "metric_ema", "amplification", "amplification_ema", "loss")] + [
    "dynscope/mitigation/" + m for m in ("stablemax", "orthograd", "ema")
] + ["dynscope/overhead"]


def layouts_in(log_dir):
    """Every custom-scalars layout written into the run's event files, in order."""
    found = []
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        for event in LegacyEventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    found.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
    return found


def charts(layout):
    return {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}


def test_every_promised_tag_has_a_place():
    for tag in PROMISED_TAGS:
        group = GROUPS[tag.split("/")[1]]
        metric = tag.split("/")[2] if tag.count("/") >= 2 else ""
        assert chart_for_tag(tag) is not None or metric in group.table_only, tag


def test_chart_regexes_pick_their_series_only():
    layout = build_layout(GROUPS)
    regexes = charts(layout)

    def shown_by(title):
        return sorted(t for t in PROMISED_TAGS if any(re.match(r, t) for r in regexes[title]))

    assert shown_by("Hessian trace tr(H)") == ["dynscope/curvature/hessian_trace"]
    assert shown_by("Hessian trace per layer") == ["dynscope/curvature/hessian_trace/net.0.weight"]
    assert shown_by("Local complexity: train / test / random") == [
        "dynscope/regions/lc_random", "dynscope/regions/lc_test", "dynscope/regions/lc_test/r=0.1",
        "dynscope/regions/lc_train"]
    assert shown_by("Local complexity per layer") == [
        "dynscope/regions/lc_random/net.1/r=0.5", "dynscope/regions/lc_train/net.1"]
    assert shown_by("Mitigations active (0/1)") == [f"dynscope/mitigation/{m}" for m in ("ema", "orthograd", "stablemax")]
    # each quantity on its own axis (Adam's threshold is 1e4 times an SGD-scale lambda_max)
    assert shown_by("Top eigenvalue λ_max") == ["dynscope/curvature/lambda_max"]
    assert shown_by("Preconditioned sharpness λ_max(P⁻¹H) (Adam)") == ["dynscope/curvature/preconditioned_lambda_max"]
    assert shown_by("EoS threshold") == ["dynscope/curvature/eos_threshold"]
    # a mitigation's switch is drawn on the charts it concerns
    assert shown_by("Softmax collapse") == sorted(
        ["dynscope/collapse/sc_fraction", "dynscope/collapse/zero_loss_fraction", "dynscope/collapse/held_sc_fraction",
         "dynscope/collapse/held_zero_loss_fraction", "dynscope/mitigation/stablemax", "dynscope/mitigation/orthograd"])
    assert "dynscope/mitigation/ema" in shown_by("Variance amplification A: online vs EMA")
    # the user's own series, train and validation, and nothing of dynscope's
    user = ["train_loss", "train_loss_epoch", "val_loss", "val_acc", "train_acc_step", "epoch", "hp_metric", "lr-SGD"]
    loss = [t for t in user if any(re.match(r, t) for r in regexes["Loss (train / validation)"])]
    acc = [t for t in user if any(re.match(r, t) for r in regexes["Accuracy (train / validation)"])]
    assert loss == ["train_loss", "train_loss_epoch", "val_loss"] and acc == ["val_acc", "train_acc_step"]
    assert not [t for t in PROMISED_TAGS if any(re.match(r, t) for r in regexes["Loss (train / validation)"])]
    for title in ("Edge-of-stability ratio (stable < 1)", "Trace stability ratio lr·tr(H)/2 (stable ≤ 1)",
                  "Noise scale / batch size (critical = 1)"):
        assert any(re.match(r, STABILITY_LINE_TAG) for r in regexes[title]), title


def test_layout_categories_follow_the_catalogue():
    layout = build_layout(["mitigation", "curvature", "not-a-group"])
    assert [(c.title, c.closed) for c in layout.category] == [
        ("Curvature", False), ("Curvature · per layer", True), ("Mitigations", False)]
    assert build_layout(["training"]).category[0].title == "Training (your metrics)"


def test_callbacks_write_one_merged_layout_per_run(run_logs):
    layouts = layouts_in(run_logs.log_dir)
    # curvature, noise, collapse, regions, gva, attention, logits, spikes, then mitigation + overhead: one rewrite per new group
    assert len(layouts) == 9
    assert [c.title for c in layouts[0].category] == ["Training (your metrics)", "Curvature", "Curvature · per layer"]
    assert [c.title for c in layouts[-1].category if not c.closed] == [
        "Training (your metrics)", "Curvature", "Gradient noise", "Softmax collapse", "Linear regions", "Amplification",
        "Attention", "Output logits", "Loss spikes", "Mitigations", "Overhead"]
    # the latest layout's regexes match series the run really logged
    run = read_logs(run_logs.log_dir)["."]
    regexes = charts(layouts[-1])
    eos = [t for t in run.scalars if any(re.match(r, t) for r in regexes["Edge-of-stability ratio (stable < 1)"])]
    assert sorted(eos) == ["dynscope/curvature/eos_ratio", STABILITY_LINE_TAG]
    # the line spans the run: step 0, max_steps, and every step a stability ratio was logged
    ratio_steps = set(run.scalars["dynscope/curvature/eos_ratio"].steps.tolist())
    ratio_steps |= set(run.scalars["dynscope/noise/noise_scale_over_batch"].steps.tolist())
    assert run.scalars[STABILITY_LINE_TAG].steps.tolist() == sorted(ratio_steps | {0, run_logs.max_steps})
    assert set(run.scalars[STABILITY_LINE_TAG].values.tolist()) == {1.0}
    # the user's loss is in the layout's Training group
    loss = [t for t in run.scalars if any(re.match(r, t) for r in regexes["Loss (train / validation)"])]
    assert loss == ["train_loss"]


def test_mitigation_event_text_reaches_tensorboard(run_logs):
    run = read_logs(run_logs.log_dir)["."]
    (step, text), = run.texts[EVENTS_TAG]
    assert step == 9
    assert parse_event(text) == {"mitigation": "stablemax", "action": "on", "step": 9,
                                 "reason": "softmax collapse 0.31 > 0.30", "values": {"sc_fraction": "0.31"}}
    series = run.scalars["dynscope/mitigation/stablemax"]
    assert series.values[series.steps < 9].max() == 0.0 and series.values[series.steps >= 9].min() == 1.0


def test_layouts_of_separate_runs_do_not_mix(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="solo", default_hp_metric=False)
    x, y = classification_data(32)
    run = trainer(max_steps=2, logger=logger, callbacks=[Curvature(every_n_steps=1, num_matvecs=2, eigen=False)])
    run.fit(Classifier(mlp()), loader(x, y))
    logger.experiment.flush()
    (layout,) = layouts_in(logger.log_dir)
    assert [c.title for c in layout.category] == ["Training (your metrics)", "Curvature", "Curvature · per layer"]


def test_without_tensorboard_nothing_is_written(tmp_path):
    csv = trainer(logger=pl.loggers.CSVLogger(str(tmp_path)), max_steps=1)
    assert write_layout(csv, ["curvature"]) is None
    assert write_layout(trainer(logger=False), ["curvature"]) is None
    log_mitigation_event(csv, "ema", True, "amplification 9 > 5", {"amplification": 9.0}, step=3)  # no add_text: skipped


@pytest.mark.parametrize("groups", [["curvature"], ["noise", "gva"]])
def test_write_layout_merges_repeated_calls(tmp_path, groups):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="merge")
    t = trainer(logger=logger, max_steps=5)
    assert write_layout(t, groups) == ["training"] + groups
    assert write_layout(t, ["collapse"]) == sorted(["training"] + groups + ["collapse"], key=list(GROUPS).index)
    assert write_layout(t, groups) == sorted(["training"] + groups + ["collapse"], key=list(GROUPS).index)
    logger.experiment.flush()
    assert len(layouts_in(logger.log_dir)) == 2  # the repeated call wrote nothing


def test_stability_line_spans_an_epoch_based_run(tmp_path):
    """With max_epochs (no max_steps) the line is drawn at every measured ratio, not one point at step 0."""
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="epochs", default_hp_metric=False)
    x, y = classification_data(32)
    run = trainer(max_epochs=3, logger=logger, callbacks=[Curvature(every_n_steps=2, num_matvecs=2, eigen_max_iter=6)])
    run.fit(Classifier(mlp()), loader(x, y))
    logger.experiment.flush()
    logged = read_logs(logger.log_dir)["."]
    ratios = logged.scalars["dynscope/curvature/eos_ratio"].steps.tolist()
    assert len(ratios) >= 3 and run.max_steps == -1
    assert logged.scalars[STABILITY_LINE_TAG].steps.tolist() == [0] + ratios


def _collapsing_run(tmp_path, orthograd=True):
    from dynscope.callbacks import AutoStableMax
    from dynscope.nn import CrossEntropy

    class Switchable(Classifier):
        def __init__(self, net):
            super().__init__(net, lr=1e-3, optimizer="adam")
            self.criterion = CrossEntropy()

    net = mlp((4, 8, 3))
    with torch.no_grad():
        net[-1].weight.mul_(300.0)  # confident from the start: softmax collapse at the first checks
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="auto", default_hp_metric=False)
    callback = AutoStableMax(every_n_steps=1, patience=2, orthograd=orthograd)
    x, y = classification_data(32)
    run = trainer(max_steps=6, logger=logger, callbacks=[callback], log_every_n_steps=1)
    return run, logger, callback, Switchable(net), loader(x, y, batch_size=32)


def test_a_real_mitigation_registers_its_group_draws_its_switch_and_says_so_once(tmp_path, caplog):
    run, logger, callback, module, data = _collapsing_run(tmp_path)
    caplog.set_level(logging.INFO)
    run.fit(module, data)
    logger.experiment.flush()
    assert callback.active
    first = layouts_in(logger.log_dir)[0]  # written at setup, before anything fired
    assert "Mitigations" in [c.title for c in first.category]
    logged = read_logs(logger.log_dir)["."]
    texts = logged.texts[EVENTS_TAG]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dynscope: ")]
    assert len(lines) == len(texts) >= 1  # one console line per event
    event = parse_event(texts[0][1])
    assert lines[0].startswith(f"dynscope: {event['mitigation']} switched on at step {texts[0][0]}: ")
    # the Softmax collapse chart overlays the 0/1 switch
    regexes = charts(layouts_in(logger.log_dir)[-1])["Softmax collapse"]
    overlaid = sorted(t for t in logged.scalars if t.startswith("dynscope/mitigation/") and any(re.match(r, t) for r in regexes))
    assert overlaid == ["dynscope/mitigation/orthograd", "dynscope/mitigation/stablemax"]
    # in the report every event row says why, OrthoGrad's too (it switched with StableMax)
    from dynscope.dashboards.report import mitigation_events

    events = mitigation_events(logged)
    assert {e.mitigation for e in events} >= {"stablemax", "orthograd"} and all(e.reason for e in events)


def test_per_layer_values_are_also_one_histogram_per_metric_and_step(run_logs):
    histograms = {}
    for path in sorted(glob.glob(f"{run_logs.log_dir}/events.out.tfevents.*")):
        for event in LegacyEventFileLoader(path).Load():
            for value in event.summary.value:
                if value.HasField("histo"):
                    histograms.setdefault(value.tag, {})[event.step] = value.histo
    assert set(histograms) == {"dynscope/layers/curvature/hessian_trace", "dynscope/layers/noise/gsnr",
                               "dynscope/layers/noise/block_gsnr", "dynscope/layers/collapse/nlm_cos",
                               "dynscope/layers/regions/lc_train", "dynscope/layers/attention/max_logit"}
    run = read_logs(run_logs.log_dir)["."]
    for key, by_step in histograms.items():
        group, metric = key.split("/")[2:4]
        layers = [t for t in run.scalars if t.startswith(f"dynscope/{group}/{metric}/")]
        assert len(layers) >= 2
        for step, histo in by_step.items():
            values = [float(run.scalars[t].values[run.scalars[t].steps.tolist().index(step)]) for t in layers]
            assert histo.num == len(values) and histo.sum == pytest.approx(sum(values), rel=1e-6)
            assert (histo.min, histo.max) == (pytest.approx(min(values), rel=1e-6), pytest.approx(max(values), rel=1e-6))
