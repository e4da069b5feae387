"""``dynscope demo gva``: gradient variance amplification in behaviour cloning, and AutoEMA.

A policy (tanh MLP) learns by minibatch SGD to imitate a stabilising linear controller ``u = K x``
(LQR with expensive control) of a linear system ``x_{t+1} = A x_t + B u_t``, from noisy expert
demonstrations. The long-horizon metric is the closed-loop cost of an ``H``-step rollout from fixed
initial states. On an open-loop unstable system (spectral radius of ``A`` > 1) the rollout cost
swings between consecutive iterates while the cloning loss is flat; on a stable system it does not
(Block et al. 2023, "Butterfly effects of SGD noise"). Both runs have ``AutoEMA()`` at its defaults:
it keeps a shadow EMA of the weights, and switches evaluation to it on the unstable system, where
the EMA's rollout cost is several times steadier at the same mean; on the stable system the cost
does not swing and it stays off.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time

import torch
from torch import nn

from dynscope.cli.common import History, lightning_trainer, print_table, run_dir
from dynscope.rollouts import linear_dynamics, rollout_cost


def lqr_gain(A: torch.Tensor, B: torch.Tensor, r: float, iters: int = 3000) -> torch.Tensor:
    """``K`` of the infinite-horizon discrete LQR with ``Q = I``, ``R = r I`` (``u = K x``), by Riccati iteration."""
    A, B = A.double(), B.double()
    Q, R = torch.eye(A.shape[0], dtype=torch.float64), r * torch.eye(B.shape[1], dtype=torch.float64)
    P = Q.clone()
    for _ in range(iters):
        K = -torch.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P = Q + A.T @ P @ (A + B @ K)
    return K


def make_system(rho: float, n: int = 4, m: int = 2, r: float = 100.0, seed: int = 0):
    """``(A, B, K)``: a random ``A`` scaled to spectral radius ``rho``, a random ``B``, the LQR expert ``K``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = rho * A / torch.linalg.eigvals(A).abs().max()
    B = torch.randn(n, m, generator=g, dtype=torch.float64)
    K = lqr_gain(A, B, r)
    if torch.linalg.eigvals(A + B @ K).abs().max() >= 1:
        raise ValueError("the LQR expert does not stabilise this system")
    return A.float(), B.float(), K.float()


