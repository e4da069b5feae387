"""The static report: ``dynscope report LOGDIR -o report.html``.

Reads the TensorBoard event files under a log directory and writes one self-contained HTML file:
per run, a summary table (final values and mitigation events), then one section per dynscope
group present in the logs with a description of its metrics, a figure (PNG, embedded) with
mitigation events as vertical lines and stability thresholds as horizontal lines, and the
per-layer figures collapsed underneath. Groups the logs do not have are skipped, so logs of
older or partial runs work.

Example:
    >>> import os, tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> logdir = tempfile.mkdtemp()
    >>> with SummaryWriter(logdir) as w:
    ...     for step in range(5):
    ...         w.add_scalar("dynscope/curvature/eos_ratio", 0.2 * step, step)
    >>> path = write_report(logdir, os.path.join(logdir, "report.html"))
    >>> "Edge-of-stability ratio" in open(path).read()
    True
    >>> try:
    ...     write_report(os.path.join(logdir, "missing"))
    ... except ReportError as error:  # a user error: the CLI prints it without a traceback
    ...     print(error)  # doctest: +ELLIPSIS
    log directory .../missing does not exist
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .events import EVENTS_TAG, Run, event_files, parse_event, read_logs
from .groups import GROUPS, PREFIX, STABILITY_LINE_TAG, USER, Chart, Group, group_of
from .plots import Marker, Panel, render_panels
from .progress import ProgressBar

__all__ = ["ReportError", "load_runs", "write_report"]


class ReportError(Exception):
    """A problem with the report's inputs or output (printed as one line by the CLI)."""


@dataclass
class Event:
    step: int
    mitigation: str
    action: str
    reason: str = ""
    values: Dict[str, str] = field(default_factory=dict)


def write_report(logdir: str, output: str = "report.html", progress: bool = False, force: bool = False) -> str:
    """Render the report of the logs under ``logdir`` into ``output``; returns its absolute path.

    Raises :class:`ReportError` for a missing or empty log directory, logs without dynscope tags,
    or an output file that cannot be written. An existing ``output`` is replaced only when it is an
    HTML file (by name and content) outside ``logdir`` and not a symbolic link, unless ``force``;
    the page is written to a temporary file beside it and moved into place, so a link is replaced,
    never followed.
    """
    output = os.path.abspath(output)
    if not os.path.isdir(os.path.dirname(output)):
        raise ReportError(f"cannot write {output}: directory {os.path.dirname(output)} does not exist")
    if os.path.isdir(output):
        raise ReportError(f"cannot write {output}: it is a directory")
    if not force:
        refusal = _overwrite_refusal(output, logdir)
        if refusal:
            raise ReportError(f"will not overwrite {output}: {refusal} (use --force to replace it)")
    runs = load_runs(logdir, progress=progress)
    page = render_html(logdir, runs)
    folder, name = os.path.split(output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(page)
            os.chmod(tmp, 0o644)
            os.replace(tmp, output)  # replaces a link itself, does not write through it
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as error:
        raise ReportError(f"cannot write {output}: {error.strerror or error}") from error
    return output


def _overwrite_refusal(output: str, logdir: str) -> Optional[str]:
    """Why an existing ``output`` must not be replaced without ``--force`` (``None``: it may be)."""
    if not os.path.lexists(output):
        return None
    if os.path.islink(output):
        return f"it is a symbolic link (to {os.readlink(output)})"
    inside = os.path.realpath(output).startswith(os.path.join(os.path.realpath(logdir), ""))
    if inside:
        return "it is inside the log directory"
    if os.path.splitext(output)[1].lower() not in (".html", ".htm"):
        return "it is not an .html file"
    try:
        with open(output, "rb") as f:
            head = f.read(512).lstrip().lower()
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})"
    if head and not head.startswith((b"<!doctype html", b"<html")):
        return "it does not look like an HTML page"
    return None


def load_runs(logdir: str, progress: bool = False) -> Dict[str, Run]:
    """The runs under ``logdir`` that logged dynscope tags (see :func:`write_report` for errors)."""
    logdir = os.fspath(logdir)
    if not os.path.exists(logdir):
        raise ReportError(f"log directory {logdir} does not exist")
    if not os.path.isdir(logdir):
        raise ReportError(f"{logdir} is not a directory (give the TensorBoard log directory)")
    files = event_files(logdir)
    if not files:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {logdir}")
    bar = ProgressBar(sum(os.path.getsize(f) for f in files), f"reading {len(files)} event file(s)") if progress else None
    try:
        runs = read_logs(logdir, on_bytes=bar.advance if bar else None)
    except Exception as error:  # noqa: BLE001 - a corrupt file is the user's input, not our bug
        raise ReportError(f"cannot read the event files under {logdir}: {type(error).__name__}: {error}") from error
    finally:
        if bar:
            bar.close()
    if not runs:
        raise ReportError(f"the event files under {logdir} hold no scalars or text (is the run still starting?)")
    ours = {name: run for name, run in runs.items() if any(_is_ours(t) for t in run.tags())}
    if not ours:
        tags = sorted({t for run in runs.values() for t in run.tags()})
        shown = ", ".join(tags[:6]) + (", ..." if len(tags) > 6 else "")
        raise ReportError(f"no dynscope tags (dynscope/...) in the logs under {logdir}; found {len(tags)} other tag(s): {shown}")
    return ours


