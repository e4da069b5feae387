"""The transformer diagnostics on 1 process or under Lightning's DDP with 2 CPU processes (gloo).

Run by tests/test_transformer_ddp.py as a script. Every rank writes ``<out>.rank<r>.json``.

    python tests/ddp_transformer_run.py --devices 2 --out /tmp/run
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dynscope.callbacks import AttentionLogits, AutoZLoss, SpikeForensics  # noqa: E402
from dynscope.cli.demo_transformer import make_data, make_module  # noqa: E402
from models import Recorder, trainer  # noqa: E402

GLOBAL_BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    module = make_module(3e-2, 0, vocab=16, seq=8, dim=16, layers=1, heads=2)
    # The key bias moves every logit of a query row by the same q.b_k: softmax ignores it, so its true
    # gradient is zero and the computed one is rounding, which Adam's first step normalises into an
    # update of up to lr. The one-process and the two-process reductions round differently: the biases
    # then differed by 5e-4 after one step, and max |q.k| (which sees q.b_k) by 3e-4. Not trained here.
    for block in module.net.blocks:
        block.qkv.bias.requires_grad_(False)
    tokens = make_data(256, 16, 8, 0).dataset.clone()
    tokens[12 * GLOBAL_BATCH : 13 * GLOBAL_BATCH] = torch.randint(0, 16, (GLOBAL_BATCH, 9), generator=torch.Generator().manual_seed(1))

    def loader():
        sampler = None
        if torch.distributed.is_initialized():  # in order, each rank every world_size-th sequence
            sampler = torch.utils.data.distributed.DistributedSampler(tokens, shuffle=False)
        return torch.utils.data.DataLoader(tokens, batch_size=GLOBAL_BATCH // args.devices, sampler=sampler)

    module.train_dataloader = loader
    zloss = AutoZLoss(threshold=2.0, patience=1, every_n_steps=2)
    attention = AttentionLogits(every_n_steps=2, per_head=True)
    spikes = SpikeForensics(k=3.0, window=10, min_history=3, cooldown=2, max_snapshots=2, eigen_max_iter=5)
    recorder = Recorder()
    strategy = dict(strategy="ddp", devices=args.devices) if args.devices > 1 else dict(devices=1)
    fit = trainer(max_steps=16, callbacks=[zloss, attention, spikes], logger=recorder, use_distributed_sampler=False, **strategy)
    fit.fit(module)
    report = {  # step 13's batch is random tokens: a loss spike
        "zloss_step": zloss.triggered_step,
        "z_loss": module.criterion.z_loss,
        "spike_steps": [e["step"] for e in spikes.events],
        "spike_samples": [e.get("positive") for e in spikes.events],
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
