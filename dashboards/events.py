"""Reading TensorBoard event files (with tensorboard's own loader) and mitigation events.

:func:`read_logs` walks a log directory, reads every ``events.out.tfevents.*`` file and returns
one :class:`Run` per directory holding event files: scalar series and text entries by tag.
:func:`format_event` / :func:`parse_event` define the text of a mitigation event, so the report
can recover what a callback logged.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> logdir = tempfile.mkdtemp()
    >>> with SummaryWriter(logdir) as w:
    ...     for step in range(3):
    ...         w.add_scalar("dynscope/noise/gsnr", 0.5 * step, step)
    >>> runs = read_logs(logdir)
    >>> runs["."].scalars["dynscope/noise/gsnr"].values.tolist()
    [0.0, 0.5, 1.0]
    >>> text = format_event("ema", "on", 120, "amplification 7.3 > 5", {"amplification": 7.3})
    >>> parse_event(text)["reason"], parse_event(text)["values"]
    ('amplification 7.3 > 5', {'amplification': '7.3'})
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

EVENT_FILE_MARKER = "tfevents"
EVENTS_TAG = "dynscope/mitigation/events"
_TORCH_TEXT_SUFFIX = "/text_summary"  # torch's add_text appends it to the tag


@dataclass
class Series:
    """A scalar series sorted by step (one value per step: the last one written wins)."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def last(self) -> Tuple[int, float]:
        return int(self.steps[-1]), float(self.values[-1])


@dataclass
class Run:
    """Everything one run directory logged: ``scalars[tag]`` and ``texts[tag] = [(step, text)]``."""

    name: str
    scalars: Dict[str, Series] = field(default_factory=dict)
    texts: Dict[str, List[Tuple[int, str]]] = field(default_factory=dict)
    #: ``histograms[tag] = [(step, bucket right edges, bucket counts, min)]`` (dynscope tags only)
    histograms: Dict[str, List[Tuple[int, List[float], List[float], float]]] = field(default_factory=dict)

    def tags(self) -> List[str]:
        return sorted(set(self.scalars) | set(self.texts))


def event_files(logdir: str) -> List[str]:
    """All TensorBoard event files under ``logdir`` (recursively), sorted."""
    found = []
    for root, _dirs, files in os.walk(logdir):
        found.extend(os.path.join(root, f) for f in files if EVENT_FILE_MARKER in f and not f.startswith("."))
    return sorted(found)


def read_logs(logdir: str, on_bytes: Optional[Callable[[int], None]] = None) -> Dict[str, Run]:
    """Read every event file under ``logdir`` into :class:`Run` objects keyed by relative directory.

    ``on_bytes(n)`` is called as the reader advances through ``n`` more bytes (for a progress bar).
    Runs that logged nothing are left out.
    """
    raw: Dict[str, _RawRun] = {}
    for path in event_files(logdir):
        name = os.path.relpath(os.path.dirname(path), logdir)
        run = raw.setdefault(name, _RawRun())
        for nbytes, item in _read_file(path):
            if on_bytes is not None:
                on_bytes(nbytes)
            if item is not None:
                run.add(*item)
    runs = {name: r.finish(name) for name, r in sorted(raw.items())}
    return {name: run for name, run in runs.items() if run.scalars or run.texts}


class _RawRun:
    def __init__(self) -> None:
        self.scalars: Dict[str, List[Tuple[int, int, float]]] = {}
        self.texts: Dict[str, List[Tuple[int, str]]] = {}
        self.histograms: Dict[str, list] = {}
        self.count = 0

    def add(self, kind: str, tag: str, step: int, value) -> None:
        self.count += 1
        if kind == "scalar":
            self.scalars.setdefault(tag, []).append((step, self.count, value))
        elif kind == "histogram":
            self.histograms.setdefault(tag, []).append((step, *value))
        else:
            self.texts.setdefault(tag, []).append((step, value))

    def finish(self, name: str) -> Run:
        scalars = {}
        for tag, points in self.scalars.items():
            latest: Dict[int, float] = {}
            for step, _order, value in sorted(points):
                latest[step] = value
            steps = np.fromiter(latest.keys(), dtype=np.int64, count=len(latest))
            values = np.fromiter(latest.values(), dtype=np.float64, count=len(latest))
            scalars[tag] = Series(steps, values)
        texts = {tag: sorted(entries, key=lambda e: e[0]) for tag, entries in self.texts.items()}
        histograms = {tag: sorted(entries, key=lambda e: e[0]) for tag, entries in self.histograms.items()}
        return Run(name, scalars, texts, histograms)


