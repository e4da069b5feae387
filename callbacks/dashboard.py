"""Writing the dynscope dashboard into a run's TensorBoard log: the layout and mitigation events.

:func:`write_layout` is called by every dynscope callback in ``setup``. It keeps, per log
directory (per TensorBoard writer), the union of the groups seen so far and rewrites the custom-scalars layout whenever a
new group arrives (TensorBoard shows the latest layout of a run). The "Training (your metrics)"
group, the module's own loss and accuracy series, is always part of it. Charts with a stability
line also get a constant 1.0 series (``dynscope/reference/stability_line``) at step 0, at
``max_steps`` when the trainer knows it, and at every step a stability ratio is logged
(:func:`~dynscope.callbacks.logging.log_scalars`), so epoch-based runs get the line too. Nothing
happens off rank zero or without a TensorBoard logger, and a failure only warns: the dashboard
must never stop training.

:func:`log_mitigation_event` is what every mitigation calls when it switches: the 0/1 scalar
``dynscope/mitigation/<name>``, a text entry under ``dynscope/mitigation/events``, the
"Mitigations" group in the layout, and one line on the console (as Lightning's EarlyStopping
prints when it stops a run).

Example:
    >>> import tempfile, pytorch_lightning as pl
    >>> from dynscope.callbacks.dashboard import write_layout
    >>> logger = pl.loggers.TensorBoardLogger(tempfile.mkdtemp(), name="run")
    >>> trainer = pl.Trainer(logger=logger, max_steps=10, enable_progress_bar=False)
    >>> write_layout(trainer, ["curvature"])
    ['training', 'curvature']
    >>> write_layout(trainer, ["noise"])          # merged with what the run already has
    ['training', 'curvature', 'noise']
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Iterable, List, Mapping, Optional, Set

from dynscope.dashboards.events import EVENTS_TAG, format_event
from dynscope.dashboards.groups import USER
from dynscope.dashboards.layout import STABILITY_LINE_TAG, known_groups, layout_summary, needs_stability_line

from ._lightning import TensorBoardLoggerTypes, is_global_zero, lightning_package
from .logging import log_scalars, log_text, tag

__all__ = ["log_mitigation_event", "write_layout"]

_lock = threading.Lock()
_groups_by_writer: "weakref.WeakKeyDictionary[object, Set[str]]" = weakref.WeakKeyDictionary()


def write_layout(trainer, groups: Iterable[str]) -> Optional[List[str]]:
    """Add ``groups`` to the custom-scalars layout of every TensorBoard logger of ``trainer``.

    Returns the groups now in the layout of the (last) TensorBoard log directory, or ``None``
    when there is nothing to write to (no TensorBoard logger, not rank zero).
    """
    if not is_global_zero(trainer):
        return None
    result = None
    for logger in getattr(trainer, "loggers", []) or []:
        if not isinstance(logger, TensorBoardLoggerTypes):
            continue
        try:
            result = _write(logger, trainer, groups)
        except Exception as error:  # noqa: BLE001 - the dashboard must not end a run
            warnings.warn(f"dynscope: could not write the TensorBoard layout: {error}", RuntimeWarning, stacklevel=2)
    return result


def _write(logger, trainer, groups: Iterable[str]) -> List[str]:
    writer = logger.experiment
    with _lock:
        seen = _groups_by_writer.setdefault(writer, set())
        had_line = needs_stability_line(seen)
        new = set(known_groups(list(groups) + [USER])) - seen
        seen |= new
        merged = known_groups(seen)
        if new:
            writer._get_file_writer().add_summary(layout_summary(merged), 0)
            if needs_stability_line(new) and not had_line:
                horizon = int(getattr(trainer, "max_steps", -1) or -1)
                for step in sorted({0, horizon} - {-1}):
                    writer.add_scalar(STABILITY_LINE_TAG, 1.0, step)
            writer.flush()
    return merged


def log_mitigation_event(
    trainer, mitigation: str, active: bool, reason: str, values: Mapping[str, float] = (), step: Optional[int] = None,
    scalar: bool = True,
) -> str:
    """Log that ``mitigation`` switched on (``active=True``) or off, why, and the values behind it.

    Writes the scalar ``dynscope/mitigation/<mitigation>`` (1.0 or 0.0) through every logger (unless
    ``scalar=False``: the caller logs it) and a Markdown text entry ``dynscope/mitigation/events`` on
    loggers with ``add_text``, adds the Mitigations group to the layout and prints one console line.
    Returns the text.

    Example (inside a callback)::

        log_mitigation_event(trainer, "stablemax", True, "softmax collapse 0.31 > 0.10",
                             {"sc_fraction": 0.31})
    """
    step = int(trainer.global_step if step is None else step)
    text = format_event(mitigation, "on" if active else "off", step, reason, values)
    write_layout(trainer, ("mitigation",))
    if scalar:
        log_scalars(trainer, {tag("mitigation", mitigation): 1.0 if active else 0.0}, step)
    log_text(trainer, EVENTS_TAG, text, step)
    if is_global_zero(trainer):
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in dict(values).items())
        line = f"dynscope: {mitigation} switched {'on' if active else 'off'} at step {step}: {reason}"
        _console(trainer, line + (f" [{shown}]" if shown else ""))
    return text


def _console(trainer, line: str) -> None:
    """One line on the console through Lightning's own logger (shown like EarlyStopping's messages)."""
    try:
        lightning_package(trainer).utilities.rank_zero_info(line)
    except Exception:  # noqa: BLE001 - a message must not end a run
        print(line)
