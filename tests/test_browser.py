"""In a real browser: TensorBoard's custom-scalars dashboard and the HTML report, in headless Chromium.

Skipped when Chromium is not installed (``apt-get install chromium``; ``.ci/run`` installs it).
Screenshots go to ``$DYNSCOPE_SCREENSHOTS`` when set (e.g. ``/tmp/shots``), else to the test's
temporary directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from browser import Browser, chromium_path, deep_find
from dashboard_logs import run_logs  # noqa: F401 - the session fixture
from dynscope.dashboards.groups import GROUPS
from dynscope.dashboards.report import write_report

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (apt-get install chromium)")

CATEGORY_TITLES = [g.title for g in GROUPS.values()]
CHART_TITLES = ["Edge-of-stability ratio (stable < 1)", "Top eigenvalue λ_max", "Loss (train / validation)",
                "Accuracy (train / validation)",
                "Noise scale / batch size (critical = 1)", "Softmax collapse", "Local complexity: train / test / random",
                "Long-horizon metric: online vs EMA", "Mitigations active (0/1)"]


def screenshots_dir(tmp_path):
    folder = os.environ.get("DYNSCOPE_SCREENSHOTS") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard(run_logs, tmp_path_factory):
    """A TensorBoard server on the run's logs; yields its base URL once the layout is served."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("tensorboard") / "tensorboard.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", run_logs.root, "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if get_json(f"{url}/data/plugin/custom_scalars/layout").get("category"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, "TensorBoard exited"
            assert time.monotonic() < deadline, "TensorBoard did not serve the layout within 60 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_tensorboard_serves_the_layout_and_its_series(tensorboard, run_logs):
    layout = get_json(f"{tensorboard}/data/plugin/custom_scalars/layout")
    open_titles = [c["title"] for c in layout["category"] if not c.get("closed")]
    assert open_titles == CATEGORY_TITLES
    chart = next(ch for c in layout["category"] for ch in c["chart"] if ch["title"] == CHART_TITLES[0])
    matched = {}
    for regex in chart["multiline"]["tag"]:
        query = urllib.parse.urlencode({"run": "run/version_0", "tag": regex})
        matched.update(get_json(f"{tensorboard}/data/plugin/custom_scalars/scalars?{query}")["tag_to_events"])
    assert sorted(matched) == ["dynscope/curvature/eos_ratio", "dynscope/reference/stability_line"]
    curvature = next(c for c in run_logs.callbacks if type(c).__name__ == "Curvature")
    assert len(matched["dynscope/curvature/eos_ratio"]) == curvature.num_measurements
    # the user's accuracy with the mitigation's switch drawn on the same chart
    assert sorted(_matched(tensorboard, layout, "Accuracy (train / validation)")) == [
        "dynscope/mitigation/stablemax", "train_acc"]
    assert sorted(_matched(tensorboard, layout, "Loss (train / validation)")) == ["train_loss"]


def _matched(tensorboard, layout, title):
    chart = next(ch for c in layout["category"] for ch in c["chart"] if ch["title"] == title)
    matched = {}
    for regex in chart["multiline"]["tag"]:
        query = urllib.parse.urlencode({"run": "run/version_0", "tag": regex})
        matched.update(get_json(f"{tensorboard}/data/plugin/custom_scalars/scalars?{query}")["tag_to_events"])
    return matched


def test_custom_scalars_dashboard_renders_in_chromium(tensorboard, tmp_path):
    wanted = CATEGORY_TITLES + CHART_TITLES
    with Browser(width=1400, height=1600, timeout=120) as browser:
        browser.call("Emulation.setFocusEmulationEnabled", enabled=True)
        browser.goto(f"{tensorboard}/#custom_scalars")
        found = browser.wait_for(lambda v: v is not None and len(v) == len(wanted), deep_find(wanted), timeout=90, interval=1)
        if sorted(found or []) != sorted(wanted):
            browser.screenshot(os.path.join(screenshots_dir(tmp_path), "tensorboard_custom_scalars_failed.png"))
        assert sorted(found or []) == sorted(wanted)
        # charts fill in as their data arrives: give them a moment, then keep a picture for people
        browser.wait_for(bool, deep_find(["dynscope/curvature/eos_ratio"]), timeout=15, interval=1)
        browser.screenshot(os.path.join(screenshots_dir(tmp_path), "tensorboard_custom_scalars.png"))


def test_report_figures_load_in_chromium(run_logs, tmp_path):
    path = write_report(run_logs.root, str(tmp_path / "report.html"))
    with Browser(width=1400, height=1000, timeout=60) as browser:
        browser.goto("file://" + path)
        # (a large page is still being parsed when the first images are complete: wait for the document too)
        state = ("document.readyState == 'complete' && "
                 "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
        loaded = browser.wait_for(lambda v: v and all(done and w > 0 for done, w, _, _ in v), state, timeout=20)
        assert loaded and len(loaded) == 17
        assert all(done and w > 300 and h > 200 for done, w, h, _ in loaded), loaded
        headings = browser.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.innerText)")
        assert headings == CATEGORY_TITLES
        opened = browser.evaluate("document.querySelectorAll('details').forEach(d => d.open = true) || "
                                  "Array.from(document.querySelectorAll('details img')).filter(i => i.width > 0).length")
        assert opened == 6  # the per-layer figures display once expanded
        browser.screenshot(os.path.join(screenshots_dir(tmp_path), "report.png"), full_page=True)