def _is_ours(tag: str) -> bool:
    return group_of(tag) is not None and tag != STABILITY_LINE_TAG


# -- assembling a run --------------------------------------------------------------------------------


def run_groups(run: Run) -> List[Group]:
    """The groups with data in ``run``: catalogue groups first, then unknown ones (generic charts)."""
    names = {group_of(t) for t in run.scalars if _is_ours(t)} | {group_of(t) for t in run.texts if _is_ours(t)}
    if _group_tags(run, GROUPS[USER]):
        names.add(USER)
    known = [GROUPS[n] for n in GROUPS if n in names]
    unknown = [Group(n, n.capitalize(), "Not in this version's catalogue of dynscope metrics.") for n in sorted(names - set(GROUPS))]
    return known + unknown


def group_panels(run: Run, group: Group):
    """``(main panels, per-layer panels)`` of a group: one panel per chart with data, plus an
    "Other metrics" panel for tags of the group that no chart claims."""
    tags = _group_tags(run, group)
    claimed = {_tag(group.name, m) for m in group.table_only}
    main, layers = [], []
    for chart in group.charts:
        picked = [t for t in tags if t not in claimed and chart.matches(group.name, t)]
        if not picked:
            continue
        claimed.update(picked)
        picked.sort(key=lambda t: _metric_rank(group.name, chart, t))
        series = {_label(group.name, chart, t): run.scalars[t] for t in picked}
        band = run.scalars.get(_tag(group.name, chart.band)) if chart.band else None
        threshold = None
        if chart.threshold and not (chart.threshold_unless and _tag(group.name, chart.threshold_unless) in run.scalars):
            threshold = run.scalars.get(_tag(group.name, chart.threshold))
        panel = Panel(chart.title, chart.ylabel, series, chart.reference, chart.reference_label, chart.shade_above,
                      band, chart.steps, threshold, chart.threshold or "")
        (layers if chart.per_layer else main).append(panel)
    rest = [t for t in tags if t not in claimed]
    if rest and not group.user:  # the module's other series (epoch, learning rate, ...) are not ours to chart
        series = {t[len(f"{PREFIX}/{group.name}/"):] or t: run.scalars[t] for t in rest}
        main.append(Panel(f"Other {group.title.lower()} metrics", "value", series))
    return main, layers


def _group_tags(run: Run, group: Group) -> List[str]:
    """The scalar tags of ``group`` in ``run`` (for the user's group: the module's own series)."""
    if group.user:
        return sorted(t for t in run.scalars if group_of(t) is None and any(c.matches(group.name, t) for c in group.charts))
    return sorted(t for t in run.scalars if group_of(t) == group.name and _is_ours(t))


def _tag(group: str, metric: str) -> str:
    return f"{PREFIX}/{group}/{metric}"


def _metric_rank(group: str, chart: Chart, tag: str):
    if group == USER:
        return (0, tag)
    metric = tag[len(f"{PREFIX}/{group}/"):].split("/")[0]
    return (chart.metrics.index(metric) if metric in chart.metrics else len(chart.metrics), tag)


def _label(group: str, chart: Chart, tag: str) -> str:
    if group == USER:
        return tag
    rest = tag[len(f"{PREFIX}/{group}/"):]
    if chart.per_layer:
        metric, _, layer = rest.partition("/")
        return layer if len(chart.metrics) == 1 else f"{metric}: {layer}"
    return rest or tag


def mitigation_events(run: Run) -> List[Event]:
    """Events from the text entries and from the switches of the 0/1 mitigation series."""
    events: List[Event] = []
    for step, text in run.texts.get(EVENTS_TAG, []):
        parsed = parse_event(text)
        if parsed:
            events.append(Event(step, parsed["mitigation"], parsed["action"], parsed["reason"], parsed["values"]))
        else:
            events.append(Event(step, "event", "", " ".join(text.split())))
    seen = {(e.mitigation, e.step) for e in events}
    described = {e.step: e for e in events if e.reason and e.mitigation != "event"}
    for tag, series in run.scalars.items():
        if group_of(tag) != "mitigation":
            continue
        name = tag.split("/", 2)[2]
        active = False
        for step, value in zip(series.steps.tolist(), series.values.tolist()):
            now = value >= 0.5
            if now != active and (name, step) not in seen:
                other = described.get(step)  # e.g. OrthoGrad switched on with StableMax, by the same decision
                reason = f"with {other.mitigation}: {other.reason}" if other is not None else ""
                events.append(Event(step, name, "on" if now else "off", reason, dict(other.values) if other else {}))
            active = now
    return sorted(events, key=lambda e: (e.step, e.mitigation))


