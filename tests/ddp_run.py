"""A DynScope run on 1 process or under Lightning's DDP with 2 CPU processes (gloo).

Run by tests/test_distributed.py as a script (Lightning's DDP launcher starts the other rank by
re-running it). Every rank writes ``<out>.rank<r>.json``: what it measured and decided; rank 0
adds everything that was logged.

    python tests/ddp_run.py --devices 2 --out /tmp/run [--budget 0.05] [--poison-step 4]
    python tests/ddp_run.py --devices 2 --out /tmp/run --faults   # faults on rank 1 only (see FAULTS)
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


# --faults: failures on rank 1 only, each at its own step; every rank must skip (or drop) alike and none may hang.
FAULTS = {
    "hvp_error": 2,  # an exception inside the HVP kernel (Curvature at step 2)
    "hvp_oom": 4,  # the HVP kernel runs out of memory down to a chunk of 1 probe (Curvature at step 4)
    "ema_metric": 10,  # AutoEMA's metric raises on the EMA weights (the EMA is on from step 6)
}
# and GradientNoise's per-sample check fails on rank 1 only: a class-weighted loss is a plain mean on
# rank 0's shard (one class only) but not on rank 1's, so the noise diagnostic is dropped on every rank.


class FaultModule(Classifier):
    """A class-weighted loss (no dynscope_loss) on data where rank 0's shard holds class 0 only."""

    def __init__(self, batch_size: int, weighted: bool = True):
        super().__init__(mlp((6, 16, 16, 4)), lr=0.1, momentum=0.5)
        weight = torch.tensor([1.0, 2.0, 3.0, 4.0]) if weighted else None
        self.criterion = torch.nn.CrossEntropyLoss(weight=weight)
        self.batch_size = batch_size

    def train_dataloader(self):
        x, y = classification_data(128, (6,), classes=4)
        y[0::2] = 0  # DistributedSampler(shuffle=False): rank 0 reads the even samples
        dataset = torch.utils.data.TensorDataset(x, y)
        sampler = None
        if torch.distributed.is_initialized():
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=False)
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def inject_faults(module) -> None:
    """Patch the HVP kernel and the metric so that they fail on rank 1 at the steps in FAULTS."""
    from dynscope.hvp import _Kernel

    run = _Kernel.run

    def faulty_run(self, method, part):
        step = module.trainer.global_step
        if module.global_rank == 1 and step == FAULTS["hvp_error"]:
            raise RuntimeError("injected fault inside the HVP")
        if module.global_rank == 1 and step == FAULTS["hvp_oom"]:
            raise RuntimeError(f"CUDA out of memory (injected, {part.shape[0]} probes)")
        return run(self, method, part)

    _Kernel.run = faulty_run


def faulty_fc_norm(module) -> float:
    trainer = FAULT_TARGET.trainer
    if trainer.global_rank == 1 and trainer.global_step == FAULTS["ema_metric"] and module is not FAULT_TARGET:
        raise RuntimeError("injected fault in the metric on the EMA weights")
    return fc_norm(module)


FAULT_TARGET = None


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
    parser.add_argument("--faults", nargs="?", const="all", default=None,
                        help="comma-separated FAULTS and/or per_sample_check (default: all of them)")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.faults:
        global FAULT_TARGET
        chosen = set(FAULTS) | {"per_sample_check"} if args.faults == "all" else set(args.faults.split(","))
        for name in set(FAULTS) - chosen:
            FAULTS[name] = -1
        module = FAULT_TARGET = FaultModule(GLOBAL_BATCH // args.devices, "per_sample_check" in chosen)
        inject_faults(module)
        scope = DynScope(
            budget=None,
            curvature={"every_n_steps": 2, "num_matvecs": 4, "eigen_max_iter": 5, "sharpness": False},
            noise={"every_n_steps": 2}, collapse=False, regions=False,
            metric=faulty_fc_norm, gva={"every_n_steps": 2, "window": 3, "threshold": 1e-9, "patience": 1},
            mitigate=("ema",),
        )
        return fit_and_report(args, module, scope)
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
    fit_and_report(args, module, scope)


def fit_and_report(args, module, scope) -> None:
    recorder = Recorder()
    strategy = dict(strategy="ddp", devices=args.devices) if args.devices > 1 else dict(devices=1)
    online = OnlineWeights()
    fit = trainer(max_steps=args.steps, callbacks=[online, scope], logger=recorder,
                  use_distributed_sampler=False, **strategy)
    fit.fit(module)

    collapse = scope.callbacks.get("collapse")
    report = {
        "world_size": fit.world_size,
        "global_step": fit.global_step,
        "measurements": {name: c.num_measurements for name, c in scope.callbacks.items()},
        "stablemax_step": getattr(collapse, "triggered_step", None),
        "criterion_mode": getattr(module.criterion, "mode", None),
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
    # Lightning leaves the process group up after fit; torn down by the interpreter's exit, gloo's
    # threads sometimes end the rank with "terminate called without an active exception" (SIGABRT)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
