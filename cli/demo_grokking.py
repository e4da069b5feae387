"""``dynscope demo`` (the main demo): softmax collapse in modular addition, and what the fix does.

Modular addition ``(a + b) mod p`` with one-hot pairs, a bias-free ReLU MLP, full-batch AdamW
without weight decay in float32 (Prieto et al. 2025, "Grokking at the edge of numerical
stability"). The network fits the training set quickly; then its logits grow until the softmax
is exactly one-hot in float32 for more and more samples (softmax collapse, SC): their loss and
gradient are exactly zero and learning stalls, with test accuracy near chance.

Two runs side by side, same seed: a control run (plain softmax cross-entropy, SoftmaxCollapse
only watching) and a run with ``AutoStableMax()`` at its defaults: once the training set is fitted
and the gradient aligns with the weights (``nlm_cos >= 0.5``), it switches the loss to StableMax,
wraps the optimizer in OrthoGrad, halves the weights once and restarts the optimizer's state; test
accuracy then climbs past 95% within a few hundred steps, while the control run collapses and stays
at chance. Other second runs: ``--mitigation auto-stablemax`` (the StableMax switch alone, at SC
onset: it brings the losses back but not generalisation), ``auto-both`` (StableMax and OrthoGrad at
SC onset), ``orthograd`` or ``stablemax`` (the fix on from step 0).

The defaults (modulus 71, width 128, 2000 steps) keep both runs within about a minute of CPU time;
``--p 113 --width 200 --steps 2500`` is the size of Prieto et al.'s runs.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from dynscope.cli.common import History, lightning_trainer, print_table, run_dir

MITIGATIONS = ("auto", "auto-stablemax", "auto-both", "orthograd", "stablemax", "none")
RECOVERED = 0.95  # test accuracy that counts as generalised


def modular_addition(p: int, train_fraction: float, seed: int):
    """One-hot ``[a, b]`` pairs (``2p`` inputs) and labels ``(a + b) mod p``, split at random."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.cat([nn.functional.one_hot(a, p), nn.functional.one_hot(b, p)], 1).float()
    y = (a + b) % p
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * p * p))
    return (x[order[:n_train]], y[order[:n_train]]), (x[order[n_train:]], y[order[n_train:]])


