"""Pieces the demos share: run directories, a quiet Trainer, a history recorder, plain tables."""

from __future__ import annotations

import os
import time
from typing import List, Sequence

from dynscope.callbacks._lightning import CallbackBase


def run_dir(root: str, name: str) -> str:
    """``<root>/<name>-<timestamp>``: a fresh TensorBoard run directory."""
    return os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def lightning_trainer(max_steps: int, callbacks: list, logdir: str, progress: bool = True, **kwargs):
    """A CPU Trainer logging to TensorBoard under ``logdir``, with Lightning's progress bar."""
    import pytorch_lightning as pl

    root, name = os.path.split(logdir)
    options = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=pl.loggers.TensorBoardLogger(root, name=name, version=""),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=10,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


class History(CallbackBase):
    """Records ``(step, training loss, metrics)`` each time one of the watched diagnostics measured."""

    def __init__(self, *diagnostics) -> None:
        self.diagnostics = diagnostics
        self.rows: List[tuple] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        merged = {}
        for d in self.diagnostics:
            if d._last_step == step and d.last_metrics:
                merged.update(d.last_metrics)
        if merged:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.rows.append((step, float(loss), merged))


def format_table(header: Sequence[str], rows: Sequence[Sequence], width: int = 100) -> List[str]:
    """A plain, right-aligned text table no wider than ``width`` columns where it can be.

    A table too wide for the terminal is turned around (one line per column, one column per row,
    the rows' first cells as headings); cells still too long are cut with "…".

    >>> print("\\n".join(format_table(["run", "test acc"], [("control", "0.010"), ("auto", "0.990")])))
        run  test acc
    -------  --------
    control     0.010
       auto     0.990
    """
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    lines = _aligned(cells)
    if max(map(len, lines)) <= width or not rows:
        return lines
    turned = [list(column) for column in zip(*cells)]
    lines = _aligned(turned, left_first=True)
    if max(map(len, lines)) <= width:
        return lines
    columns = len(turned[0])
    budget = max(8, (width - len(max((r[0] for r in turned), key=len)) - 2 * columns) // max(1, columns - 1))
    cut = [[r[0]] + [c if len(c) <= budget else c[: budget - 1] + "…" for c in r[1:]] for r in turned]
    return _aligned(cut, left_first=True)


def _aligned(cells: List[List[str]], left_first: bool = False) -> List[str]:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def line(row):
        return "  ".join(c.ljust(w) if left_first and i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [line(cells[0]).rstrip(), "  ".join("-" * w for w in widths)] + [line(r).rstrip() for r in cells[1:]]


def print_table(header: Sequence[str], rows: Sequence[Sequence], width: int = 100) -> None:
    """Print :func:`format_table` (fits ``width`` columns, 100 by default)."""
    for line in format_table(header, rows, width):
        print(line)