def expert_data(A, B, K, samples: int = 2000, length: int = 20, process_noise: float = 0.03,
                label_noise: float = 0.05, seed: int = 1):
    """States visited by the expert (trajectories with process noise) and its noisy actions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples // length, A.shape[0], generator=g)
    states = []
    for _ in range(length):
        states.append(x)
        x = x @ (A + B @ K).T + process_noise * torch.randn(x.shape, generator=g)
    X = torch.cat(states)
    return X, X @ K.T + label_noise * torch.randn(X.shape[0], K.shape[0], generator=g)


def make_module(n: int, m: int, hidden: int, lr: float, seed: int, bias: bool = False):
    import pytorch_lightning as pl

    class BehaviourCloning(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.policy = nn.Sequential(nn.Linear(n, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, m, bias=bias))
            self.loss_fn = nn.MSELoss()

        def forward(self, x):
            return self.policy(x)

        def training_step(self, batch, batch_idx):
            loss = self.loss_fn(self(batch[0]), batch[1])
            self.log("bc_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return BehaviourCloning()


def rollout_metric(A, B, horizon: int, starts: int = 64, seed: int = 7):
    """``metric(module)``: mean closed-loop cost over ``starts`` fixed initial states, capped at 1e6."""
    x0 = torch.randn(starts, A.shape[0], generator=torch.Generator().manual_seed(seed))
    return functools.partial(rollout_cost, dynamics=linear_dynamics(A, B), x0=x0, horizon=horizon, max_cost=1e6)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=1500, help="SGD steps per run (default: 1500)")
    parser.add_argument("--rho-unstable", type=float, default=1.2, help="spectral radius of the unstable A (default: 1.2)")
    parser.add_argument("--rho-stable", type=float, default=0.5, help="spectral radius of the stable A (default: 0.5)")
    parser.add_argument("--horizon", type=int, default=60, help="rollout horizon H (default: 60)")
    parser.add_argument("--every", type=int, default=10, help="evaluate every N steps (default: 10)")
    parser.add_argument("--window", type=int, default=20, help="evaluations per window (default: 20)")
    parser.add_argument("--steadier", type=float, default=3.0,
                        help="AutoEMA: how many times steadier the EMA's metric must be (default: 3)")
    parser.add_argument("--decay", type=float, default=0.99, help="AutoEMA decay (default: 0.99)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="runs", help="TensorBoard root (default: ./runs)")


def _train(args, rho: float, name: str, root: str, callback_factory):
    A, B, K = make_system(rho)
    X, U = expert_data(A, B, K)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X, U), batch_size=32, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    callback = callback_factory(rollout_metric(A, B, args.horizon))
    history = History(callback)
    module = make_module(A.shape[0], B.shape[1], 32, args.lr, args.seed)
    trainer = lightning_trainer(args.steps, [callback, history], os.path.join(root, name), log_every_n_steps=50)
    print(f"\n[{name}] spectral radius of A = {rho:g}")
    torch.manual_seed(args.seed)
    trainer.fit(module, data)
    return callback, [m["amplification"] for _, _, m in history.rows if "amplification" in m]


def _window(cb):
    """The last window's statistics (:func:`dynscope.amplification.ema_window`), ``None`` before it is full."""
    from dynscope.amplification import ema_window

    full = len(cb.metrics) == len(cb.metrics_ema) == len(cb.losses) >= 3
    return ema_window(cb.metrics, cb.metrics_ema, cb.losses) if full else None


def run(args: argparse.Namespace) -> int:
    from dynscope.callbacks import AutoEMA

    torch.set_num_threads(1)
    start = time.perf_counter()
    root = run_dir(args.logdir, "gva")
    make = lambda metric: AutoEMA(  # noqa: E731
        metric, every_n_steps=args.every, window=args.window, decay=args.decay, steadier=args.steadier,
        reference_batches=8)
    runs = [(name, rho, *_train(args, rho, name, root, make))
            for name, rho in (("unstable", args.rho_unstable), ("stable", args.rho_stable))]

    late = lambda values: values[len(values) // 2:] or values  # noqa: E731  second half of training
    print(f"\nBehaviour cloning of an LQR expert, H = {args.horizon}-step rollout cost J vs the cloning loss L "
          f"(evaluated every {args.every} steps; windows of {args.window} evaluations; last window shown)")
    print_table(
        ["system", "rho(A)", "mean L", "mean J online", "mean J EMA", "swing online", "swing EMA", "EMA steadier",
         "A median (2nd half)", "AutoEMA"],
        [
            (name, f"{rho:g}", f"{statistics.fmean(cb.losses):.4f}", f"{w.mean:.3f}", f"{w.mean_ema:.3f}",
             f"{w.swing:.4f}", f"{w.swing_ema:.4f}",
             f"{w.ema_swing_ratio:.1f}x" if math.isfinite(w.ema_swing_ratio) else "n/a",
             f"{statistics.median(late(values)):.2f}" if values else "n/a",
             f"on at step {cb.triggered_step}" if cb.active else "off")
            for name, rho, cb, values in runs for w in [_window(cb)] if w is not None
        ],
    )
    print("\n(swing: std of the iterate-to-iterate change of J over |mean J|; EMA steadier: std(dJ online) / "
          "std(dJ EMA); A: the variance amplification score, a diagnostic)")
    for name, _, cb, _ in runs:
        if cb.active:
            print(f"{name}: AutoEMA fired at step {cb.triggered_step}: {cb.reason}.")
        else:
            print(f"{name}: AutoEMA stayed off (the rollout cost does not swing enough for an average to matter).")
    print(f"\n{time.perf_counter() - start:.0f} s; TensorBoard: tensorboard --logdir {root}")
    return 0
