"""Side-by-side timing shared by the benchmarks: interleaved repeats, medians."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple


def interleaved_medians(
    fns: Dict[str, Callable[[], Any]],
    repeats: int,
    clock: Callable[[], float] = time.process_time,
    synchronize: Optional[Callable[[], None]] = None,
) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """Median seconds of each function over ``repeats`` rounds, and each one's result.

    Every function is called once untimed first (a warm-up, whose result is returned). Each round
    calls all of them, in reverse order every other round, so that a drift in the machine's speed
    hits them alike. ``clock``: CPU time by default (on a shared machine it counts this process
    alone); on a GPU wall time with ``synchronize`` (e.g. ``torch.cuda.synchronize``), called
    before each reading of the clock. Warnings the functions raise are silenced (PyHessian's
    ``backward(create_graph=True)`` warns on every call).

    Example:
        >>> medians, results = interleaved_medians({"sum": lambda: sum(range(100))}, repeats=3)
        >>> sorted(medians), results["sum"]
        (['sum'], 4950)
    """
    sync = synchronize or (lambda: None)
    times: Dict[str, list] = {name: [] for name in fns}
    results: Dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in fns.items():
            results[name] = fn()
        order = list(fns.items())
        for r in range(repeats):
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                sync()
                start = clock()
                fn()
                sync()
                times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results
