"""The static report (``dynscope report``) and the ``report``/``bench`` commands."""

from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from dashboard_logs import run_logs  # noqa: F401 - the session fixture
from dynscope.cli.main import UserError, main
from dynscope.dashboards.report import ReportError, load_runs, write_report

PNG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">')


def images(page):
    """``(alt, pixels)`` of every embedded figure, decoded as PNG."""
    import matplotlib.image

    return [(alt, matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png"))
            for alt, data in PNG.findall(page)]


def section(page, group_id):
    start = page.index(f'<section class=group id="{group_id}">')
    return page[start:page.index("</section>", start)]


@pytest.fixture(scope="module")
def page(run_logs, tmp_path_factory):
    path = write_report(run_logs.root, str(tmp_path_factory.mktemp("report") / "report.html"))
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_one_section_per_group_with_figures(page):
    for group_id, title in [("training", "Training (your metrics)"), ("curvature", "Curvature"), ("noise", "Gradient noise"),
                            ("collapse", "Softmax collapse"), ("regions", "Linear regions"), ("gva", "Amplification"),
                            ("attention", "Attention"), ("logits", "Output logits"), ("spikes", "Loss spikes"),
                            ("mitigation", "Mitigations"),
                            ("overhead", "Overhead")]:
        body = section(page, group_id)
        assert f"<h2>{title}</h2>" in body
        assert PNG.search(body), group_id
    figures = images(page)
    assert len(figures) == 11 + 6  # a main figure per group (the user's metrics too), 6 collapsed per-layer ones
    for alt, pixels in figures:
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, alt
        assert pixels[..., :3].std() > 0.05, f"blank figure: {alt}"  # something is drawn


def test_per_layer_panels_are_collapsed(page):
    curvature = section(page, "curvature")
    details = re.findall(r"<details><summary>([^<]*)</summary>", curvature)
    assert details == ["Hessian trace per layer (4 layers)"]
    assert "<details>" not in section(page, "gva")


def test_metric_descriptions_for_what_was_logged(page):
    noise = section(page, "noise")
    assert "<code>noise_scale_over_batch</code> — Smoothed B_simple / batch size" in noise
    assert "<code>preconditioned_lambda_max</code>" not in section(page, "curvature")  # SGD run: not logged


def test_events_and_final_values_tables(page, run_logs):
    events = page[page.index("<table class=events>"):page.index("</table>", page.index("<table class=events>"))]
    assert re.search(r"<td class=num>9</td><td>stablemax</td><td class='act on'>on</td>"
                     r"<td>softmax collapse 0.31 &gt; 0.30</td><td>sc_fraction = 0.31</td>", events)
    curvature = next(c for c in run_logs.callbacks if type(c).__name__ == "Curvature")
    finals = page[page.index("<table class=finals>"):]
    for metric in ("eos_ratio", "hessian_trace", "lambda_max"):
        shown = re.search(rf"<code>{metric}</code></td><td class=num>([^<]+)</td><td class=num>(\d+)</td>", finals)
        assert shown, metric
        assert float(shown[1]) == pytest.approx(curvature.last_metrics[metric], rel=1e-3)
        assert int(shown[2]) == run_logs.max_steps
    # the unit column is the core's declaration (dynscope.metrics)
    assert re.search(r"<code>hessian_trace</code></td>(<td class=num>[^<]+</td>){4}<td>tr\(H\)</td></tr>", finals)
    assert re.search(r"<code>eos_ratio</code></td>(<td class=num>[^<]+</td>){4}<td>ratio</td></tr>", finals)


def test_partial_and_older_logs(tmp_path):
    with SummaryWriter(str(tmp_path / "old")) as w:
        for step in range(4):
            w.add_scalar("dynscope/noise/gsnr", 1.0 / (step + 1), step)
            w.add_scalar("dynscope/curvature/an_old_metric", step, step)
            w.add_scalar("dynscope/legacy/thing", 2.0 * step, step)
            w.add_scalar("train_loss", 1.0, step)
        w.add_scalar("dynscope/mitigation/ema", 0.0, 1)
        w.add_scalar("dynscope/mitigation/ema", 1.0, 3)
        w.add_text("dynscope/mitigation/events", "EMA switched on by hand", 2)
    page = open(write_report(str(tmp_path), str(tmp_path / "r.html")), encoding="utf-8").read()
    assert "<h2>Gradient noise</h2>" in page and "<h2>Softmax collapse</h2>" not in page
    assert "Other curvature metrics" in page and "<h2>Legacy</h2>" in page
    assert "<td class=num>2</td><td>event</td><td class='act '></td><td>EMA switched on by hand</td>" in page
    assert "<td class=num>3</td><td>ema</td><td class='act on'>on</td>" in page  # from the 0/1 series
    assert "<td>Training (your metrics)</td><td><code>train_loss</code>" in page  # the user's own series, beside ours
    assert PNG.search(section(page, "training"))
    assert all(p.shape[0] > 100 for _, p in images(page))


def test_progress_bar(run_logs, capsys):
    load_runs(run_logs.root, progress=True)
    assert re.search(r"reading 1 event file\(s\) \[#+\] 100%", capsys.readouterr().err)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("empty", "no TensorBoard event files"),
    ("no-values", "hold no scalars or text"),
    ("foreign", r"no dynscope tags \(dynscope/\.\.\.\) in the logs under .*; found 2 other tag\(s\): accuracy, loss"),
])
def test_clear_errors(tmp_path, case, message):
    logdir = tmp_path / case
    if case == "file":
        logdir.write_text("not logs")
    elif case != "missing":
        logdir.mkdir()
    if case == "no-values":
        SummaryWriter(str(logdir)).close()
    if case == "foreign":
        with SummaryWriter(str(logdir)) as w:
            w.add_scalar("loss", 1.0, 0)
            w.add_scalar("accuracy", 0.5, 0)
    with pytest.raises(ReportError, match=message):
        write_report(str(logdir), str(tmp_path / "out.html"))


