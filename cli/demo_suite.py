"""``dynscope demo suite``: every diagnostic at once under a 5% overhead budget.

A small ReLU CNN learns a synthetic image task with SGD; ``DynScope(budget=0.05)`` watches it. The
summary says, per diagnostic, how often it measured, how far the budget stretched its cadence, the
time it took and its latest values, and the overhead DynScope measured against the training time.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from dynscope.cli.common import lightning_trainer, print_table, run_dir

SHOWN = {
    "curvature": ("lambda_max", "eos_ratio", "hessian_trace"),
    "noise": ("gsnr", "noise_scale"),
    "collapse": ("sc_fraction", "train_accuracy"),
    "regions": ("lc_train", "lc_random"),
}


def make_module(lr: float, seed: int):
    import pytorch_lightning as pl

    class SmallCNN(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4),
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    return SmallCNN()


def make_data(n: int, seed: int, batch_size: int):
    """16x16 images whose class is the quadrant holding a bright blob, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    for k, (r, c) in enumerate(((0, 0), (0, 8), (8, 0), (8, 8))):
        x[y == k, :, r + 2 : r + 6, c + 2 : c + 6] += 1.5
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps (default: 3000)")
    parser.add_argument("--budget", type=float, default=0.05, help="overhead budget, a fraction (default: 0.05)")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard root (default: ./runs)")


def run(args: argparse.Namespace) -> int:
    from dynscope.callbacks import DynScope

    if not 0 < args.budget < 1:
        raise SystemExit(f"--budget is a fraction in (0, 1), got {args.budget}")
    scope = DynScope(loss_fn=F.cross_entropy, budget=args.budget)
    logdir = run_dir(args.logdir, "suite")
    trainer = lightning_trainer(args.steps, [scope], logdir)
    trainer.fit(make_module(args.lr, args.seed), make_data(4096, args.seed, 64))

    training = scope.training_seconds()
    rows = []
    for name, child in scope.callbacks.items():
        values = ", ".join(
            f"{k} {child.last_metrics[k]:.3g}" for k in SHOWN.get(name, ()) if k in child.last_metrics
            and math.isfinite(child.last_metrics[k])
        )
        rows.append((name, child.num_measurements, f"x{child.schedule.stretch:g}", f"{child.seconds_spent:.2f} s",
                     f"{child.seconds_spent / training:.1%}" if training else "-", values or "-"))
    print(f"\nDynScope(budget={args.budget:g}) over {args.steps} steps: training took {training:.1f} s, "
          f"dynscope {scope.seconds:.2f} s = {scope.overhead():.1%} of it (every hook timed)")
    print_table(["diagnostic", "measurements", "cadence", "time", "share", "latest values"], rows)
    print("\nA Hessian measurement costs dozens of training steps, so under a 5% budget curvature runs rarely"
          " (try --budget 0.2 to see more of it).")
    print(f"TensorBoard: tensorboard --logdir {os.path.dirname(logdir)}  (CUSTOM SCALARS tab)")
    return 0
