"""The GPU column (issue 14): dynscope's batched kernels against PyHessian and curvlinops on one CUDA device.

Run on a machine with a GPU: ``python benchmarks/bench_gpu.py [--repeats 7]`` (the anchors are
optional, see ``anchors.py``; a missing one reads "n/a").

Wall-clock seconds between ``torch.cuda.synchronize()`` calls (on a GPU the host's CPU time says
nothing about the work), median of interleaved repeats after a warm-up, on the benchmark models
(eval mode, float32, the math attention kernel for the transformer):

1. the trace with 32 probes: ``dynscope.hessian_trace`` as a user calls it (``method="auto"``: on a
   GPU the batched forward-over-reverse kernel, 32 probes per call) and its per-probe loop, vs PyHessian's ``trace(maxIter=32)``
   and curvlinops' ``hutchinson_trace``; ratio = PyHessian / dynscope (target >= 5x) and the best
   anchor / dynscope;
2. ``lambda_max`` to 1% from a random start: dynscope's Lanczos (``tol=1e-2``) vs PyHessian's power
   iteration (``tol=1e-3``), each with its relative error against a ``tol=1e-9`` Lanczos reference;
3. the gradient SNR (per-sample gradients) against one SGD training step on the same batch.

Measured on an NVIDIA H200 (torch 2.11, CUDA 13), medians of 9 (ms):

==================================  ========  =====  =========  ==========  ====================
32-probe trace                      dynscope  loop   PyHessian  curvlinops  PyHessian / dynscope
==================================  ========  =====  =========  ==========  ====================
MLP 85k / B128                      11.1      71.3   79.0       12.4        7.1x
MLP 2k / B512                       9.1       66.0   71.8       11.2        7.9x
CNN+BN 16x16 / B64                  20.4      132    146        25.4        7.1x
transformer d64 L2 T32 / B64        49.0      480    529        54.6        10.8x
MLP 1.9M / B512                     34.6      89.6   79.2       13.6        2.3x
==================================  ========  =====  =========  ==========  ====================

Before the accelerator rules (the CPU's chunk rule, one probe per call on the CNN, the transformer
and the 1.9M MLP; the reverse kernel) the same column read 3.0x, 5.8x, 0.92x, 0.80x and 0.46x.
``lambda_max`` to 1% is one product at a time (Lanczos), so batching does not apply: 1.2-1.5x
PyHessian's power iteration on the four benchmark models, 0.76x on the 1.9M MLP. The gradient SNR
costs 2.9-7.4 training steps there (host-bound: hundreds of small kernel launches per call).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_anchors import cnn_bn  # noqa: E402
from bench_curvature import SmallTransformer, mlp  # noqa: E402
from dynscope import Objective, gradient_snr, hessian_trace, top_eigenvalues  # noqa: E402
from dynscope.kernel_choice import kernel_plan  # noqa: E402
from timing import interleaved_medians  # noqa: E402

from anchors import PyHessian, available, curvlinops, curvlinops_hessian, pyhessian_lambda_max, pyhessian_trace  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_medians(fns, repeats, device):
    """Median wall seconds of each function over interleaved repeats (and each one's result), the
    device synchronised around each call."""
    return interleaved_medians(fns, repeats, clock=time.perf_counter, synchronize=lambda: synchronize(device))


def cases(device: torch.device, quick: bool):
    torch.manual_seed(0)
    out = [
        ("MLP 64-256-256-10 (85k) / B128", mlp((64, 256, 256, 10)), torch.randn(128, 64), torch.randint(0, 10, (128,))),
        ("MLP 20-32-32-10 (2k) / B512", mlp((20, 32, 32, 10)), torch.randn(512, 20), torch.randint(0, 10, (512,))),
        ("CNN+BN 16x16 / B64", cnn_bn(), torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))),
        ("transformer d64 L2 T32 / B64", SmallTransformer(), torch.randint(0, 64, (64, 32)), torch.randint(0, 10, (64,))),
    ]
    if not quick:
        out.append(("MLP 784-1024-1024-10 (1.9M) / B512", mlp((784, 1024, 1024, 10)), torch.randn(512, 784),
                    torch.randint(0, 10, (512,))))
    trained = []
    for name, model, x, y in out:  # 20 SGD steps: away from the symmetric point at initialisation
        model, x, y = model.to(device), x.to(device), y.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        trained.append((name, model.eval(), x, y))
    return trained


def bench_trace(all_cases, repeats, device):
    cuda = device.type == "cuda"
    print("1. trace, 32 probes (wall s)              batched     loop   PyHessian  curvlinops   "
          "PyHessian / batched (target >= 5x)   best anchor / batched   loop / batched")
    for name, model, x, y in all_cases:
        obj = Objective(model, F.cross_entropy, (x, y))
        fns = {"batched": lambda: hessian_trace(obj, 32, seed=0).value,
               "loop": lambda: hessian_trace(obj, 32, seed=0, hvp_method="loop").value}
        if PyHessian:
            fns["pyhessian"] = lambda: pyhessian_trace(model, x, y, 32, cuda)
        if curvlinops:
            op = curvlinops_hessian(model, x, y)
            fns["curvlinops"] = lambda: float(curvlinops.hutchinson_trace(op, 32))
        try:
            t, _ = wall_medians(fns, repeats, device)
        except Exception as error:  # noqa: BLE001 - one case failing must not hide the others
            print(f"   {name:<36} failed: {type(error).__name__}: {error}", flush=True)
            continue
        cells = [f"{t[k]:9.4f}" if k in t else f"{'n/a':>9}" for k in ("batched", "loop", "pyhessian", "curvlinops")]
        anchors = [t[k] for k in ("pyhessian", "curvlinops") if k in t]
        vs_pyhessian = f"{t['pyhessian'] / t['batched']:6.2f}x" if "pyhessian" in t else "   n/a"
        vs_best = f"{min(anchors) / t['batched']:6.2f}x" if anchors else "   n/a"
        print(f"   {name:<36} {' '.join(cells)}   {vs_pyhessian:>22}   {vs_best:>24}   "
              f"{t['loop'] / t['batched']:9.2f}x", flush=True)


def bench_kernels(all_cases, repeats, device):
    """Each HVP kernel at its default chunk and with one probe per batched call (``chunk_size=1``: the
    CPU rule's chunk on the CNN and the transformer)."""
    variants = [("reverse", None), ("reverse", 1), ("forward", None), ("forward", 1), ("loop", None)]
    print("0. trace, 32 probes, by kernel and chunk (wall s)   " + "  ".join(f"{m}/{c or 'default'}" for m, c in variants))
    for name, model, x, y in all_cases:
        obj = Objective(model, F.cross_entropy, (x, y))
        fns = {f"{m}/{c}": (lambda m=m, c=c: hessian_trace(obj, 32, seed=0, hvp_method=m, chunk_size=c).value)
               for m, c in variants}
        chunk = kernel_plan(obj, 32, "reverse")[1]
        try:
            t, values = wall_medians(fns, repeats, device)
        except Exception as error:  # noqa: BLE001
            print(f"   {name:<36} failed: {type(error).__name__}: {error}", flush=True)
            continue
        spread = max(values.values()) - min(values.values())
        print(f"   {name:<36} " + "  ".join(f"{t[k]:8.4f}" for k in fns)
              + f"   (default chunk {chunk}; values agree to {spread / abs(values['loop/None']):.1e})", flush=True)


def bench_eigen(all_cases, repeats, device):
    cuda = device.type == "cuda"
    print("2. lambda_max to 1% from a random start (wall s / HVPs / rel. error)")
    for name, model, x, y in all_cases:
        obj = Objective(model, F.cross_entropy, (x, y))
        ref = top_eigenvalues(obj, which="LA", tol=1e-9, max_iter=300).value
        runs = {"dynscope Lanczos": lambda: top_eigenvalues(obj, which="LA", tol=1e-2, seed=0)}
        if PyHessian:
            runs["PyHessian power"] = lambda: pyhessian_lambda_max(model, x, y, 1e-3, cuda)
        try:
            t, out = wall_medians(runs, repeats, device)
        except Exception as error:  # noqa: BLE001
            print(f"   {name:<36} failed: {type(error).__name__}: {error}", flush=True)
            continue
        cells = []
        for key, res in out.items():
            value, hvps = (res.value, res.num_matvecs) if key.startswith("dynscope") else (res, "~")
            cells.append(f"{key} {t[key]:.4f} s {hvps!s:>3} HVPs err {abs(value - ref) / abs(ref):.1e}")
        ratio = f"   PyHessian / dynscope {t['PyHessian power'] / t['dynscope Lanczos']:.2f}x" if PyHessian else ""
        print(f"   {name:<36} " + " | ".join(cells) + ratio, flush=True)


def bench_snr(all_cases, repeats, device):
    print("3. gradient SNR vs one SGD step on the same batch (wall s)")
    for name, model, x, y in all_cases:
        train = copy.deepcopy(model).train()
        opt = torch.optim.SGD(train.parameters(), lr=1e-4)

        def step():
            opt.zero_grad()
            F.cross_entropy(train(x), y).backward()
            opt.step()

        obj = Objective(model, F.cross_entropy, (x, y))
        try:
            t, _ = wall_medians({"step": step, "gsnr": lambda: gradient_snr(obj)}, repeats, device)
        except Exception as error:  # noqa: BLE001
            print(f"   {name:<36} failed: {type(error).__name__}: {error}", flush=True)
            continue
        print(f"   {name:<36} step {t['step']:.4f}   gsnr {t['gsnr']:.4f}   {t['gsnr'] / t['step']:6.2f}x a step", flush=True)


def main(repeats: int = 7, quick: bool = False, device: str = "cuda", kernels: bool = False) -> int:
    dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (no CUDA device: the column is not a GPU one)"
    print(f"torch {torch.__version__} on {where}; {available()}", flush=True)
    all_cases = cases(dev, quick)
    with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
        if kernels:
            bench_kernels(all_cases, repeats, dev)
        bench_trace(all_cases, repeats, dev)
        bench_eigen(all_cases, repeats, dev)
        bench_snr(all_cases, repeats, dev)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="skip the 1.9M-parameter MLP")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernels", action="store_true", help="also time each kernel at its default chunk and at one probe per call")
    args = parser.parse_args()
    sys.exit(main(args.repeats, args.quick, args.device, args.kernels))
