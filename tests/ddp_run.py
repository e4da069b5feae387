"""A DynScope run on 1 process or under Lightning's DDP with 2 CPU processes (gloo).

Run by tests/test_distributed.py as a script (Lightning's DDP launcher starts the other rank by
re-running it). Every rank writes ``<out>.rank<r>.json``: what it measured and decided; rank 0
adds everything that was logged.

    python tests/ddp_run.py --devices 2 --out /tmp/run [--budget 0.05] [--poison-step 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dynscope.callbacks import DynScope  # noqa: E402
from dynscope.nn import CrossEntropy  # noqa: E402
from dynscope.objective import per_sample_loss_fn  # noqa: E402
from models import Classifier, Recorder, classification_data, mlp, trainer  # noqa: E402

GLOBAL_BATCH = 16


def fc_norm(module) -> float:
    """The long-horizon metric of the run: the norm of the first layer's weights."""
    return float(module.net[0].weight.norm())


class Module(Classifier):
    def __init__(self, poison_step: int, batch_size: int):
        super().__init__(mlp((6, 16, 16, 4)), lr=0.1, momentum=0.5)
        self.criterion = CrossEntropy()
        self.poison_step = poison_step
        self.batch_size = batch_size

    def train_dataloader(self):
        """In order, each rank taking every world_size-th sample: the ranks' batches make up the 1-process batch."""
        x, y = classification_data(128, (6,), classes=4)
        dataset = torch.utils.data.TensorDataset(x, y)
        sampler = None
        if torch.distributed.is_initialized():
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=False)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def dynscope_loss(self, batch):
        x, y = batch
        losses = per_sample_loss_fn(self.criterion)(self(x), y)
        if self.global_rank == 1 and self.trainer.global_step == self.poison_step:
            losses = losses * float("nan")  # a fault on one rank only: every rank must skip, none may hang
        return losses


class OnlineWeights(pl.Callback):
    """The sum of the trained (online) weights after the last step, before AutoEMA copies its EMA in."""

    value = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.value = float(sum(p.detach().double().sum() for p in pl_module.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--poison-step", type=int, default=-1)
    args = parser.parse_args()

    torch.manual_seed(0)
    module = Module(args.poison_step, GLOBAL_BATCH // args.devices)
    scope = DynScope(
        budget=args.budget,
        curvature={"every_n_steps": 2, "num_matvecs": 8, "eigen_max_iter": 20, "sub_batch": None},  # slices are per rank
        noise={"every_n_steps": 2},
        collapse={"every_n_steps": 2, "nlm_trigger": True, "nlm_threshold": -1.0, "accuracy_threshold": 0.0, "patience": 2},
        regions={"every_n_steps": 4, "schedule": "steps", "num_points": 16, "num_test_points": 0,
                 "num_random_points": 8, "num_directions": 4},
        metric=fc_norm,
        gva={"every_n_steps": 2, "window": 3, "threshold": 1e-9, "patience": 1},
        mitigate=("stablemax", "ema"),
    )
    recorder = Recorder()
    strategy = dict(strategy="ddp", devices=args.devices) if args.devices > 1 else dict(devices=1)
    online = OnlineWeights()
    fit = trainer(max_steps=args.steps, callbacks=[online, scope], logger=recorder,
                  use_distributed_sampler=False, **strategy)
    fit.fit(module)

    collapse = scope.callbacks["collapse"]
    report = {
        "world_size": fit.world_size,
        "measurements": {name: c.num_measurements for name, c in scope.callbacks.items()},
        "stablemax_step": collapse.triggered_step,
        "criterion_mode": module.criterion.mode,
        "ema_step": scope.callbacks["gva"].triggered_step,
        "ema_weights_sum": float(sum(p.detach().double().sum() for p in scope.callbacks["gva"].ema_module.parameters())),
        "weights_sum": float(sum(p.detach().double().sum() for p in module.parameters())),
        "online_weights_sum": online.value,
        "scalars": recorder.scalars if fit.is_global_zero else {},
    }
    with open(f"{args.out}.rank{fit.global_rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
