"""Cost of gradient-noise measurements (GSNR, noise scale) against a training step, BackPACK and Cockpit.

1. MLPs 64-256-256-10 and 256-1024-1024-10 (batch 128) and the small CNN of ``bench_overhead.py``
   (two 3x3 conv + max-pool blocks and two Linear layers on 3x32x32 images, batch 64),
   cross-entropy, synthetic data: one plain SGD step, dynscope's measurement (hook fast path;
   vmap path with the default and a small memory cap; and a training step whose own forward and
   backward give the moments, ``dynscope.step_capture.StepCapture``, as ``GradientNoise`` measures
   where the step's loss is the objective's), and, when they import, Cockpit's MeanGSNR
   step and BackPACK's Variance extension (``pip install --no-deps backpack-for-pytorch einops
   unfoldNd``; rows say "not installed" otherwise), side by side in one run. Issue 14's targets:
   dynscope's GSNR measurement <= 2x a training step and <= BackPACK's Variance step; the
   summary table prints both ratios to the plain step next to each other (for the captured step:
   what it adds to the plain step).
2. Per-sample gradients of a small transformer: vmap vs a loop of per-sample backward passes.

Times are CPU time (``time.process_time``) on ``--threads`` threads (default 1: on a shared
machine wall time mostly measures the neighbours), medians of repeats interleaved across the rows
so that load swings hit every row alike; the vmap rows in a round of their own (with the plain
step again as their baseline), since the memory they free would be faulted in again by the next
row. Peak memory is the rise of the resident-set high-water
mark (``VmHWM``, reset just before the call) of a fresh subprocess over the call, after the model
and batch are built. Cockpit 1.0.2 imports ``pkg_resources``, gone from setuptools >= 81; a
minimal stand-in is installed when missing.

    OMP_NUM_THREADS=1 python benchmarks/bench_noise.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
import types
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dynscope import Objective, per_sample_grads, per_sample_moments
from dynscope.noise import gradient_noise_scale, gradient_snr
from dynscope.step_capture import StepCapture

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL_CAP = 64 * 2**20


# -- models and data -------------------------------------------------------------------------------


def mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class Transformer(nn.Module):
    def __init__(self, vocab=512, dim=64, heads=4, seq=32, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.1)
        self.block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, activation="gelu", norm_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens) + self.pos).mean(1))


def small_cnn() -> nn.Sequential:
    """The CNN of ``bench_overhead.py`` (3x32x32 inputs, 10 classes)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def setup(spec: Dict):
    torch.manual_seed(0)
    if spec["model"] == "transformer":
        model = Transformer(seq=spec["seq"])
        x = torch.randint(0, 512, (spec["batch"], spec["seq"]))
    elif spec["model"] == "cnn":
        model = small_cnn()
        x = torch.randn(spec["batch"], 3, 32, 32)
    else:
        d_in, hidden = spec["model"]
        model = mlp(d_in, hidden)
        x = torch.randn(spec["batch"], d_in)
    y = torch.randint(0, 10, (spec["batch"],))
    return model, x, y


# -- what is measured ------------------------------------------------------------------------------


def plain_step(model, x, y) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays the same across repeats

    def run():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


def dynscope_measure(model, x, y, method="auto", memory_cap=2 * 1024**3) -> Callable[[], None]:
    def run():
        obj = Objective(model, F.cross_entropy, (x, y))
        moments = per_sample_moments(obj, method, memory_cap=memory_cap, check=False)  # the callback checks once
        gradient_snr(moments), gradient_noise_scale(moments)

    return run