class RepeatedBatch(torch.utils.data.IterableDataset):
    """The whole training set as one batch, ``steps`` times: full-batch training in one epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.x, self.y

    def __len__(self) -> int:
        return self.steps


def make_module(p: int, width: int, lr: float, test_set, start_with: Optional[str], eval_every: int):
    import pytorch_lightning as pl

    from dynscope.nn import CrossEntropy
    from dynscope.optim import OrthoGrad

    class ModularMLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(2 * p, width, bias=False), nn.ReLU(),
                nn.Linear(width, width, bias=False), nn.ReLU(),
                nn.Linear(width, p, bias=False),
            )
            self.loss_fn = CrossEntropy(mode="stablemax" if start_with == "stablemax" else "softmax")
            self.test_x, self.test_y = test_set
            self.test_accuracy = float("nan")
            self.test_history = []  # (step, test accuracy)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            loss = self.loss_fn(logits, y)
            self.log("train_loss", loss, prog_bar=True)
            if self.global_step % eval_every == 0:
                with torch.no_grad():
                    self.test_accuracy = float((self(self.test_x).argmax(1) == self.test_y).float().mean())
                self.test_history.append((self.global_step, self.test_accuracy))
                self.log("test_accuracy", self.test_accuracy, prog_bar=True)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
            return OrthoGrad(opt) if start_with == "orthograd" else opt

    return ModularMLP()


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mitigation", choices=MITIGATIONS, default="auto",
                        help="the second run: AutoStableMax() at its defaults (auto), the StableMax switch alone at SC "
                             "onset (auto-stablemax), StableMax and OrthoGrad at SC onset (auto-both), or the fix on "
                             "from step 0 (orthograd, stablemax) (default: auto)")
    parser.add_argument("--p", type=int, default=71, help="the modulus (default: 71)")
    parser.add_argument("--train-fraction", type=_fraction, default=0.4, help="fraction of pairs to train on (default: 0.4)")
    parser.add_argument("--width", type=int, default=128, help="hidden width (default: 128)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: 1e-2)")
    parser.add_argument("--steps", type=int, default=2000, help="full-batch steps per run (default: 2000)")
    parser.add_argument("--threshold", type=_fraction, default=0.1, help="SC fraction that counts as collapse (default: 0.1)")
    parser.add_argument("--patience", type=int, default=3, help="consecutive checks a trigger must hold (default: 3)")
    parser.add_argument("--every", type=int, default=10, help="check every N steps (default: 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard root (default: ./runs)")


def make_watcher(mitigation: Optional[str], threshold: float = 0.1, patience: int = 3, every: int = 10):
    """The collapse callback of a run: SoftmaxCollapse (control, or the fix from step 0) or an AutoStableMax."""
    from dynscope.callbacks import AutoStableMax, SoftmaxCollapse

    if mitigation == "auto":
        return AutoStableMax(threshold=threshold, patience=patience, every_n_steps=every)
    if mitigation in ("auto-stablemax", "auto-both"):
        actions = ("stablemax", "orthograd") if mitigation == "auto-both" else ("stablemax",)
        return AutoStableMax(threshold=threshold, patience=patience, every_n_steps=every, actions=actions,
                             nlm_trigger=False)
    return SoftmaxCollapse(every_n_steps=every)


def _one_run(args, name: str, mitigation: Optional[str], data) -> Dict:
    train, test = data
    start_with = mitigation if mitigation in ("orthograd", "stablemax") else None
    torch.manual_seed(args.seed)
    module = make_module(args.p, args.width, args.lr, test, start_with, eval_every=args.every)
    watcher = make_watcher(mitigation, args.threshold, args.patience, args.every)
    auto = hasattr(watcher, "triggered_step")
    history = History(watcher)
    logdir = run_dir(args.logdir, f"grokking-{name}")
    print(f"\n== {name} run ==")
    start, cpu = time.perf_counter(), time.process_time()
    trainer = lightning_trainer(args.steps, [watcher, history], logdir, max_epochs=1)
    trainer.fit(module, torch.utils.data.DataLoader(RepeatedBatch(*train, args.steps), batch_size=None))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    rows = history.rows
    onset = next((step for step, _, m in rows if m.get("softmax_sc_fraction", 0.0) >= args.threshold), None)
    module.eval()
    with torch.no_grad():
        train_acc = float((module(train[0]).argmax(1) == train[1]).float().mean())
        test_acc = float((module(test[0]).argmax(1) == test[1]).float().mean())
    in_use, grad_norm = _loss_in_use(module, *train)
    last = rows[-1][2] if rows else {}
    since = watcher.triggered_step if auto and watcher.active else (0 if start_with else None)
    recovered = next((step for step, acc in module.test_history if since is not None and step >= since
                      and acc >= RECOVERED), None)
    return dict(
        name=name, logdir=logdir, seconds=seconds, cpu_seconds=cpu_seconds, onset=onset, train_acc=train_acc,
        test_acc=test_acc, best_test=max((acc for _, acc in module.test_history), default=float("nan")),
        sc=last.get("softmax_sc_fraction", float("nan")), zero=last.get("zero_loss_fraction", float("nan")),
        loss=rows[-1][1] if rows else float("nan"), zero_in_use=in_use, grad_norm=grad_norm,
        loss_mode=module.loss_fn.mode, trigger=since, recovered=recovered,
        mitigation=(f"step {watcher.triggered_step}: {', '.join(watcher.applied or []) or 'nothing'}"
                    if auto and watcher.active
                    else ("from step 0" if start_with else ("not triggered" if auto else "-"))),
        reason=watcher.reason if auto else None,
        history=rows,
    )


def _loss_in_use(module, x, y):
    """Fraction of exactly-zero per-sample losses under the loss the module now uses, and the
    full-batch gradient norm: zero losses give zero gradients."""
    from dynscope.nn import CrossEntropy

    per_sample = CrossEntropy(mode=module.loss_fn.mode, reduction="none")
    params = [p for p in module.parameters() if p.requires_grad]
    losses = per_sample(module(x), y)
    grads = torch.autograd.grad(losses.mean(), params)
    return float((losses.detach() == 0).float().mean()), float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


def run(args: argparse.Namespace) -> int:
    data = modular_addition(args.p, args.train_fraction, args.seed)
    print(f"Modular addition mod {args.p}: {len(data[0][1])} training pairs, {len(data[1][1])} test pairs; "
          f"MLP {2 * args.p}-{args.width}-{args.width}-{args.p} (no bias), AdamW lr {args.lr:g}, float32, full batch.")
    runs: List[Dict] = [_one_run(args, "control", None, data)]
    if args.mitigation != "none":
        name = "AutoStableMax()" if args.mitigation == "auto" else args.mitigation
        runs.append(_one_run(args, name, args.mitigation, data))

    chance = 1 / args.p
    print("\nWhat happened (same seed, same data):")
    print_table(
        ["run", "SC onset", "mitigation", f">= {RECOVERED:.0%} test at", "train acc", "test acc", "softmax SC frac",
         "loss in use", "zero losses", "grad norm", "verdict"],
        [(r["name"], r["onset"] if r["onset"] is not None else "never", r["mitigation"],
          _recovery(r), f"{r['train_acc']:.3f}", f"{r['test_acc']:.3f}", f"{r['sc']:.3f}", r["loss_mode"],
          f"{r['zero_in_use']:.3f}", f"{r['grad_norm']:.2e}", _verdict(r, chance))
         for r in runs],
    )
    _explain(runs, args)
    total = sum(r["seconds"] for r in runs)
    print(f"\n{total:.0f} s in all ({sum(r['cpu_seconds'] for r in runs):.0f} s of CPU time).")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}   (CUSTOM SCALARS: {dashboard_groups(runs)})")
    print(f"Report:      dynscope report {args.logdir} -o report.html")
    return 0


def dashboard_groups(runs: List[Dict]) -> str:
    """The custom-scalars categories the demo's runs have (titles from the dashboards' catalogue)."""
    from dynscope.dashboards.groups import GROUPS

    names = ["collapse"] + (["mitigation"] if any(r["mitigation"] != "-" for r in runs) else [])
    return ", ".join(GROUPS[n].title for n in names)


def _recovery(r: Dict) -> str:
    if r["recovered"] is None:
        return "never"
    if r["trigger"]:
        return f"step {r['recovered']} (+{r['recovered'] - r['trigger']})"
    return f"step {r['recovered']}"


def _verdict(r: Dict, chance: float) -> str:
    if r["test_acc"] >= RECOVERED:
        return "generalises"
    if r["test_acc"] <= 3 * chance:
        return "collapsed, at chance" if r["onset"] is not None else "at chance"
    return "partly"


def _explain(runs: List[Dict], args) -> None:
    control = runs[0]
    chance = 1 / args.p
    if control["onset"] is None:
        print(f"\nSC did not reach {args.threshold:.1%} of the training set in {args.steps} steps; try more --steps.")
    else:
        print(f"\nControl: softmax collapse reached {args.threshold:.1%} of the training samples at step "
              f"{control['onset']}; at the end {control['zero_in_use']:.0%} of the training losses are exactly zero "
              f"in float32 (their gradient is tiny, not zero), and test accuracy is {control['test_acc']:.1%} "
              f"(chance: {chance:.1%}).")
    if len(runs) < 2:
        return
    other = runs[1]
    if other["trigger"] is None:
        print(f"{other['name']}: did not trigger in {args.steps} steps.")
    elif other["name"] == "AutoStableMax()":
        when = (f"test accuracy passed {RECOVERED:.0%} at step {other['recovered']}, "
                f"{other['recovered'] - other['trigger']} steps after the trigger" if other["recovered"] is not None
                else f"test accuracy did not reach {RECOVERED:.0%}")
        print(f"{other['name']}: fired at step {other['trigger']} ({other['reason']}) and took: "
              f"{other['mitigation'].split(': ', 1)[1]}. Then {when}; at the end {other['test_acc']:.1%} "
              f"(control: {control['test_acc']:.1%}). The loss in use is {other['loss_mode']}: "
              f"{other['zero_in_use']:.0%} of its losses are exactly zero.")
    elif other["trigger"] == 0:
        print(f"{other['name']} from step 0: test accuracy {other['test_acc']:.1%} vs {control['test_acc']:.1%} "
              f"in the control run; final softmax SC fraction {other['sc']:.0%}.")
    else:
        print(f"{other['name']}: fired at step {other['trigger']}; the loss in use is now {other['loss_mode']} "
              f"({other['zero_in_use']:.0%} zero losses, gradient norm {other['grad_norm']:.2e}), test accuracy "
              f"{other['test_acc']:.1%}. Switching the loss alone, this late, brings the gradients back but not "
              "generalisation; `dynscope demo` (the default, AutoStableMax()) also rescales the weights, restarts "
              "the optimizer and uses OrthoGrad.")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
