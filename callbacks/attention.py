"""The AttentionLogits callback: attention-logit growth and attention entropy per layer and head.

The math is in :mod:`dynscope.attention` (Wortsman et al. 2023; Zhai et al. 2023).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch

from dynscope.attention import AttentionStats, capture_attention, combine_attention, pack_attention, summarize
from dynscope.context import measurement

from .base import DiagnosticCallback, memory_cap_bytes
from .collapse import training_precision
from .distributed import on_every_rank, world_size
from .protocol import LossProtocolError


def measured_forward(module: torch.nn.Module, batch: Any, mode: str = "eval", context=None) -> Any:
    """One forward pass of ``module`` on ``batch`` that changes nothing about training.

    ``no_grad``, every RNG forked, the modules' train/eval flags restored; in ``"train"`` mode the
    buffers (BatchNorm statistics) are restored too. The forward is ``module.dynscope_logits(batch)``
    when defined, else ``module(x)`` for ``(x, y)`` batches, ``module(**batch)`` for dicts and
    ``module(batch)`` for a tensor.
    """
    with measurement(module, mode, autocast=context):
        return _forward(module, batch)


def _forward(module, batch):
    hook = getattr(module, "dynscope_logits", None)
    if callable(hook):
        return hook(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return module(batch[0])
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, torch.Tensor):
        return module(batch)
    raise LossProtocolError(
        "to run the model dynscope needs (inputs, targets) batches, dict batches (module(**batch)), tensor batches "
        "or `dynscope_logits(self, batch) -> (logits, targets)` on the LightningModule"
    )


def reduce_attention(trainer, found: "OrderedDict[str, AttentionStats]", device=None) -> "OrderedDict[str, AttentionStats]":
    """The statistics over all ranks' batches (max, min, sums): the same result on every rank."""
    if world_size(trainer) <= 1 or not found:
        return found
    flat = pack_attention(found)
    return combine_attention(found, trainer.strategy.all_gather(flat.to(device or flat.device)).cpu())


class AttentionLogits(DiagnosticCallback):
    """Largest attention logit and attention entropy, per attention layer (and head), from one forward pass.

    Every ``every_n_steps`` optimizer steps it runs the model once more on the step's batch (no
    gradients, RNG forked, eval mode by default) and records, for every ``nn.MultiheadAttention``,
    every ``F.scaled_dot_product_attention`` call and Hugging Face attention modules (GPT-2, BERT,
    ... in ``"eager"`` or ``"sdpa"`` mode): the largest ``|q.k| * scale`` (``scale = 1/sqrt(d)``
    unless the layer says otherwise) and the entropy of the attention rows (min and mean over the
    batch's queries). Growing logits with collapsing entropy is the attention-logit instability of
    Wortsman et al. 2023 (fixed by qk-layernorm); see :mod:`dynscope.attention`.

    Logged (``dynscope/attention/...``): ``max_logit``, ``entropy_min``, ``entropy_mean`` (over
    all layers), the same per layer (``max_logit/<layer>``), and with ``per_head=True``
    ``head_max_logit/<layer>.h<i>``, ``head_entropy_min/<layer>.h<i>``. Under DDP the statistics
    cover all ranks' batches. A model without recognised attention logs nothing: the first
    measurement warns once and switches the callback off.

    Not among :class:`~dynscope.callbacks.DynScope`'s defaults; add it under the suite's budget with
    ``DynScope(extra={"attention": AttentionLogits()})``.

    The forward is ``module.dynscope_logits(batch)`` when defined, else ``module(x)`` on ``(x, y)``
    batches, ``module(**batch)`` on dict batches (Hugging Face style) or ``module(batch)``.

    Args:
        every_n_steps: measure every this many optimizer steps.
        per_head: also log every head.
        memory_cap: bytes of attention logits materialised at once (batch chunks; default 64 MiB).
        memory_cap_mb: the same in MiB (older name, kept as an alias).
        Other arguments: see :class:`~dynscope.callbacks.DiagnosticCallback`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from dynscope.callbacks import AttentionLogits
        >>> callback = AttentionLogits(every_n_steps=50, per_head=True)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    group = "attention"

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        per_head: bool = False,
        memory_cap: Optional[int] = None,
        memory_cap_mb: Optional[float] = None,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, schedule=schedule, points_per_decade=points_per_decade,
            fixed_batch=fixed_batch, mode=mode, strict=strict,
        )
        self.per_head = per_head
        self.memory_cap = memory_cap_bytes(memory_cap, memory_cap_mb, 64 * 2**20, "AttentionLogits")
        self.layers: "OrderedDict[str, AttentionStats]" = OrderedDict()  # the last measurement

    @property
    def memory_cap_mb(self) -> float:
        """The memory cap in MiB (older name)."""
        return self.memory_cap / 2**20

    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        context, _ = training_precision(trainer)

        def local():
            with capture_attention(pl_module, self.memory_cap) as found:
                measured_forward(pl_module, batch, self.mode, context)
            return found

        found = reduce_attention(trainer, on_every_rank(trainer, local, pl_module.device), pl_module.device)
        self.layers = found
        if not found:  # the same model on every rank: every rank switches off alike
            self.warn_once("none", "found no attention layer (nn.MultiheadAttention, scaled_dot_product_attention or "
                                   "a Hugging Face attention module) in the forward pass; switched off")
            self.disabled = True
            return {}
        return summarize(found, self.per_head)


__all__ = ["AttentionLogits", "measured_forward", "reduce_attention"]