def test_unwritable_output(run_logs, tmp_path):
    with pytest.raises(ReportError, match="cannot write"):
        write_report(run_logs.root, str(tmp_path / "no" / "such" / "dir" / "r.html"))


# -- the command line ----------------------------------------------------------------------------


def test_cli_report(run_logs, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", run_logs.root, "-o", str(out), "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert len(images(out.read_text(encoding="utf-8"))) == 17


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"dynscope: error: log directory {tmp_path / 'nope'} does not exist"
    assert "Traceback" not in captured.err + captured.out
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0 and "-o OUTPUT, --output OUTPUT" in capsys.readouterr().out


def test_bench_runs_discovered_benchmarks(tmp_path, capsys):
    from dynscope.cli.bench import run_benchmarks

    (tmp_path / "bench_fast.py").write_text(
        "def main(quick=False):\n    print(f'| op | ratio |\\n| fast | {0.5 if quick else 0.25} |')\n    return 0\n")
    (tmp_path / "bench_broken.py").write_text("def main(quick=False):\n    raise RuntimeError('boom')\n")
    assert run_benchmarks(["fast"], quick=True, directory=tmp_path) == 0
    out = capsys.readouterr().out
    assert "== bench_fast (quick) ==" in out and "| fast | 0.5 |" in out and "-- bench_fast: ok in" in out
    assert run_benchmarks([], directory=tmp_path) == 1
    captured = capsys.readouterr()
    assert "RuntimeError: boom" in captured.err and "| fast | 0.25 |" in captured.out
    assert "== 1/2 benchmarks ok; failed: broken" in captured.out
    with pytest.raises(UserError, match=r"unknown benchmark\(s\): nope \(available: broken, fast\)"):
        run_benchmarks(["nope"], directory=tmp_path)
    with pytest.raises(UserError, match="no benchmarks/ directory"):
        run_benchmarks([], directory=tmp_path / "bench_fast.py")


def test_series_helpers_keep_the_last_value_per_step(tmp_path):
    from dynscope.dashboards.events import read_logs

    with SummaryWriter(str(tmp_path)) as w:
        for step, value in [(0, 1.0), (2, 2.0), (1, 3.0), (2, 4.0)]:
            w.add_scalar("dynscope/noise/gsnr", value, step)
    series = read_logs(str(tmp_path))["."].scalars["dynscope/noise/gsnr"]
    assert series.steps.tolist() == [0, 1, 2] and np.allclose(series.values, [1.0, 3.0, 4.0])
    assert os.path.basename(str(tmp_path))  # the run is keyed "." when the files sit in logdir itself


def _curvature_logs(folder, adam: bool):
    with SummaryWriter(str(folder)) as w:
        for step in range(0, 40, 10):
            w.add_scalar("dynscope/curvature/lambda_max", 10.0 + step / 10, step)
            w.add_scalar("dynscope/curvature/eos_threshold", 3.8e4 if adam else 20.0, step)
            w.add_scalar("dynscope/curvature/eos_ratio", 0.5, step)
            if adam:
                w.add_scalar("dynscope/curvature/preconditioned_lambda_max", 1.9e4, step)
            w.add_scalar("train_loss", 1.0 / (step + 1), step)
            w.add_scalar("val_acc", 0.5 + step / 100, step)
        w.add_scalar("dynscope/mitigation/stablemax", 1.0, 20)
        w.add_scalar("dynscope/mitigation/orthograd", 1.0, 20)
        w.add_text("dynscope/mitigation/events", "**stablemax on** at step 20: softmax collapse; switched", 20)


@pytest.mark.parametrize("adam", [False, True])
def test_eos_description_threshold_line_and_user_metrics(tmp_path, adam):
    _curvature_logs(tmp_path / "logs", adam)
    runs = load_runs(str(tmp_path / "logs"))
    from dynscope.dashboards.report import GROUPS, group_panels, run_groups

    (run,) = runs.values()
    assert [g.name for g in run_groups(run)][:2] == ["training", "curvature"]
    main_panels, _ = group_panels(run, GROUPS["curvature"])
    panels = {p.title: p for p in main_panels}
    # each quantity on its own axis; the threshold drawn on the quantity it applies to
    assert list(panels["Top eigenvalue λ_max"].series) == ["lambda_max"]
    with_threshold = [t for t, p in panels.items() if p.threshold is not None]
    assert with_threshold == (["Preconditioned sharpness λ_max(P⁻¹H) (Adam)"] if adam else ["Top eigenvalue λ_max"])
    user, _ = group_panels(run, GROUPS["training"])
    assert {p.title: list(p.series) for p in user} == {"Loss (train / validation)": ["train_loss"],
                                                        "Accuracy (train / validation)": ["val_acc"]}
    page = open(write_report(str(tmp_path / "logs"), str(tmp_path / "r.html")), encoding="utf-8").read()
    curvature = section(page, "curvature")
    assert ("(2+2β₁)/((1−β₁)·lr)" in curvature) == adam and ("(2+2β)/lr" in curvature) == (not adam)
    # OrthoGrad switched on by the same decision: its row says why
    assert re.search(r"<td class=num>20</td><td>orthograd</td><td class='act on'>on</td><td>with stablemax: softmax "
                     r"collapse; switched</td>", page)


def test_log_axes_label_their_ticks_as_plain_numbers():
    """The figures turn mathtext off (tag names with '$' stay text), so a log axis must not use its
    default mathtext labels, which would print as '$\\mathdefault{10^{0}}$'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dynscope.dashboards.plots import plain_log_ticks

    with plt.rc_context({"text.parse_math": False}):
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3], [1e-3, 1.0, 10.0])
        ax.set_yscale("log")
        plain_log_ticks(ax)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        plt.close(fig)
    assert labels and not any("$" in label for label in labels)
    assert {"0.001", "0.01", "0.1", "1", "10"} <= set(labels)