# -- HTML -----------------------------------------------------------------------------------------


def render_html(logdir: str, runs: Dict[str, Run]) -> str:
    """The report page for ``runs`` (as returned by :func:`load_runs`)."""
    parts = [_HEAD.format(title=html.escape(f"dynscope report — {os.path.basename(os.path.abspath(logdir))}"))]
    parts.append("<header><h1>dynscope report</h1>")
    parts.append(
        f"<p class=meta>Logs: <code>{html.escape(os.path.abspath(logdir))}</code> · {len(runs)} run(s) · "
        f"generated {datetime.datetime.now():%Y-%m-%d %H:%M}</p></header>"
    )
    if len(runs) > 1:
        parts.append("<nav><b>Runs:</b> " + " · ".join(f'<a href="#{_anchor(n)}">{html.escape(n)}</a>' for n in runs) + "</nav>")
    for name, run in runs.items():
        parts.append(_run_section(name, run, heading=len(runs) > 1))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _run_section(name: str, run: Run, heading: bool) -> str:
    groups = run_groups(run)
    events = mitigation_events(run)
    markers = [Marker(e.step, e.mitigation, e.action) for e in events]
    out = [f'<section class=run id="{_anchor(name)}">']
    if heading:
        out.append(f"<h2 class=runtitle>Run <code>{html.escape(name)}</code></h2>")
    steps = [int(s.steps[-1]) for t, s in run.scalars.items() if _is_ours(t)]
    out.append(
        f"<p class=meta>{len(groups)} group(s): {html.escape(', '.join(g.title for g in groups))}"
        + (f" · last step {max(steps)}" if steps else "") + f" · {len(events)} mitigation event(s)</p>"
    )
    out.append(_events_table(events))
    out.append(_finals_table(run, groups))
    for group in groups:
        out.append(_group_section(run, group, markers))
    out.append("</section>")
    return "\n".join(out)


def _group_section(run: Run, group: Group, markers: List[Marker]) -> str:
    main, layers = group_panels(run, group)
    out = [f'<section class=group id="{_anchor(group.name)}"><h2>{html.escape(group.title)}</h2>']
    out.append(f"<p class=summary>{html.escape(group.summary)}</p>")
    if group.user:
        present = {m for m in group.metrics if any(m in t.lower() for t in _group_tags(run, group))}
    else:
        present = {t.split("/")[2] if t.count("/") >= 2 else group.name for t in run.scalars if group_of(t) == group.name}
    described = [(m, _describe(group, m, present)) for m in group.metrics if m in present]
    if described:
        out.append("<ul class=metrics>" + "".join(
            f"<li><code>{html.escape(m)}</code> — {html.escape(d)}</li>" for m, d in described) + "</ul>")
    if main:
        out.append(_figure(main, markers, f"{group.title}: {', '.join(p.title for p in main)}"))
    elif not layers:
        out.append("<p class=empty>No scalar series in this group (text entries only).</p>")
    for tag, entries in sorted(getattr(run, "histograms", {}).items()):
        if group_of(tag) == group.name and entries:
            out.append(_histogram_figure(tag, entries))
    for panel in layers:
        out.append(
            f"<details><summary>{html.escape(panel.title)} ({len(panel.series)} layers)</summary>"
            + _figure([panel], markers, f"{group.title}: {panel.title}", ncols=1) + "</details>"
        )
    out.append(_group_texts(run, group))
    out.append("</section>")
    return "\n".join(out)


def _describe(group: Group, metric: str, present) -> str:
    """A metric's description, fitted to the run where the catalogue says how (Adam vs SGD)."""
    for (name, when), text in group.metrics_when.items():
        if name == metric and when in present:
            return text
    return group.metrics[metric]


