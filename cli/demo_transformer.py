"""``dynscope demo transformer``: a small causal LM whose output logits diverge at a high learning rate.

A two-layer pre-LN transformer (``F.scaled_dot_product_attention``) learns a deterministic
language (each token is followed by a fixed successor) with AdamW at lr 3e-2 and no weight decay.
It fits the data within a few dozen steps; after that cross-entropy only pushes the margins up and
nothing holds the level of the logits: ``log Z`` (``dynscope/logits/log_z_mean``) drifts upwards
steadily (the output-logit divergence of Wortsman et al. 2023). The second run has
:class:`~dynscope.callbacks.AutoZLoss`, which adds the z-loss ``1e-4 * (log Z)^2`` once the drift
passes 5 nats: ``log Z`` comes back towards 0 and stays bounded (measured: 4.6 -> 24.5 in 300
steps without; switched on at step 30, back to 0.1 by step 140 with). Adding the z-loss term raises
the training loss at the switch, which SpikeForensics reports as a spike. Both runs also log
:class:`~dynscope.callbacks.AttentionLogits` (attention logits and entropy per layer) and
:class:`~dynscope.callbacks.SpikeForensics` (loss spikes with their opposing samples).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

from dynscope.cli.common import History, lightning_trainer, print_table, run_dir


class Block(nn.Module):
    """Pre-LN causal self-attention (scaled_dot_product_attention) and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, e)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm and a linear head: ``[B, T] -> [B, T, V]``."""

    def __init__(self, vocab: int = 64, seq: int = 32, dim: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(tokens) + self.pos[: tokens.shape[1]])))


def make_module(lr: float, seed: int, vocab: int = 64, seq: int = 32, dim: int = 64, layers: int = 2, heads: int = 4):
    """A LightningModule around :class:`TinyLM`: batches are token tensors ``[B, seq + 1]``."""
    import pytorch_lightning as pl

    from dynscope.logits import z_loss
    from dynscope.nn import CrossEntropy

    class LanguageModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.net = TinyLM(vocab, seq, dim, layers, heads)
            self.criterion = CrossEntropy()  # AutoZLoss sets its z_loss coefficient

        def forward(self, tokens):
            return self.net(tokens)

        def dynscope_logits(self, batch):
            return self(batch[:, :-1]), batch[:, 1:]

        def dynscope_loss(self, batch):  # per-sequence losses, the z-loss included when it is on
            logits, targets = self(batch[:, :-1]), batch[:, 1:]
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
            if self.criterion.z_loss:
                loss = loss + self.criterion.z_loss * z_loss(logits.transpose(1, 2), targets, reduction="none").mean(1)
            return loss

        def training_step(self, batch, batch_idx):
            logits = self(batch[:, :-1])
            loss = self.criterion(logits.flatten(0, 1), batch[:, 1:].flatten())
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    return LanguageModel()


def make_data(n: int, vocab: int = 64, seq: int = 32, seed: int = 0, batch_size: int = 32) -> torch.utils.data.DataLoader:
    """Sequences of a deterministic language: ``x[t+1] = successor[x[t]]`` for a fixed random permutation."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=g)
    x = torch.empty(n, seq + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(seq):
        x[:, t + 1] = successor[x[:, t]]
    return torch.utils.data.DataLoader(x, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default: 300)")
    parser.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate (default: 3e-2)")
    parser.add_argument("--every", type=int, default=10, help="measure every N steps (default: 10)")
    parser.add_argument("--threshold", type=float, default=5.0, help="AutoZLoss drift threshold in nats (default: 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard root (default: ./runs)")


def train(args: argparse.Namespace, mitigate: bool, root: str):
    from dynscope.callbacks import AttentionLogits, AutoZLoss, OutputLogits, SpikeForensics

    module = make_module(args.lr, args.seed)
    logits = (AutoZLoss(threshold=args.threshold, every_n_steps=args.every) if mitigate
              else OutputLogits(every_n_steps=args.every))
    attention = AttentionLogits(every_n_steps=args.every)
    spikes = SpikeForensics()
    history, attention_history = History(logits), History(attention)  # separate: both have a max_logit
    name = "zloss" if mitigate else "control"
    trainer = lightning_trainer(args.steps, [logits, attention, spikes, history, attention_history], os.path.join(root, name))
    trainer.fit(module, make_data(4096, seed=args.seed))
    for row, (_, _, attn) in zip(history.rows, attention_history.rows):
        row[2].update({f"attention/{k}": v for k, v in attn.items()})
    return history, logits, spikes


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    root = run_dir(args.logdir, "transformer")
    results = {}
    for mitigate in (False, True):
        print(f"\n== {'with AutoZLoss' if mitigate else 'control (no mitigation)'} ==")
        results[mitigate] = train(args, mitigate, root)
    rows = []
    control, zloss = results[False][0].rows, results[True][0].rows
    by_step = {step: (loss, m) for step, loss, m in zloss}
    nan = float("nan")
    shown = control[:: max(1, len(control) // 12)]
    for step, loss, m in shown + [row for row in control[-1:] if row not in shown]:
        z_loss_value, z = by_step.get(step, (nan, {}))
        rows.append((step, f"{loss:.2e}", f"{z_loss_value:.2e}", f"{m.get('log_z_mean', nan):.2f}", f"{z.get('log_z_mean', nan):.2f}",
                     f"{m.get('max_logit', nan):.1f}", f"{z.get('max_logit', nan):.1f}", f"{m.get('attention/max_logit', nan):.1f}",
                     f"{m.get('attention/entropy_mean', nan):.3f}"))
    print(f"\nTiny LM, AdamW lr = {args.lr}, no weight decay: control vs AutoZLoss")
    print_table(["step", "loss ctrl", "loss z", "logZ ctrl", "logZ z", "max logit ctrl", "max logit z",
                 "attn logit ctrl", "attn entropy ctrl"], rows)
    auto = results[True][1]
    if auto.triggered_step is not None:
        print(f"\nAutoZLoss switched the z-loss on at step {auto.triggered_step}: {auto.reason}")
    else:
        print("\nAutoZLoss did not trigger (log Z did not drift past the threshold)")
    for mitigate, (_, _, spikes) in results.items():
        for event in spikes.events:
            note = ""
            if mitigate and auto.triggered_step is not None and 0 < event["step"] - auto.triggered_step <= 2:
                note = " [the z-loss term switched on at step %d raised the training loss]" % auto.triggered_step
            print(f"spike ({'z-loss run' if mitigate else 'control'}): {event['summary']}{note}")
    print(f"\nTensorBoard: tensorboard --logdir {root}    report: dynscope report {root}")
    return 0
