"""A small text progress bar for reading large logs (stderr; redrawn in place on a terminal).

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(2_000_000, "reading logs", stream=out, tty=False)
    >>> bar.advance(2_000_000); bar.close()
    >>> out.getvalue().strip()
    'reading logs [##############################] 100%  2.0/2.0 MB'
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """``label [#####.....]  45%  1.2/2.7 MB``; on a terminal redrawn at most ten times a second,
    elsewhere printed once when done."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, tty: Optional[bool] = None,
                 width: int = 30) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self.done = 0
        self._drawn = 0.0
        self._closed = False

    def advance(self, n: int) -> None:
        self.done = min(self.done + int(n), self.total)
        now = time.monotonic()
        if self.tty and now - self._drawn > 0.1:
            self._drawn = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label} [{bar}] {frac:4.0%}  {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.done = self.total
        self.stream.write(("\r" if self.tty else "") + self.line() + "\n")
        self.stream.flush()