def _histogram_figure(tag: str, entries) -> str:
    """The first and the last logged histogram of ``tag`` (e.g. the Hessian spectral density) as bars."""
    import io

    from .plots import _pyplot, plain_log_ticks

    plt = _pyplot()
    picks = [entries[0]] if len(entries) == 1 else [entries[0], entries[-1]]
    fig, axes = plt.subplots(1, len(picks), figsize=(5.0 * len(picks), 3.0), squeeze=False)
    for ax, (step, limits, counts, low) in zip(axes[0], picks):
        lefts = [low] + list(limits[:-1])
        ax.bar(lefts, counts, width=[r - l for l, r in zip(lefts, limits)], align="edge", color="#1f77b4")
        ax.set_yscale("symlog", linthresh=1.0)
        plain_log_ticks(ax)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("count")
        ax.set_title(f"{tag.split('/')[-1].replace('_', ' ')} at step {step}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = f"{tag}: eigenvalue counts at steps {', '.join(str(p[0]) for p in picks)}"
    return f'<figure class=histogram><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}"></figure>'


def _group_texts(run: Run, group: Group) -> str:
    """The group's own text entries (e.g. the loss-spike forensics), newest last; mitigation events have their table."""
    entries = sorted((step, tag, text) for tag, items in run.texts.items() if group_of(tag) == group.name and tag != EVENTS_TAG
                     for step, text in items)
    if not entries:
        return ""
    body = "".join(f"<div class=entry><b>step {step}</b> <code>{html.escape(tag)}</code><pre>{html.escape(text)}</pre></div>"
                   for step, tag, text in entries)
    return f"<details open><summary>{html.escape(group.title)}: {len(entries)} text entr{'y' if len(entries) == 1 else 'ies'}</summary>{body}</details>"


def _figure(panels: List[Panel], markers: List[Marker], alt: str, ncols: int = 3) -> str:
    png = base64.b64encode(render_panels(panels, markers, ncols=ncols)).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}"></figure>'


def _events_table(events: List[Event]) -> str:
    if not events:
        return "<h3>Mitigation events</h3><p class=empty>None: dynscope did not intervene in this run.</p>"
    rows = "".join(
        f"<tr><td class=num>{e.step}</td><td>{html.escape(e.mitigation)}</td>"
        f"<td class='act {html.escape(e.action)}'>{html.escape(e.action)}</td><td>{html.escape(e.reason)}</td>"
        f"<td>{html.escape(', '.join(f'{k} = {v}' for k, v in e.values.items()))}</td></tr>"
        for e in events
    )
    return ("<h3>Mitigation events</h3><table class=events><thead><tr><th>step</th><th>mitigation</th><th>action</th>"
            f"<th>why</th><th>values</th></tr></thead><tbody>{rows}</tbody></table>")


def _finals_table(run: Run, groups: List[Group]) -> str:
    rows = []
    for group in groups:
        order = list(group.metrics)
        rank = lambda t: (order.index(t.split("/")[2]) if t.count("/") >= 2 and t.split("/")[2] in order else len(order), t)  # noqa: E731
        tags = _group_tags(run, group) if group.user else sorted(run.scalars, key=rank)
        for tag in tags:
            if not group.user and (group_of(tag) != group.name or not _is_ours(tag) or _is_layer_tag(group, tag)):
                continue
            s = run.scalars[tag]
            metric = tag if group.user else tag[len(f"{PREFIX}/{group.name}/"):] or group.name
            step, value = s.last
            unit = "" if group.user else group.unit(metric.split("/")[0])
            rows.append(
                f"<tr><td>{html.escape(group.title)}</td><td><code>{html.escape(metric)}</code></td>"
                f"<td class=num>{_num(value)}</td><td class=num>{step}</td>"
                f"<td class=num>{_num(float(s.values.min()))}</td><td class=num>{_num(float(s.values.max()))}</td>"
                f"<td>{html.escape(unit)}</td></tr>"
            )
    if not rows:
        return ""
    return ("<h3>Final values</h3><table class=finals><thead><tr><th>group</th><th>metric</th><th>final</th>"
            f"<th>at step</th><th>min</th><th>max</th><th>unit</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _is_layer_tag(group: Group, tag: str) -> bool:
    return any(c.matches(group.name, tag) for c in group.layer_charts)


def _num(x: float) -> str:
    return f"{x:.4g}"


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 24px 48px; color: #222; }}
header {{ border-bottom: 2px solid #e65100; margin-bottom: 12px; }}
h1 {{ margin: 18px 0 2px; font-size: 26px; }}
h2 {{ margin: 28px 0 4px; font-size: 20px; border-bottom: 1px solid #ddd; padding-bottom: 2px; }}
h3 {{ margin: 18px 0 6px; font-size: 15px; }}
.meta {{ color: #666; margin: 2px 0 10px; }}
.summary {{ margin: 4px 0; }}
ul.metrics {{ margin: 4px 0 8px; padding-left: 20px; color: #444; font-size: 13px; }}
figure {{ margin: 8px 0; }}
figure img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
details {{ margin: 6px 0; }}
summary {{ cursor: pointer; color: #1565c0; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 8px; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f5f5f5; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.act.on {{ color: #2e7d32; font-weight: 600; }}
td.act.off {{ color: #757575; }}
.empty {{ color: #777; font-style: italic; }}
code {{ font-size: 12.5px; }}
div.entry pre {{ white-space: pre-wrap; background: #fafafa; border: 1px solid #eee; padding: 6px; font-size: 12px; }}
</style></head><body>"""
