"""Cost of local complexity (linear-region density) in units of one training step.

LC at 1,024 points with 2 x 25 vertices each (51,200 vertices through the model) on a
784-200-200-10 ReLU MLP and on a small CNN (1x28x28 inputs), synthetic data, for several chunk
sizes (points per batched forward), next to one SGD training step (batch 128) of the same model,
all measured side by side in one run. Peak memory is the largest increase of the process's
resident memory over the call, sampled every millisecond by a thread (on a GPU it would be
``torch.cuda.max_memory_allocated``); the allocator is told to return large blocks to the system
so the samples follow the live tensors.

    python benchmarks/bench_regions.py [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from dynscope import local_complexity

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD: fixed, so freed large tensors leave the RSS at once
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_increase(fn: Callable[[], object]) -> Tuple[float, int]:
    """Seconds and the peak resident-memory increase (bytes, sampled) of ``fn()``."""
    if LIBC is not None:
        LIBC.malloc_trim(0)
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    peak[0] = max(peak[0], rss_bytes())
    return seconds, peak[0] - base


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )


class FunctionalMLP(nn.Module):
    """The same MLP calling F.relu in forward: measured with ``functional=True``."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net[4](F.relu(self.net[2](F.relu(self.net[0](x)))))


def train_step_seconds(model: nn.Module, repeats: int, batch: int = 128) -> float:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats * 3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(quick: bool = False) -> int:
    torch.manual_seed(0)
    points = 128 if quick else 1024
    directions = 25
    repeats = 1 if quick else 2
    chunks = [16, None, points] if not quick else [16, None]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(points, 784, generator=g)  # synthetic "images" in [0, 1]
    radius = 0.05

    rows: List[Tuple[str, str, float, float, float]] = []
    print(f"local complexity: {points} points x {2 * directions} vertices, radius {radius}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU (shared machine: timings are noisy)")
    for name, model in (("mlp 784-200-200-10", mlp()), ("cnn 2 conv + fc", cnn())):
        step = train_step_seconds(model, repeats)
        variants = [(f"chunk={c or 'default'}", model, c, False) for c in chunks]
        if name.startswith("mlp"):
            variants.append(("F.relu, functional=True", FunctionalMLP(model), None, True))
        for label, net, chunk, functional in variants:
            run = lambda: local_complexity(net, x, radius, directions, chunk_size=chunk, functional=functional)  # noqa: E731
            local_complexity(net, x[:2], radius, directions, functional=functional)  # warm-up
            samples = [peak_rss_increase(run) for _ in range(repeats)]
            seconds = statistics.median(s for s, _ in samples)
            memory = max(m for _, m in samples)
            rows.append((name, label, step, seconds, memory))

    header = f"{'model':<20} {'variant':<26} {'train step ms':>13} {'LC s':>8} {'LC / step':>10} {'peak RSS +MiB':>14}"
    print(header)
    print("-" * len(header))
    for name, label, step, seconds, memory in rows:
        print(f"{name:<20} {label:<26} {step * 1e3:13.2f} {seconds:8.3f} {seconds / step:10.1f} {memory / 2**20:14.1f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 points, one repeat")
    sys.exit(main(parser.parse_args().quick))
