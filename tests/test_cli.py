"""The ``dynscope`` command: help texts, lazy imports, one-line errors, a report that will not
overwrite what it should not, and demo tables that fit a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dynscope.cli.common import format_table
from dynscope.cli.main import DEMOS, main


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's --help
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["report", "--help"], ["bench", "--help"]]
                         + [["demo", name, "--help"] for name in DEMOS])
def test_every_help_prints_without_a_traceback(argv, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 0 and out.startswith("usage: dynscope") and "Traceback" not in err
    if argv == ["demo", "suite", "--help"]:
        assert "5% overhead budget" in out  # the "%" that used to crash argparse


def test_demo_help_lists_the_demos_and_the_default_demos_options(capsys):
    _, out, _ = _run(["demo", "--help"], capsys)
    assert all(name in out for name in DEMOS) and "--mitigation" in out


def test_top_level_help_imports_neither_torch_nor_lightning():
    code = ("import sys\nfrom dynscope.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    for argv in ("['--help']", "['report', '--help']", "['bench', '--help']"):
        out = subprocess.run([sys.executable, "-c", code.replace("['--help']", argv)], capture_output=True, text=True,
                             check=True).stdout
        assert out.strip().endswith("HEAVY []"), (argv, out[-300:])


def test_bench_help_lists_the_benchmarks(capsys):
    from dynscope.cli.bench import benchmarks_dir, discover

    _, out, _ = _run(["bench", "--help"], capsys)
    names = list(discover(benchmarks_dir()))
    assert names and all(f"  {name}  " in out for name in names)


# -- the report command ----------------------------------------------------------------------------------


@pytest.fixture
def logdir(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "logs"
    with SummaryWriter(str(folder)) as w:
        for step in range(4):
            w.add_scalar("dynscope/noise/cost_$\\notacommand$", 0.1 * step, step)  # matplotlib would read it as math
            w.add_scalar("dynscope/curvature/hessian_trace/l$a^$yer", step, step)
            w.add_scalar("dynscope/curvature/eos_ratio", 0.2 * step, step)
    return folder


def test_report_draws_tag_names_that_look_like_math_as_plain_text(logdir, tmp_path, capsys):
    code, out, err = _run(["report", str(logdir), "-o", str(tmp_path / "r.html"), "-q"], capsys)
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert "cost_$\\notacommand$" in page and page.count("<img") >= 2


def test_report_errors_are_one_line(tmp_path, capsys):
    code, out, err = _run(["report", str(tmp_path / "nowhere"), "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("dynscope: error:") and "Traceback" not in err


def test_report_refuses_to_overwrite_what_is_not_its_own_page(logdir, tmp_path, capsys):
    event_file = next(p for p in logdir.iterdir() if "tfevents" in p.name)
    original = event_file.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    fake_html = tmp_path / "data.html"
    fake_html.write_text("col1,col2\n1,2\n")
    target = tmp_path / "target.html"
    target.write_text("<!DOCTYPE html><p>someone else's page")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    for path, why in ((event_file, "inside the log directory"), (notes, "not an .html file"),
                      (fake_html, "does not look like an HTML page"), (link, "symbolic link")):
        code, _, err = _run(["report", str(logdir), "-o", str(path), "-q"], capsys)
        assert code == 2 and why in err and "--force" in err and err.count("\n") == 1
    assert event_file.read_bytes() == original and notes.read_text() == "precious"
    assert target.read_text() == "<!DOCTYPE html><p>someone else's page"

    # an earlier report is replaced without asking; --force replaces the link itself, not its target
    mine = tmp_path / "report.html"
    assert _run(["report", str(logdir), "-o", str(mine), "-q"], capsys)[0] == 0
    assert _run(["report", str(logdir), "-o", str(mine), "-q"], capsys)[0] == 0
    assert _run(["report", str(logdir), "-o", str(link), "-q", "--force"], capsys)[0] == 0
    assert not link.is_symlink() and "dynscope report" in link.read_text()
    assert target.read_text() == "<!DOCTYPE html><p>someone else's page"
    assert _run(["report", str(logdir), "-o", str(notes), "-q", "--force"], capsys)[0] == 0
    assert "dynscope report" in notes.read_text()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# -- demo tables -------------------------------------------------------------------------------------------


def test_the_grokking_demos_results_table_fits_100_columns(capsys):
    from dynscope.cli import demo_grokking

    header = ["run", "SC detected at", "mitigation", "train acc", "test acc", "softmax SC frac", "loss in use",
              "zero losses", "grad norm", "seconds"]
    rows = [("control", "1700", "none", "1.000", "0.009", "0.912", "softmax", "0.912", "1.32e-08", "71"),
            ("auto-stablemax", "1710", "step 1720 (softmax collapse)", "1.000", "0.011", "0.998", "stablemax",
             "0.000", "3.10e-02", "74")]
    lines = format_table(header, rows)
    assert max(map(len, lines)) <= 100 < len("  ".join(header))
    text = "\n".join(lines)
    assert all(cell in text for row in rows for cell in row) and all(h in text for h in header)
    # the groups it points to exist in the dashboards
    from dynscope.dashboards.groups import GROUPS

    control = {"name": "control", "mitigation": "-"}
    rescued = {"name": "AutoStableMax()", "mitigation": "step 100: stablemax, orthograd, rescale, reset_optimizer"}
    titles = demo_grokking.dashboard_groups([control, rescued]).split(", ")
    assert titles == [GROUPS["collapse"].title, GROUPS["mitigation"].title]
    assert demo_grokking.dashboard_groups([control]) == GROUPS["collapse"].title
