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


def print_table(header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A plain, aligned text table."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.rjust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for row in cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
