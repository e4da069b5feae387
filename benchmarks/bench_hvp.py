"""Per-call cost and memory of one Hutchinson trace (issue 14, item 5), side by side in one process.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_hvp.py [--repeats 7] [--no-memory]`` or ``dynscope bench hvp``.

1. A 32-probe trace, everything a caller pays counted: dynscope builds its ``Objective`` and runs
   ``hessian_trace``; curvlinops builds its ``HessianLinearOperator`` and runs ``hutchinson_trace``;
   PyHessian builds ``hessian`` and runs ``trace``. CPU seconds (``time.process_time``), median of
   interleaved repeats, one thread. Ratio = anchor / dynscope (target: >= 1, i.e. no loss, on the
   tiny 2k MLP and at batch 512).
2. Peak memory of the same trace on a CNN with BatchNorm: the rise of the resident high-water mark
   (``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up call) in a fresh process, for
   dynscope's per-probe loop, its batched kernel at the default cap and at a 2 GiB cap, and
   PyHessian. Target: the batched kernel at the default cap within 2x of the loop.
   ``--memory-case "CNN+BN 3-16-32-32 / B128 32x32"`` measures the issue's size (slow: ~15 CPU s
   per trace).

Measured on the project's 2-core CPU under load from other jobs (medians of 9; a 96-probe trace
in parentheses), ratio = anchor / dynscope:

=============================  ==========  =============  ===========
case                           dynscope    vs curvlinops  vs PyHessian
=============================  ==========  =============  ===========
MLP 2k / B32                   5.4 ms      2.27x (2.42x)  6.40x
MLP 2k / B512                  32.3 ms     1.19x (1.29x)  1.50x
MLP 85k / B512                 326 ms      1.52x          1.07x
CNN+BN / B32 16x16             697 ms      2.24x          1.00x
=============================  ==========  =============  ===========

Peak memory (MiB): CNN+BN B32 16x16: loop 10.7, batched at the default cap 17.9 (1.7x), at 2 GiB
242.8, PyHessian 18.9; CNN+BN B128 32x32: loop 228, batched at the default cap 124, at 2 GiB 885,
PyHessian 267.

Anchors are optional (``pip install --no-deps curvlinops-for-pytorch scipy einops einconv opt-einsum
linear_operator``, ``pip install --no-deps pyhessian``); a missing one reads "n/a".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bench_noise import _status_kib  # the same /proc reader for peak memory
from dynscope import Objective, hessian_trace

from anchors import PyHessian, curvlinops, curvlinops_hessian, pyhessian_trace
from timing import interleaved_medians

HERE = os.path.dirname(os.path.abspath(__file__))
PROBES = 32


def mlp(sizes) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn_bn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10),
    )


CASES = {
    "MLP 20-32-32-10 (2k) / B32": (lambda: mlp((20, 32, 32, 10)), (32, 20)),
    "MLP 20-32-32-10 (2k) / B512": (lambda: mlp((20, 32, 32, 10)), (512, 20)),
    "MLP 64-256-256-10 (85k) / B512": (lambda: mlp((64, 256, 256, 10)), (512, 64)),
    "CNN+BN 3-16-32-32 / B32 16x16": (cnn_bn, (32, 3, 16, 16)),
}
# memory only (``--memory-case``): a trace takes ~15 CPU s here
LARGE = {"CNN+BN 3-16-32-32 / B128 32x32": (cnn_bn, (128, 3, 32, 32))}


def setup(name):
    torch.manual_seed(0)
    build, shape = {**CASES, **LARGE}[name]
    model = build().eval()
    return model, torch.randn(*shape), torch.randint(0, 10, (shape[0],))


def tracers(model, x, y, cap=None, method="auto"):
    fns = {"dynscope": lambda: hessian_trace(Objective(model, F.cross_entropy, (x, y)), PROBES, seed=0,
                                             hvp_method=method, memory_cap=cap)}
    if curvlinops is not None:  # building the operator is part of what a caller pays
        fns["curvlinops"] = lambda: curvlinops.hutchinson_trace(curvlinops_hessian(model, x, y), PROBES)
    if PyHessian is not None:
        fns["PyHessian"] = lambda: pyhessian_trace(model, x, y, PROBES)  # leaves the model in eval mode, as it was
    return fns


def _memory_child(spec_json: str) -> None:
    """In a fresh process: the resident high-water mark's rise over one trace (MiB), as JSON."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    spec = json.loads(spec_json)
    model, x, y = setup(spec["case"])
    fn = tracers(model, x, y, spec.get("cap"), spec.get("method", "auto")).get(spec["who"])
    fn()  # warm-up: thread pools, functorch, allocator arenas
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kib("VmRSS")
    fn()
    print(json.dumps({"mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_mib(**spec):
    code = f"import sys; sys.path.insert(0, {HERE!r}); import bench_hvp; bench_hvp._memory_child({json.dumps(spec)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])["mib"]
    except (IndexError, ValueError, KeyError):
        return None


def main(quick: bool = False, repeats: int = 7, memory: bool = True, memory_case: str = "CNN+BN 3-16-32-32 / B32 16x16",
         timing: bool = True) -> int:
    if quick:
        repeats, memory = min(repeats, 2), False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); curvlinops "
          f"{'available' if curvlinops else 'n/a'}, PyHessian {'available' if PyHessian else 'n/a'}")
    print(f"1. trace, {PROBES} probes, set-up included (CPU ms)   dynscope  curvlinops  PyHessian   ratios")
    for name in CASES if timing else ():
        model, x, y = setup(name)
        t = interleaved_medians(tracers(model, x, y), repeats)[0]
        ours = t["dynscope"]
        cells = [f"{1e3 * t[k]:9.1f}" if k in t else "      n/a" for k in ("dynscope", "curvlinops", "PyHessian")]
        ratios = "  ".join(f"{k} {t[k] / ours:4.2f}x" for k in ("curvlinops", "PyHessian") if k in t)
        print(f"   {name:<34} {'  '.join(cells)}   {ratios}", flush=True)
    if memory:
        case = memory_case
        print(f"2. peak memory of the trace on {case} (MiB over the resident set)")
        rows = [("dynscope loop", dict(who="dynscope", method="loop")),
                ("dynscope reverse, default cap", dict(who="dynscope", method="reverse")),
                ("dynscope reverse, 2 GiB cap", dict(who="dynscope", method="reverse", cap=2 * 1024**3)),
                ("PyHessian", dict(who="PyHessian"))]
        for label, spec in rows:
            mib = peak_mib(case=case, **spec)
            print(f"   {label:<32} {'n/a' if mib is None else f'{mib:7.1f}'}", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--memory-case", default="CNN+BN 3-16-32-32 / B32 16x16", choices=[*CASES, *LARGE])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.exit(main(False, args.repeats, not args.no_memory, args.memory_case, not args.no_timing))
