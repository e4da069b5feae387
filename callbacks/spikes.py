"""The SpikeForensics callback: detect loss spikes, and look at the batch and weights that produced them.

The rule and the snapshot are in :mod:`dynscope.spikes` (Rosenfeld & Risteski 2023).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_map

from dynscope.dashboards.events import format_event
from dynscope.spikes import SpikeDetector, SpikeSnapshot, opposing_signals

from ._lightning import CallbackBase
from .base import join_batches, memory_cap_bytes
from .collapse import EVENTS
from .distributed import any_rank, mean_over_ranks, on_every_rank, world_size
from .logging import log_scalars, log_text, tag
from .protocol import LossProtocolError, module_objective, quiet_logging

log = logging.getLogger("dynscope")

FORENSICS = "dynscope/spikes/forensics"


def _nbytes(batch: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor))


class SpikeForensics(CallbackBase):
    """Watches the training loss for spikes and dissects the first ones: sharpest direction, opposing samples.

    Every training batch's loss (as handed to ``backward``, before the optimizer step) goes
    through :class:`dynscope.spikes.SpikeDetector`: a spike is a loss more than ``k`` robust
    standard deviations (``1.4826 * MAD``) and more than ``min_jump`` above the median of the last
    ``window`` losses, once ``min_history`` losses are known. On a spike, still before the update, i.e. on the weights that
    produced the spike, it takes a one-off snapshot (at most ``max_snapshots`` per run, at least
    ``cooldown`` steps apart) on the spiking batch plus up to ``history_batches`` recent batches
    from a ring buffer (references to the batches, no copies, within ``memory_cap`` bytes of their
    tensors): the top Hessian eigenvalue and
    eigenvector ``v`` (Lanczos), every sample's gradient projection ``g_i . v`` and the ``top_k``
    samples with the largest projections of either sign: the opposing signals of Rosenfeld &
    Risteski 2023. It never changes training: the snapshot evaluates the loss through the
    side-effect-free :class:`~dynscope.Objective` (the loss protocol of
    :mod:`dynscope.callbacks.protocol`; per-sample losses needed).

    Logged: ``dynscope/spikes/loss_zscore`` every ``log_every_n_steps`` steps; at a spike
    ``dynscope/spikes/detected`` (1), ``zscore``, ``loss`` and the snapshot's ``lambda_max``,
    ``grad_projection`` (``g . v``), ``opposition`` (``1 - |sum p_i| / sum |p_i|``),
    ``top_positive``, ``top_negative``, ``projection_std``; an event ``**loss-spike on** at step
    N`` on ``dynscope/mitigation/events`` (a marker on every chart of the report) and a table of
    the opposing samples on ``dynscope/spikes/forensics``. Samples are named ``step S #i`` (the
    ``i``-th sample of step ``S``'s batch), or by ``module.dynscope_sample_ids(batch) -> Tensor[B]``
    when the module defines it. ``events`` holds the same as dicts. Under DDP the spike decision
    is agreed across ranks (one scalar all-reduce per step), the eigenvector is the global one and
    the samples come from every rank. Cost per step: reading the loss (one device-to-host copy of a
    scalar) and a median of ``window`` numbers; a snapshot costs ``eigen_max_iter`` Hessian-vector
    products and one forward-mode pass on ``history_batches + 1`` batches.

    Args:
        k: robust z-score above which a loss is a spike.
        window: losses in the running window.
        min_history: losses needed before judging.
        min_jump: a spike also rises more than this above the median (in loss units), so that a
            loss near zero, whose wiggles are many robust deviations, is not a string of spikes.
        cooldown: optimizer steps between two snapshots.
        max_snapshots: snapshots per run (``0``: detect and log only).
        history_batches: recent batches added to the spiking batch for the snapshot.
        memory_cap: bytes of batches the ring buffer keeps alive (default 64 MiB).
        memory_cap_mb: the same in MiB (older name, kept as an alias).
        top_k: opposing samples reported on each side.
        eigen_max_iter: Lanczos steps (Hessian-vector products) for the top eigenpair.
        loss_fn: ``loss_fn(module(x), y)`` when the module defines no ``dynscope_loss``.
        mode: ``"eval"`` or ``"train"`` for the snapshot's objective.
        log_every_n_steps: cadence of the ``loss_zscore`` series.
        strict: re-raise errors of the snapshot instead of warning once.

    Example:
        >>> import pytorch_lightning as pl
        >>> from dynscope.callbacks import SpikeForensics
        >>> callback = SpikeForensics(k=6.0, window=50, max_snapshots=3)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
        >>> callback.events
        []
    """

    group = "spikes"

    def __init__(
        self,
        k: float = 6.0,
        window: int = 50,
        min_history: int = 20,
        *,
        min_jump: float = 0.01,
        cooldown: int = 50,
        max_snapshots: int = 3,
        history_batches: int = 3,
        memory_cap: Optional[int] = None,
        memory_cap_mb: Optional[float] = None,
        top_k: int = 5,
        eigen_max_iter: int = 20,
        loss_fn: Optional[Callable] = None,
        mode: str = "eval",
        log_every_n_steps: int = 10,
        strict: bool = False,
    ) -> None:
        self.detector = SpikeDetector(k, window, min_history, min_jump=min_jump)
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if min(cooldown, max_snapshots, history_batches, top_k) < 0 or eigen_max_iter < 1 or log_every_n_steps < 1:
            raise ValueError("cooldown, max_snapshots, history_batches, top_k must be >= 0; eigen_max_iter, log_every_n_steps >= 1")
        self.cooldown = cooldown
        self.max_snapshots = max_snapshots
        self.history_batches = history_batches
        self.memory_cap = memory_cap_bytes(memory_cap, memory_cap_mb, 64 * 2**20, "SpikeForensics")
        self.top_k = top_k
        self.eigen_max_iter = eigen_max_iter
        self.loss_fn = loss_fn
        self.mode = mode
        self.log_every_n_steps = log_every_n_steps
        self.strict = strict
        self.events: List[Dict[str, Any]] = []
        self.num_spikes = 0
        self.seconds_spent = 0.0
        self._last_snapshot: Optional[int] = None
        self._buffer: Deque[Tuple[int, Any]] = deque()
        self._batch: Any = None
        self._warned: set = set()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            from .dashboard import write_layout

            write_layout(trainer, ("spikes",))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            import warnings

            warnings.warn(f"dynscope SpikeForensics: {message}", RuntimeWarning, stacklevel=3)

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        start = time.perf_counter()
        try:
            self._judge(trainer, pl_module, loss)
        finally:
            self.seconds_spent += time.perf_counter() - start

    def _judge(self, trainer, pl_module, loss) -> None:
        step = trainer.global_step + 1  # the optimizer step this loss belongs to
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        scaler = getattr(getattr(getattr(trainer, "strategy", None), "precision_plugin", None), "scaler", None)
        if scaler is not None and scaler.is_enabled():  # "16-mixed" hands over the loss times the loss scale
            value /= float(scaler.get_scale())
        spike, z = self.detector.update(value)
        if world_size(trainer) > 1:
            spike = any_rank(trainer, spike, pl_module.device)
        if step % self.log_every_n_steps == 0 and z == z and abs(z) != float("inf"):
            log_scalars(trainer, {tag("spikes", "loss_zscore"): z}, step)
        batch = self._batch
        if spike:
            self.num_spikes += 1
            scalars = {tag("spikes", "detected"): 1.0, tag("spikes", "zscore"): z, tag("spikes", "loss"): value}
            due = len(self.events) < self.max_snapshots and (
                self._last_snapshot is None or step - self._last_snapshot >= self.cooldown)
            event: Dict[str, Any] = {"step": step, "loss": value, "zscore": z, "median": self.detector.stats()[0]}
            if due and batch is not None:
                self._last_snapshot = step
                event.update(self._snapshot(trainer, pl_module, batch, step))
                event["summary"] = f"loss {value:.4g} (z-score {z:.1f}) at " + event.get("summary", f"step {step}")
                self.events.append(event)
                scalars.update({tag("spikes", k): v for k, v in event.get("metrics", {}).items()})
                self._log_event(trainer, event)
            log_scalars(trainer, scalars, step)
        if batch is not None and self.history_batches > 0:
            self._remember(step, batch)

    def _remember(self, step: int, batch: Any) -> None:
        size = _nbytes(batch)
        if size > self.memory_cap:
            self._warn_once("cap", f"a batch ({size / 2**20:.1f} MB) exceeds memory_cap; snapshots use the spiking batch only")
            return
        self._buffer.append((step, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, batch)))
        while len(self._buffer) > self.history_batches or sum(_nbytes(b) for _, b in self._buffer) > self.memory_cap:
            self._buffer.popleft()

    # -- the snapshot --------------------------------------------------------------------------------
    def _snapshot(self, trainer, pl_module, batch, step: int) -> Dict[str, Any]:
        try:
            with quiet_logging(pl_module):
                return self._forensics(trainer, pl_module, batch, step)
        except LossProtocolError:
            raise
        except Exception as error:  # noqa: BLE001 - a diagnostic must not end the run
            if self.strict:
                raise
            self._warn_once(type(error).__name__, f"snapshot at step {step} skipped: {type(error).__name__}: {error}")
            return {"error": f"{type(error).__name__}: {error}", "summary": f"step {step} (snapshot failed)"}

    def _forensics(self, trainer, pl_module, batch, step: int) -> Dict[str, Any]:
        parts = [(step, batch)]
        for old_step, old in reversed(self._buffer):
            parts.append((old_step, old))
        labels: List[str] = []
        ids = getattr(pl_module, "dynscope_sample_ids", None)
        batches = []
        for s, b in parts:
            n = int(tree_flatten(b)[0][0].shape[0])
            names = [str(int(i)) for i in ids(b).reshape(-1).tolist()] if callable(ids) else [f"step {s} #{i}" for i in range(n)]
            labels.extend(names)
            batches.append(b)
        joined = join_batches(batches, lambda key, message: None) if len(batches) > 1 else batch
        if joined is batches[-1] and len(batches) > 1:  # could not be joined: the spiking batch only
            joined, labels = batch, labels[: int(tree_flatten(batch)[0][0].shape[0])]
        objective = on_every_rank(trainer, lambda: module_objective(pl_module, joined, self.loss_fn, mode=self.mode),
                                  pl_module.device)
        snap: SpikeSnapshot = opposing_signals(objective, top_k=self.top_k, max_iter=self.eigen_max_iter,
                                               reduce=mean_over_ranks(trainer))
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        prefix = f"rank {rank} " if world_size(trainer) > 1 else ""
        entry = lambda i: (prefix + labels[i], float(snap.projections[i]), float(snap.losses[i]))  # noqa: E731
        positive, negative = [entry(i) for i in snap.positive], [entry(i) for i in snap.negative]
        if world_size(trainer) > 1:
            positive, negative = self._gather(trainer, pl_module, positive, negative)
        metrics = snap.metrics()
        summary = (f"step {step}: lambda_max {metrics['lambda_max']:.4g}, opposition {metrics['opposition']:.2f}; largest +: "
                   + ", ".join(f"{n} ({p:+.3g})" for n, p, _ in positive[:3])
                   + "; largest -: " + ", ".join(f"{n} ({p:+.3g})" for n, p, _ in negative[:3]))
        return {"metrics": metrics, "positive": positive, "negative": negative, "samples": len(labels),
                "converged": snap.converged, "summary": summary}

    def _gather(self, trainer, pl_module, positive, negative):
        """The top samples of every rank (labels travel as indices into each rank's own list)."""
        import torch.distributed as dist

        both = [positive, negative]
        gathered: List[Any] = [None] * world_size(trainer)
        dist.all_gather_object(gathered, both)
        pos = sorted((e for g in gathered for e in g[0]), key=lambda e: -e[1])[: self.top_k]
        neg = sorted((e for g in gathered for e in g[1]), key=lambda e: e[1])[: self.top_k]
        return pos, neg

    def _log_event(self, trainer, event: Dict[str, Any]) -> None:
        step = event["step"]
        metrics = event.get("metrics", {})
        values = {"loss": event["loss"], "zscore": event["zscore"], **{k: metrics[k] for k in ("lambda_max", "opposition") if k in metrics}}
        reason = f"loss {event['loss']:.4g} is {event['zscore']:.1f} robust std above the running median {event['median']:.4g}"
        if "error" in event:
            reason += f"; snapshot failed: {event['error']}"
        log_text(trainer, EVENTS, format_event("loss-spike", "on", step, reason, values), step)
        if "positive" in event:
            lines = [f"**loss spike at step {step}**: {reason}; top Hessian eigenvalue {metrics['lambda_max']:.4g}, "
                     f"batch gradient along v {metrics['grad_projection']:.4g}, opposition {metrics['opposition']:.3f} "
                     f"({event['samples']} samples: the spiking batch and the recent ones)", "",
                     "| side | sample | g_i . v | loss |", "|---|---|---|---|"]
            lines += [f"| + | {n} | {p:.4g} | {l:.4g} |" for n, p, l in event["positive"]]
            lines += [f"| - | {n} | {p:.4g} | {l:.4g} |" for n, p, l in event["negative"]]
            log_text(trainer, FORENSICS, "\n".join(lines), step)
        log.info("dynscope SpikeForensics: %s", event.get("summary", reason))

    # -- checkpointing --------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"detector": self.detector.state_dict(), "events": list(self.events), "num_spikes": self.num_spikes,
                "last_snapshot": self._last_snapshot}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.events = list(state_dict.get("events", []))
        self.num_spikes = int(state_dict.get("num_spikes", 0))
        self._last_snapshot = state_dict.get("last_snapshot")


__all__ = ["SpikeForensics"]
