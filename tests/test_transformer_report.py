"""The transformer diagnostics in TensorBoard and in the static report: groups, charts, events, forensics."""

from __future__ import annotations

import pytorch_lightning as pl
import pytest

from models import trainer

from dynscope.callbacks import AttentionLogits, AutoZLoss, SpikeForensics
from dynscope.cli.demo_transformer import make_data, make_module
from dynscope.dashboards.events import read_logs
from dynscope.dashboards.groups import GROUPS, chart_for_tag
from dynscope.dashboards.report import mitigation_events, write_report


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    module = make_module(3e-2, 0, vocab=32, seq=16, dim=32, layers=1, heads=2)
    logger = pl.loggers.TensorBoardLogger(str(root), name="run", version="")
    callbacks = [AutoZLoss(every_n_steps=5), AttentionLogits(every_n_steps=5, per_head=True),
                 SpikeForensics(k=3.0, min_history=5, window=20, cooldown=10, max_snapshots=1, log_every_n_steps=5)]
    trainer(max_steps=40, callbacks=callbacks, logger=logger).fit(module, make_data(2048, 32, 16, 0, 32))
    assert callbacks[0].triggered_step is not None and callbacks[2].events
    return root


def test_every_logged_tag_has_a_chart(logdir):
    run = read_logs(str(logdir))["run"]
    ours = [t for t in run.scalars if t.split("/")[1] in ("attention", "logits", "spikes")]
    assert {"dynscope/attention/max_logit", "dynscope/logits/log_z_drift", "dynscope/spikes/lambda_max"} <= set(ours)
    missing = [t for t in ours if chart_for_tag(t) is None and t.split("/")[-1] not in GROUPS[t.split("/")[1]].table_only]
    assert not missing
    assert chart_for_tag("dynscope/attention/head_max_logit/net.blocks.0.h1").title == "Largest attention logit per head"


def test_report_has_the_sections_the_events_and_the_forensics(logdir, tmp_path):
    page = open(write_report(str(logdir), str(tmp_path / "report.html"))).read()
    for title in ("Attention", "Output logits", "Loss spikes", "Largest attention logit", "log Z drift since the first measurement"):
        assert title in page
    run = read_logs(str(logdir))["run"]
    kinds = {e.mitigation for e in mitigation_events(run)}
    assert {"zloss", "loss-spike"} <= kinds  # both are markers on every chart
    assert "g_i . v" in page and "#" in page  # the forensics table with the sample names


def test_demo_transformer_runs_and_reports_the_switch(tmp_path, capsys):
    import torch

    from dynscope.cli.main import main

    threads = torch.get_num_threads()
    assert main(["demo", "transformer", "--steps", "40", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AutoZLoss switched the z-loss on at step 30" in out and "logZ ctrl" in out
    assert torch.get_num_threads() == threads  # the demo restores the thread count