def _read_file(path: str) -> Iterator[Tuple[int, Optional[Tuple[str, str, int, object]]]]:
    """``(bytes consumed, (kind, tag, step, value) or None)`` for each summary value in a file."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.util import tensor_util

    plugins: Dict[str, str] = {}
    for event in LegacyEventFileLoader(path).Load():
        nbytes = event.ByteSize() + 16  # record framing: length, two CRCs
        if not event.HasField("summary"):
            yield nbytes, None
            continue
        for value in event.summary.value:
            if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
                plugins[value.tag] = value.metadata.plugin_data.plugin_name
            plugin = plugins.get(value.tag, "")
            item = None
            if value.HasField("simple_value"):
                item = ("scalar", value.tag, event.step, float(value.simple_value))
            elif value.HasField("histo") and value.tag.startswith("dynscope/"):
                h = value.histo
                item = ("histogram", value.tag, event.step, (list(h.bucket_limit), list(h.bucket), float(h.min)))
            elif value.HasField("tensor") and plugin in ("scalars", "text"):
                array = tensor_util.make_ndarray(value.tensor)
                if plugin == "scalars" and array.size == 1:
                    item = ("scalar", value.tag, event.step, float(array.reshape(-1)[0]))
                elif plugin == "text" and array.size >= 1:
                    raw = array.reshape(-1)[0]
                    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                    tag = value.tag[: -len(_TORCH_TEXT_SUFFIX)] if value.tag.endswith(_TORCH_TEXT_SUFFIX) else value.tag
                    item = ("text", tag, event.step, text)
            yield nbytes, item
            nbytes = 0


# -- mitigation events ---------------------------------------------------------------------------

_HEAD = re.compile(r"^\*\*(?P<mitigation>[\w.-]+)\s+(?P<action>on|off)\*\*\s+at step\s+(?P<step>\d+)(?::\s*(?P<reason>.*))?$")
_ROW = re.compile(r"^\|\s*(?P<key>[^|]+?)\s*\|\s*(?P<value>[^|]*?)\s*\|$")


def format_event(mitigation: str, action: str, step: int, reason: str, values: Mapping[str, object] = ()) -> str:
    """Markdown for a mitigation event (TensorBoard's Text tab renders it; :func:`parse_event` reads it).

    >>> print(format_event("stablemax", "on", 40, "collapse 0.31 > 0.1", {"sc_fraction": 0.31}))
    **stablemax on** at step 40: collapse 0.31 > 0.1
    <BLANKLINE>
    | value | at step 40 |
    |---|---|
    | sc_fraction | 0.31 |
    """
    lines = [f"**{mitigation} {action}** at step {int(step)}: {reason}".rstrip(": ")]
    values = dict(values or {})
    if values:
        lines += ["", f"| value | at step {int(step)} |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in values.items()]
    return "\n".join(lines)


def parse_event(text: str) -> Optional[Dict[str, object]]:
    """The fields of a :func:`format_event` text (``None`` when the text has another shape)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    match = _HEAD.match(lines[0]) if lines else None
    if match is None:
        return None
    values = {}
    for line in lines[1:]:
        row = _ROW.match(line)
        if row and not row["key"].startswith("---") and row["key"] != "value":
            values[row["key"]] = row["value"]
    return {
        "mitigation": match["mitigation"],
        "action": match["action"],
        "step": int(match["step"]),
        "reason": (match["reason"] or "").strip(),
        "values": values,
    }


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