def captured_step(model, x, y) -> Callable[[], None]:
    """A training step whose own forward and backward give the moments (what ``GradientNoise`` does
    after its first measurement where the step's loss is the objective's): the step is included."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def run():
        opt.zero_grad()
        with StepCapture(Objective(model, F.cross_entropy, (x, y))) as capture:
            loss = F.cross_entropy(model(x), y)
            capture.saw_loss(loss)
            loss.backward()
        moments = capture.moments()
        gradient_snr(moments), gradient_noise_scale(moments)
        opt.step()

    return run


def per_sample_loop(model, x, y) -> Callable[[], None]:
    params = [p for p in model.parameters()]

    def run():
        rows = []
        for i in range(x.shape[0]):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            rows.append(torch.autograd.grad(loss, params))
        [torch.stack(g) for g in zip(*rows)]

    return run


def per_sample_vmap(model, x, y) -> Callable[[], None]:
    return lambda: per_sample_grads(Objective(model, F.cross_entropy, (x, y)))


def _pkg_resources_stand_in() -> None:
    try:
        import pkg_resources  # noqa: F401
        return
    except ImportError:
        pass
    module = types.ModuleType("pkg_resources")

    class DistributionNotFound(Exception):
        pass

    def get_distribution(name):
        try:
            return types.SimpleNamespace(version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError as error:
            raise DistributionNotFound(name) from error

    module.DistributionNotFound, module.get_distribution = DistributionNotFound, get_distribution
    sys.modules["pkg_resources"] = module


def cockpit_step(model, x, y) -> Optional[Callable[[], None]]:
    """A training step with Cockpit tracking MeanGSNR (None if Cockpit does not import)."""
    try:
        _pkg_resources_stand_in()
        from backpack import extend
        from cockpit import Cockpit, quantities
        from cockpit.utils import schedules
    except Exception:  # noqa: BLE001 - any import failure means "unavailable"
        return None
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    cockpit = Cockpit(list(model.parameters()), quantities=[quantities.MeanGSNR(track_schedule=schedules.linear(1))])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = {"step": 0}

    def run():
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        losses = F.cross_entropy(out, y, reduction="none")
        with cockpit(state["step"], info={"batch_size": x.shape[0], "individual_losses": losses, "loss": loss}):
            loss.backward(create_graph=cockpit.create_graph(state["step"]))
        opt.step()
        state["step"] += 1

    return run


def backpack_variance_step(model, x, y) -> Optional[Callable[[], None]]:
    """A training step with BackPACK's Variance extension and GSNR from it (None if unavailable)."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import Variance
    except Exception:  # noqa: BLE001
        return None
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = x.shape[0]

    def run():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        with backpack(Variance()):
            loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        var = torch.cat([p.variance.flatten() for p in model.parameters()]) * batch**2
        (g.square() / (var + 1e-5)).mean().item()
        opt.step()

    return run


KINDS = {
    "plain step": plain_step,
    "dynscope fast path": dynscope_measure,
    "step + dynscope from its backward": captured_step,
    "dynscope vmap (2 GiB cap)": lambda m, x, y: dynscope_measure(m, x, y, "vmap"),
    f"dynscope vmap ({SMALL_CAP >> 20} MiB cap)": lambda m, x, y: dynscope_measure(m, x, y, "vmap", SMALL_CAP),
    "Cockpit MeanGSNR step": cockpit_step,
    "BackPACK Variance step": backpack_variance_step,
    "per-sample loop": per_sample_loop,
    "per-sample vmap": per_sample_vmap,
}


# -- timing and memory -----------------------------------------------------------------------------


def median_ms(fns: Dict[str, Optional[Callable[[], None]]], repeats: int, warmup: int = 2) -> Dict[str, Optional[float]]:
    """Median CPU time of each function; repeats are interleaved so that load swings hit all alike."""
    live = {k: f for k, f in fns.items() if f is not None}
    for fn in live.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in live}
    for _ in range(repeats):
        for kind, fn in live.items():
            start = time.process_time()
            fn()
            times[kind].append(time.process_time() - start)
    return {k: (1000 * statistics.median(times[k]) if k in times else None) for k in fns}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memory_child(spec_json: str) -> None:
    """In a fresh process: peak resident memory added by one call (MiB), printed as JSON.

    Writing 5 to ``/proc/self/clear_refs`` resets the high-water mark (``VmHWM``) to the current
    resident size, so the import's transient peak does not hide the call's.
    """
    warnings.filterwarnings("ignore")
    spec = json.loads(spec_json)
    model, x, y = setup(spec)
    fn = KINDS[spec["kind"]](model, x, y)
    if fn is None:
        print(json.dumps({"mib": None}))
        return
    fn()  # warm-up: first-call initialisation (thread pools, functorch) is not the call's memory
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status_kib("VmRSS")
    fn()
    print(json.dumps({"mib": (_status_kib("VmHWM") - before) / 1024}))


def peak_mib(spec: Dict) -> Optional[float]:
    code = f"import sys; sys.path.insert(0, {HERE!r}); import bench_noise; bench_noise._memory_child({json.dumps(spec)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])["mib"]
    except (IndexError, ValueError, KeyError):
        return None


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "not installed" if v is None else f"{v:.{digits}f}"


