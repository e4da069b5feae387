"""Overhead of ``DynScope(budget=0.05)`` over plain training (issue 8), side by side in one run.

Run: ``python benchmarks/bench_overhead.py [--steps 500] [--repeats 3] [--threads N]`` or
``dynscope bench overhead``; issue 14's targets: ``--steps 300`` (every diagnostic at least once, or
a line saying why not) and ``--steps 1000`` (each at least 3 times).

For each model (a small CNN on 3x32x32 images and a small transformer on token sequences,
synthetic data, batch 64), Lightning trains ``--steps`` steps with a TensorBoard logger, without
and with the default ``DynScope(budget=0.05)``, alternating, ``--repeats`` times; compared: the
fastest of each, and the median ratio of the pairs (run-to-run noise on a shared 2-core CPU is a
few percent). Target: at most 5% more wall time. Printed: the wall-time ratio, the overhead
DynScope measured itself (``dynscope/overhead``) and how many measurements each diagnostic made.

For reference, Cockpit's "economy" configuration tracked every 16th step on an MLP
64-256-256-10 (batch 128) in a plain loop, against the same loop without Cockpit (needs
``backpack-for-pytorch`` and ``cockpit-for-pytorch``; "n/a" otherwise), and DynScope on the same
MLP in Lightning.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl  # noqa: E402

from bench_curvature import SmallTransformer, mlp  # noqa: E402
from bench_noise import _pkg_resources_stand_in  # noqa: E402
from dynscope.callbacks import DynScope  # noqa: E402


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def image_data(n: int = 2048) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def token_data(n: int = 2048) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (n, 32), generator=g)
    return tokens, tokens[:, :4].sum(1) % 10  # a learnable label


def vector_data(n: int = 4096) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Callable, int, float]] = {
    "small CNN": (small_cnn, image_data, 64, 0.02),
    "small transformer": (SmallTransformer, token_data, 64, 0.02),
    "MLP 64-256-256-10": (lambda: mlp((64, 256, 256, 10)), vector_data, 128, 0.05),
}


def fit(name: str, steps: int, scope: Optional[DynScope], models: Optional[Dict] = None) -> Tuple[float, float]:
    """Wall and CPU seconds of one fit of ``steps`` steps of ``(models or MODELS)[name]``.

    Each fit starts after a full garbage collection: the fits before it in the process leave
    objects that the collector's oldest generation takes in, and when their count passes its
    threshold a full collection (~0.2 s over the ~430k objects torch and Lightning hold, 11% of a
    1,000-step MLP fit) lands in whichever fit crosses it, the fifth or sixth of a process.
    """
    factory, data, batch, lr = (models or MODELS)[name]
    gc.collect()
    torch.manual_seed(0)
    module = Module(factory(), lr)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, callbacks=[scope] if scope else [],
            logger=pl.loggers.TensorBoardLogger(logs), enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(module, loader)
        return time.perf_counter() - wall, time.process_time() - cpu


def overhead(name: str, steps: int, repeats: int) -> None:
    plain, scoped, scopes = [], [], []
    for _ in range(repeats):
        plain.append(fit(name, steps, None)[0])
        scope = DynScope(loss_fn=F.cross_entropy, budget=0.05)
        scoped.append(fit(name, steps, scope)[0])
        scopes.append(scope)
    best = scopes[scoped.index(min(scoped))]
    counts = ", ".join(f"{n} {c.num_measurements}" for n, c in best.callbacks.items())
    paired = statistics.median(b / a for a, b in zip(plain, scoped))
    print(
        f"{name:>20}: plain {min(plain):6.2f} s, DynScope(budget=0.05) {min(scoped):6.2f} s, "
        f"ratio {min(scoped) / min(plain):.3f} best-of, {paired:.3f} median of pairs (target <= 1.05); "
        f"DynScope's own account {best.overhead():.3f} of training time; measurements: {counts}",
        flush=True,
    )
    for line in best.unmeasured():
        print(f"{'':>22}{line}")


def cockpit_economy(steps: int, every: int = 16) -> Optional[float]:
    """Wall-time ratio of a plain loop with Cockpit "economy" every ``every`` steps to the same loop without."""
    try:
        _pkg_resources_stand_in()
        from backpack import extend
        from cockpit import Cockpit
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration
    except Exception:  # noqa: BLE001 - any import failure means "unavailable"
        return None
    x, y = vector_data()

    def loop(tracked: bool) -> float:
        torch.manual_seed(0)
        model = mlp((64, 256, 256, 10))
        loss_fn = nn.CrossEntropyLoss()
        if tracked:
            model, loss_fn = extend(model), extend(loss_fn)
            cockpit = Cockpit(list(model.parameters()), quantities=configuration("economy", track_schedule=schedules.linear(every)))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        start = time.perf_counter()
        for step in range(steps):
            i = (step * 128) % (x.shape[0] - 128)
            xb, yb = x[i : i + 128], y[i : i + 128]
            opt.zero_grad()
            out = model(xb)
            loss = loss_fn(out, yb)
            if tracked:
                losses = F.cross_entropy(out, yb, reduction="none")
                info = {"batch_size": 128, "individual_losses": losses, "loss": loss, "optimizer": opt}
                with cockpit(step, info=info):
                    loss.backward(create_graph=cockpit.create_graph(step))
            else:
                loss.backward()
            opt.step()
        return time.perf_counter() - start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, tracked = loop(False), loop(True)
    return tracked / plain


def main(quick: bool = False, argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100 if quick else 500)
    parser.add_argument("--repeats", type=int, default=1 if quick else 3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args([] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("pytorch_lightning", "lightning", "pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps per run, best of {args.repeats}")
    for name in args.models:
        overhead(name, args.steps, args.repeats)
    ratio = cockpit_economy(args.steps)
    shown = "n/a (Cockpit does not import)" if ratio is None else f"{ratio:.2f}x the plain loop's wall time"
    print(f"Reference: Cockpit 'economy' every 16th step, MLP 64-256-256-10, {args.steps} steps: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
