"""One tag registry: the core declares every metric (dynscope.metrics), the dashboards chart them
(dashboards/groups.py), and every tag a dynscope callback can log is declared and has a chart.

The tags come from real runs that switch every option on (Adam for the preconditioned sharpness,
held-out collapse data, every mitigation firing, the overhead budget), not from a hand-typed list;
only the DDP-only two-batch noise scale is named by hand. The declarations and the charts are
checked against each other both ways, and the README's table against the declarations.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from dynscope.callbacks import DynScope
from dynscope.dashboards.groups import GROUPS, STABILITY_LINE_TAG, chart_for_tag, group_of
from dynscope.dashboards.layout import build_layout
from dynscope.metrics import DECLARED
from dynscope.nn import CrossEntropy
from models import Classifier, Recorder, classification_data, loader, mlp, trainer

# Logged only under DDP (per-device vs all-reduced gradient): tests/test_distributed.py runs it.
DDP_ONLY = ["dynscope/noise/noise_scale_two_batch"]
TEXT_ONLY = {"dynscope/mitigation/events"}


class Switchable(Classifier):
    def __init__(self, net, **kwargs):
        super().__init__(net, **kwargs)
        self.criterion = CrossEntropy()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.criterion(self(x), y))
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())


def _drift(module) -> float:
    """A long-horizon metric that moves from step to step: AutoEMA's amplification is never 0."""
    return float(sum(p.double().sum() for p in module.parameters()))


@pytest.fixture(scope="module")
def logged_tags():
    torch.manual_seed(0)
    net = mlp((4, 8, 3))
    with torch.no_grad():
        net[-1].weight.mul_(300.0)  # confident from the start: softmax collapse, so AutoStableMax fires
    x, y = classification_data(32, (4,))
    xv, yv = classification_data(16, (4,), seed=3)
    scope = DynScope(
        budget=None, mitigate=("stablemax", "orthograd", "ema"), metric=_drift,
        curvature={"every_n_steps": 2, "num_matvecs": 4, "eigen_max_iter": 8},
        noise={"every_n_steps": 2}, collapse={"every_n_steps": 1, "patience": 1, "held_data": "val"},
        regions={"every_n_steps": 3, "num_points": 4}, gva={"every_n_steps": 1, "window": 3, "patience": 1, "threshold": 1e-12},
    )
    rec = Recorder()
    trainer(max_steps=8, callbacks=[scope], logger=rec, log_every_n_steps=1, check_val_every_n_epoch=2,
            num_sanity_val_steps=0).fit(
        Switchable(net, lr=1e-3, optimizer="adam"), loader(x, y, batch_size=16), loader(xv, yv, batch_size=16))
    assert scope.callbacks["collapse"].active and scope.callbacks["gva"].active  # both mitigations fired
    return {t for t in rec.scalars if group_of(t) is not None} | {tag for tag, _, _ in rec.texts}


def test_every_tag_a_callback_logs_has_a_chart(logged_tags):
    expected = {"curvature/preconditioned_lambda_max", "collapse/held_sc_fraction", "gva/amplification_ema",
                "gva/metric_ema", "mitigation/stablemax", "mitigation/orthograd", "mitigation/ema", "overhead"}
    assert {"dynscope/" + t for t in expected} <= logged_tags  # the run really exercised every option
    homeless = []
    for tag in sorted(logged_tags | set(DDP_ONLY)):
        if tag in TEXT_ONLY or tag == STABILITY_LINE_TAG:
            continue
        group = GROUPS.get(group_of(tag))
        metric = tag.split("/")[2] if tag.count("/") >= 2 else ""
        if chart_for_tag(tag) is None and not (group and metric in group.table_only):
            homeless.append(tag)
    assert not homeless, f"logged but in no chart: {homeless}"


def test_every_chart_regex_is_in_the_tensorboard_layout(logged_tags):
    layout = build_layout(GROUPS)
    regexes = [r for c in layout.category for ch in c.chart for r in ch.multiline.tag]
    for tag in logged_tags - TEXT_ONLY:
        group = GROUPS.get(group_of(tag), GROUPS["training"])
        if tag.count("/") >= 2 and tag.split("/")[2] in group.table_only:
            continue
        assert any(re.match(r, tag) for r in regexes), tag


def test_every_logged_tag_is_declared_by_the_core(logged_tags):
    undeclared = []
    for tag in sorted(logged_tags | set(DDP_ONLY)):
        group = group_of(tag)
        if tag in TEXT_ONLY or tag == STABILITY_LINE_TAG or group == "overhead":  # the suite's own cost account
            continue
        parts = tag.split("/")
        metric = DECLARED[group][parts[2]] if group in DECLARED and parts[2] in DECLARED[group] else None
        layered = len(parts) > 3 and not parts[3].startswith("r=")  # regions' radius suffix is not a layer
        if metric is None or (layered and not metric.per_layer) or (not layered and metric.layer_only):
            undeclared.append(tag)
    assert not undeclared, f"logged but not declared (as logged, overall or per layer) in dynscope.metrics: {undeclared}"


def test_every_declared_metric_has_a_chart_and_every_charted_metric_is_declared():
    assert set(DECLARED) <= set(GROUPS)
    for name, declared in DECLARED.items():
        group = GROUPS[name]
        assert group.declared is declared and group.metrics == declared.descriptions()
        for metric in declared:
            overall, layer = f"dynscope/{name}/{metric.name}", f"dynscope/{name}/{metric.name}/layer.0"
            if metric.chart is not None:
                chart = chart_for_tag(overall)
                assert chart is not None and not chart.per_layer and metric.name in chart.metrics, overall
            else:
                assert chart_for_tag(overall) is None and (metric.layer_only or metric.name in group.table_only), overall
            if metric.per_layer:
                chart = chart_for_tag(layer)
                assert chart is not None and chart.per_layer and metric.name in chart.metrics, layer
            else:
                assert chart_for_tag(layer) is None or chart_for_tag(layer).pattern, layer
        for chart in group.charts:
            for metric in chart.metrics:
                assert metric in declared, f"{name}: chart {chart.title!r} draws the undeclared {metric!r}"
                assert declared[metric].per_layer if chart.per_layer else declared[metric].chart is not None
            for mitigation in chart.events:
                assert mitigation in DECLARED["mitigation"], (chart.title, mitigation)
        assert set(group.table_only) == {m.name for m in declared if m.table_only}


def test_the_readme_table_names_every_declared_metric():
    readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md"), encoding="utf-8").read()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("|"))  # every table of the README
    for name, declared in DECLARED.items():
        if name == "mitigation":
            continue
        for metric in declared.names:
            assert any(f"`{p}{metric}{e}" in table for p in ("", f"{name}/") for e in ("`", "/")), f"{name}/{metric} missing from the README table"