def table(title: str, spec: Dict, kinds, baseline: str, repeats: int, reference: Optional[str] = None,
          apart=()) -> Dict[str, Optional[float]]:
    """Rows ``apart`` are timed in a second interleaved round with the baseline of their own.

    The vmap rows allocate 50-700 MiB a call: interleaved with the others, the memory they hand
    back to the operating system is faulted in again by the next row (the small MLP's measurement
    read 2.96 steps so, 2.3-2.4 apart), which is not the state a measurement between training
    steps sees.
    """
    model, x, y = setup(spec)
    fns = {}
    for kind in kinds:  # BackPACK's extend() changes the module: give it its own copy
        fresh_model = setup(spec)[0] if kind in ("Cockpit MeanGSNR step", "BackPACK Variance step") else model
        fns[kind] = KINDS[kind](fresh_model, x, y)
    times = median_ms({k: f for k, f in fns.items() if k not in apart}, repeats)
    base = {k: times[baseline] for k in kinds}
    if any(k in fns for k in apart):
        second = median_ms({baseline: fns[baseline], **{k: fns[k] for k in apart if k in fns}}, repeats)
        times.update({k: second[k] for k in apart if k in fns})
        base.update({k: second[baseline] for k in apart if k in fns})
    rows = [(kind, times[kind], peak_mib(dict(spec, kind=kind))) for kind in kinds]
    print(f"\n### {title}")
    header = f"| what | median ms | x {baseline} |" + (f" x {reference} |" if reference else "") + " peak MiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind, ms, mib in rows:
        ratio = None if ms is None or base[kind] is None else ms / base[kind]
        ref = None if ms is None or not reference or times.get(reference) is None else ms / times[reference]
        line = f"| {kind} | {_fmt(ms, 2)} | {_fmt(ratio, 2)} |"
        if reference:
            line += f" {_fmt(ref, 3)} |"
        print(line + f" {_fmt(mib)} |")
    return times


def summary(rows) -> None:
    """GSNR per measurement and BackPACK's Variance step, each over the plain step, side by side."""
    print("\n### GSNR vs a training step and BackPACK's Variance (targets: GSNR/step <= 2, GSNR <= BackPACK)")
    print("| model | step ms | GSNR ms (own backward) | GSNR / step | from the step's backward: extra / step "
          "| BackPACK Variance / step | GSNR / BackPACK |")
    print("|---|---|---|---|---|---|---|")
    for name, times in rows:
        step, gsnr, variance = times["plain step"], times["dynscope fast path"], times.get("BackPACK Variance step")
        captured = times.get("step + dynscope from its backward")
        extra = None if captured is None else (captured - step) / step
        print(f"| {name} | {_fmt(step, 2)} | {_fmt(gsnr, 2)} | {_fmt(gsnr / step, 2)} | {_fmt(extra, 2)} | "
              f"{_fmt(None if variance is None else variance / step, 2)} | {_fmt(None if variance is None else gsnr / variance, 2)} |")


def main(quick: bool = False, threads: int = 1) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _main(quick)
    finally:  # `dynscope bench` runs other benchmarks in this process after this one
        torch.set_num_threads(before)


def _main(quick: bool) -> int:
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU time (shared machine: timings are noisy)")
    gsnr_kinds = ["plain step", "dynscope fast path", "dynscope vmap (2 GiB cap)",
                  f"dynscope vmap ({SMALL_CAP >> 20} MiB cap)", "step + dynscope from its backward",
                  "Cockpit MeanGSNR step", "BackPACK Variance step"]
    specs = [("MLP 64-256-256-10", {"model": (64, 256), "batch": 128})]
    if not quick:
        specs.append(("MLP 256-1024-1024-10", {"model": (256, 1024), "batch": 128}))
    specs.append(("small CNN", {"model": "cnn", "batch": 64}))
    rows = []
    for name, spec in specs:
        params = sum(p.numel() for p in setup(spec)[0].parameters())
        times = table(
            f"GSNR + noise scale per measurement: {name} ({params} params), batch {spec['batch']}",
            spec, gsnr_kinds, "plain step", repeats=5 if quick else 21, reference="Cockpit MeanGSNR step",
            apart=gsnr_kinds[2:4],
        )
        rows.append((name, times))
    summary(rows)
    seq, batch = (16, 16) if quick else (32, 64)
    table(
        f"per-sample gradients: transformer (embed 512x64, 1 pre-LN encoder layer, seq {seq}), batch {batch}",
        {"model": "transformer", "batch": batch, "seq": seq},
        ["plain step", "per-sample loop", "per-sample vmap", "dynscope fast path"], "per-sample loop",
        repeats=3 if quick else 5,
    )
    print(
        "\nCockpit/BackPACK rows time a whole training step with the extension on; dynscope rows time the "
        "measurement alone (the training step is extra), built from a fresh Objective as the callback does, "
        "except 'step + dynscope from its backward': a training step whose own forward and backward give the "
        "moments (GradientNoise after its first measurement, where the step's loss is the objective's). "
        f"Peak MiB: rise of the resident high-water mark (VmHWM) over one call in a fresh process; the "
        f"{SMALL_CAP >> 20} MiB cap bounds the vmap chunk's working memory."
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    sys.exit(main(args.quick, args.threads))
