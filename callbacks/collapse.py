"""Softmax collapse diagnostics (SoftmaxCollapse) and the automatic StableMax switch (AutoStableMax).

Both follow Prieto et al. 2025, "Grokking at the edge of numerical stability"; the metric
definitions are in :mod:`dynscope.collapse`, StableMax in :mod:`dynscope.nn`, the orthogonal
gradient in :mod:`dynscope.optim`.

Rule: ``sc_fraction`` and ``zero_loss_fraction`` measure collapse of the loss in use, counted with
that loss's own computation (after a switch to StableMax: StableMax's cross-entropy, which has no
float32 collapse); ``softmax_sc_fraction`` always measures the softmax. So a mitigation that worked
shows as collapse going away, while the softmax measure still says how far the logits grew.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils._pytree import tree_map

from dynscope.context import measurement, rngs_preserved
from dynscope.collapse import CollapseCounts, NLMAlignment, NotClassLogitsError, nlm_alignment, resolve_dtype
from dynscope.collapse import collapse_counts as core_collapse_counts
from dynscope.nn import CrossEntropy
from dynscope.optim import OrthoGrad

from .base import DiagnosticCallback
from .distributed import on_every_rank, sum_over_ranks
from .logging import log_scalars, tag
from .protocol import LossProtocolError, module_logits
from .trigger import Trigger, Triggered

log = logging.getLogger("dynscope")

EVENTS = "dynscope/mitigation/events"


def training_precision(trainer) -> Tuple[ContextManager, Optional[str]]:
    """The context training runs its forward in, and the dtype its softmax loss is computed in.

    Under ``"*-mixed"`` precision the forward runs under autocast (logits in bfloat16/float16) and
    autocast computes cross-entropy in float32 from them; otherwise the loss is in the logits' dtype
    (``None``: take it from the logits).
    """
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    context = plugin.forward_context() if hasattr(plugin, "forward_context") else contextlib.nullcontext()
    mixed = str(getattr(trainer, "precision", "")).endswith("-mixed")
    return context, ("float32" if mixed else None)


def measured_logits(module: torch.nn.Module, batch: Any, mode: str = "eval", context: Optional[ContextManager] = None):
    """``(logits, targets)`` of ``module`` on ``batch`` without changing anything about training.

    Runs under ``torch.no_grad()`` with all RNGs forked, inside ``context`` (e.g. the autocast of
    mixed-precision training, so that the logits are the ones training sees). ``mode="eval"`` evaluates in eval mode
    (dropout off, BatchNorm running statistics); ``"train"`` in train mode, with every buffer
    (BatchNorm running statistics) restored afterwards. The modules' train/eval flags are restored.
    """
    with measurement(module, mode, autocast=context):
        return module_logits(module, batch)


def collapse_counts(
    logits: torch.Tensor, targets: torch.Tensor, dtype, ignore_index: int, normalization: str = "softmax"
) -> torch.Tensor:
    """:func:`dynscope.collapse.collapse_counts`; logits or targets that do not fit are a
    :class:`LossProtocolError` (the diagnostic does not apply to this module: it is dropped)."""
    try:
        return core_collapse_counts(logits, targets, dtype, ignore_index, normalization)
    except NotClassLogitsError as error:
        raise LossProtocolError(str(error)) from error


def fractions(counts: torch.Tensor, prefix: str = "", accuracy: str = "train_accuracy") -> Dict[str, float]:
    """The logged fractions of summed counts (:meth:`dynscope.collapse.CollapseCounts.fractions`)."""
    return CollapseCounts.from_tensor(counts).fractions(prefix, accuracy)


def loss_in_use(pl_module, loss_fn=None) -> str:
    """``"stablemax"`` when the module's :class:`dynscope.nn.CrossEntropy` losses (and ``loss_fn``, if one) all
    use StableMax, else ``"softmax"``."""
    losses = switchable_losses(pl_module, loss_fn)
    return "stablemax" if losses and all(loss.mode == "stablemax" for loss in losses) else "softmax"


class SoftmaxCollapse(DiagnosticCallback):
    """Softmax collapse, zero-loss fraction, logit gap, accuracy and NLM alignment during training.

    Logged under ``dynscope/collapse/`` (Prieto et al. 2025, "Grokking at the edge of numerical
    stability"):

    * ``sc_fraction``: fraction of samples in collapse of the loss in use: the top class's
      log-probability, computed as the loss computes it in ``dtype``, is exactly 0
      (:func:`dynscope.softmax_collapse`); for a correctly classified sample, its loss is exactly 0.
      The loss in use is the softmax cross-entropy, or StableMax's once every
      :class:`dynscope.nn.CrossEntropy` of the module is switched to it (by :class:`AutoStableMax`):
      StableMax, computed in float64, has no float32 collapse, so ``sc_fraction`` then drops to 0.
    * ``zero_loss_fraction``: fraction whose cross-entropy (of the loss in use) is exactly 0.
    * ``softmax_sc_fraction``: the softmax's collapse, whatever the loss in use (equal to
      ``sc_fraction`` before a switch): how far the logits have grown.
    * ``max_logit_gap``: mean over samples of (largest logit - second-largest logit).
    * ``train_accuracy``: arg-max accuracy on the measured batch.
    * ``nlm_cos`` and ``nlm_cos/<parameter>``: ``cos(theta, -grad)`` of the training gradient
      (:func:`dynscope.nlm_alignment`), near 1 under naive loss minimisation. Nothing is logged
      for a tensor where the cosine is undefined (a zero-norm weight, e.g. a zero-initialised bias,
      or a zero gradient).
    * with ``held_data="val"``: ``held_sc_fraction``, ``held_zero_loss_fraction``,
      ``held_softmax_sc_fraction``, ``held_max_logit_gap`` and ``held_accuracy`` on the first ``held_batches`` validation
      batches (fetched once, then the same batches every time).

    Logits come from ``module.dynscope_logits(batch) -> (logits, targets)`` or ``(module(x), y)``
    (see :mod:`dynscope.callbacks.protocol`), evaluated after the optimizer step of a scheduled
    step, on that step's batch, under ``no_grad`` with forked RNGs: in eval mode by default
    (dropout off, BatchNorm running statistics), or ``mode="train"`` (buffers restored after).
    Rows whose target is ``ignore_index`` are left out; the class dimension is the last one.

    ``nlm_cos`` is read from the parameters' ``.grad`` in ``on_before_optimizer_step`` of the
    scheduled step (read only): the real batch gradient at the weights it was taken at, after any
    gradient accumulation and (under DDP) already averaged over ranks, before clipping. The logit
    metrics are summed over ranks before dividing.

    Args:
        every_n_steps: period in optimizer steps (one extra forward pass per check).
        dtype: the dtype the loss is computed in (``"float32"``, ``"bfloat16"``, ``"float16"``,
            ``"float64"``); default: the logits' dtype, or float32 under ``"*-mixed"`` precision,
            where the logits are computed under the trainer's autocast (bfloat16/float16, as in
            training) and autocast computes cross-entropy in float32 from them. Pass the half
            dtype if your loss is computed in it (e.g. a hand-written log-softmax under autocast).
        nlm: log ``nlm_cos``.
        per_layer: log ``nlm_cos/<parameter>`` too.
        held_data: ``"none"`` or ``"val"`` (the trainer's validation data).
        held_batches: how many validation batches make up the held set.
        ignore_index: target value to leave out.
        loss_fn: the training loss, accepted like every callback's ``loss_fn`` (e.g. ``[Curvature(loss_fn=ce),
            GradientNoise(loss_fn=ce), SoftmaxCollapse(loss_fn=ce)]``). The counts need logits, not a loss
            (see above); a :class:`dynscope.nn.CrossEntropy` given here counts as the loss in use (and is the one
            :class:`AutoStableMax` switches, with those on the module); any other loss is not called.
        Other arguments: see :class:`~dynscope.callbacks.base.DiagnosticCallback`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from dynscope.callbacks import SoftmaxCollapse
        >>> callback = SoftmaxCollapse(every_n_steps=10, dtype="float32")
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    group = "collapse"

    def __init__(
        self,
        every_n_steps: int = 10,
        dtype: Optional[str] = None,
        *,
        nlm: bool = True,
        per_layer: bool = True,
        held_data: str = "none",
        held_batches: int = 1,
        ignore_index: int = -100,
        loss_fn: Optional[Callable] = None,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, schedule=schedule, points_per_decade=points_per_decade, loss_fn=loss_fn,
            fixed_batch=fixed_batch, mode=mode, strict=strict,
        )
        if dtype is not None:
            resolve_dtype(dtype, torch.float32)  # raises on an unsupported name
        if held_data not in ("none", "val"):
            raise ValueError(f"held_data must be 'none' or 'val', got {held_data!r}")
        if held_batches < 1:
            raise ValueError(f"held_batches must be >= 1, got {held_batches}")
        self.dtype = dtype
        self.nlm = nlm
        self.per_layer = per_layer
        self.held_data = held_data
        self.held_batches = held_batches
        self.ignore_index = ignore_index
        self._alignment: Optional[tuple] = None  # (step, NLMAlignment)
        self._held: Optional[List[Any]] = None

    # -- gradients: read in the step they belong to ------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = self._planned_step  # the step of the batch in progress
        if not self.nlm or not (self.schedule.at_epoch_end or self.will_measure(step)):
            return
        try:
            self._alignment = (step, nlm_alignment(pl_module))
        except Exception as error:  # noqa: BLE001 - a diagnostic must not end the run
            if self.strict:
                raise
            self.warn_once("nlm", f"nlm_cos skipped: {type(error).__name__}: {error}")
            self._alignment = None

    # -- the measurement ---------------------------------------------------------------------------------
    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        reduce = sum_over_ranks(trainer)
        out: Dict[str, float] = {}
        counts = on_every_rank(trainer, lambda: self._counts(trainer, pl_module, batch), pl_module.device)
        out.update(fractions(reduce(counts) if reduce else counts))
        if self.held_data == "val":
            held = on_every_rank(trainer, lambda: self._held_counts(trainer, pl_module), pl_module.device)
            if held is not None:
                out.update(fractions(reduce(held) if reduce else held, "held_", "held_accuracy"))
        if self.nlm and self._alignment is not None and (
            self.schedule.at_epoch_end or self._alignment[0] == self._planned_step
        ):
            alignment: NLMAlignment = self._alignment[1]
            out.update(alignment.metrics(self.per_layer))
        return out

    def _counts(self, trainer, pl_module, batch) -> torch.Tensor:
        """This rank's collapse counts on ``batch``, with the loss in use counted as training computes it."""
        context, loss_dtype = training_precision(trainer)
        logits, targets = measured_logits(pl_module, batch, self.mode, context)
        return collapse_counts(logits, targets, self.dtype or loss_dtype, self.ignore_index,
                               loss_in_use(pl_module, self.loss_fn))

    def _held_counts(self, trainer, pl_module) -> Optional[torch.Tensor]:
        if not self._held:  # fetched once; retried while there is none yet
            with rngs_preserved():  # building the loader's iterator draws a seed from the global RNG
                self._held = _first_batches(_val_loader(trainer, pl_module), self.held_batches)
        if not self._held:
            self.warn_once("held", "held_data='val' but the trainer has no validation data; held metrics skipped")
            return None
        to_device = trainer.strategy.batch_to_device if hasattr(trainer, "strategy") else (lambda b: b)
        return sum(self._counts(trainer, pl_module, to_device(b)) for b in self._held)


def _val_loader(trainer, pl_module):
    """The first validation dataloader: the trainer's, else the one given to ``fit``, else the hooks'."""
    loaders = getattr(trainer, "val_dataloaders", None)  # set once Lightning has run validation
    sources = [
        lambda: trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader(),  # what fit() was given
        lambda: trainer.datamodule.val_dataloader(),
        lambda: pl_module.val_dataloader(),
    ]
    for source in sources:
        if loaders is not None:
            break
        try:
            loaders = source()
        except Exception:  # noqa: BLE001 - Lightning raises when there is no such data or hook
            loaders = None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return loaders


def _first_batches(loader, n: int) -> List[Any]:
    if loader is None:
        return []
    batches = []
    for batch in loader:
        batches.append(tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, batch))
        if len(batches) >= n:
            break
    return batches


def switchable_losses(pl_module, loss_fn=None) -> List[CrossEntropy]:
    """Every :class:`dynscope.nn.CrossEntropy` among the module's submodules, and ``loss_fn`` if it is one."""
    losses = [m for m in pl_module.modules() if isinstance(m, CrossEntropy)]
    if isinstance(loss_fn, CrossEntropy) and not any(loss is loss_fn for loss in losses):
        losses.append(loss_fn)
    return losses


ACTIONS = ("stablemax", "orthograd", "rescale", "reset_optimizer")
DEFAULT_ACTIONS = ACTIONS


class AutoStableMax(Triggered, SoftmaxCollapse):
    """Acts when softmax collapse sets in, or before it, once the training set is fitted and the
    gradient only scales the weights up (naive loss minimisation).

    Measures everything :class:`SoftmaxCollapse` does (same tags) and, while not yet triggered,
    checks after each measurement:

    * fitted-and-aligned trigger (``nlm_trigger=True``, the default): ``train_accuracy >=
      accuracy_threshold`` and ``nlm_cos >= nlm_threshold`` for ``patience`` consecutive checks;
    * SC trigger: ``sc_fraction >= threshold`` for ``patience`` consecutive checks.

    When one fires, it takes the ``actions`` (any of, in this order):

    * ``"stablemax"``: every :class:`dynscope.nn.CrossEntropy` of the module gets ``mode =
      "stablemax"`` (from the next optimizer step on). Skipped, with one warning, on a module
      without one (a module computing ``F.cross_entropy`` itself);
    * ``"orthograd"``: the trainer's optimizers are wrapped in :class:`dynscope.optim.OrthoGrad` in
      place (``trainer.strategy.optimizers``; automatic and manual optimization; LR schedulers keep
      their optimizer);
    * ``"rescale"``: every trainable floating-point parameter is multiplied by ``rescale_factor``,
      once. For a bias-free ReLU network with ``L`` layers this divides the logits by
      ``1/factor^L`` and leaves its predictions unchanged; with biases or normalisation layers it
      changes them;
    * ``"reset_optimizer"``: the optimizers' state (Adam's moments and step count) is cleared, so
      they restart as freshly built ones.

    Why this default recipe (modular addition with a bias-free ReLU MLP, AdamW without weight decay,
    float32, as in ``dynscope demo``): once the training set is fitted, the gradient aligns with the
    weights (``nlm_cos`` about 0.68 when the trigger fires, peaking at 0.76-0.82 later), the logits
    grow until the loss rounds to zero, and test accuracy stays near chance. StableMax switched on
    mid-run alone does not bring generalisation back, and StableMax with OrthoGrad at softmax
    collapse needed 575-600 steps. OrthoGrad removes the scaling direction from the updates;
    shrinking the weights (x0.5: logits / 8 for three layers) puts the softmax back where it has a
    gradient; a fresh optimizer state lets Adam's step sizes follow the new gradients. With all four
    at the fitted-and-aligned trigger, test accuracy reached 95% 110-130 steps after the trigger
    (mod 113, width 200, trigger at step 120) and 160-180 steps after it (mod 71, width 128, trigger
    at step 100), on each of 3 seeds; the control runs stay at chance. Leaving one action out (mod
    71, seed 0, 400 steps after the trigger): without the rescale or without OrthoGrad, no
    recovery; without the optimizer reset, the same 160 steps (the reset is kept: it costs nothing
    and the moments it drops were tuned to the scaling direction).

    The decision is summed over ranks, so every rank acts at the same step. A check that failed
    does not count. A requested action that cannot act on this module (no ``CrossEntropy`` to
    switch, no optimizer to wrap or reset) warns once and is skipped, unless ``strict=True``; so is
    the whole mitigation when the module's batches cannot be measured (e.g. soft targets): it
    never ends a non-strict run.

    Logged at every check: ``dynscope/mitigation/stablemax`` (0 before, 1 from the triggering
    check on), ``dynscope/mitigation/orthograd`` when ``"orthograd"`` is among the actions; at the
    trigger, a text entry ``dynscope/mitigation/events`` saying when, why, what was done and the
    values that triggered it. ``triggered_step``, ``reason``, ``trigger_values`` and ``applied``
    (the actions taken) hold the same (``None`` before). The state is part of the checkpoint: on
    resume the lasting actions (StableMax, OrthoGrad) are re-applied to the rebuilt loss and
    optimizers; the one-off ones (rescale, reset) are not repeated (the checkpoint already holds the
    rescaled weights and the fresh optimizer state).

    Args:
        every_n_steps: period of the checks (one forward pass each).
        dtype: the dtype the loss is computed in (see :class:`SoftmaxCollapse`). These two are the
            positional arguments, in :class:`SoftmaxCollapse`'s order; all others are passed by name.
        threshold: SC fraction that counts as collapse.
        patience: consecutive checks a condition must hold.
        orthograd: ``True`` adds ``"orthograd"`` to ``actions`` (kept for older configurations).
        actions: what to do at the trigger, any of ``"stablemax"``, ``"orthograd"``, ``"rescale"``,
            ``"reset_optimizer"`` (a list, or one comma-separated string; default: all four).
        rescale_factor: the factor of ``"rescale"``, in (0, 1].
        nlm_trigger: enable the fitted-and-aligned trigger.
        nlm_threshold: ``nlm_cos`` that counts as aligned (default 0.5, see above).
        accuracy_threshold: train accuracy that counts as fitted (default 1.0).
        Other arguments: see :class:`SoftmaxCollapse`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from dynscope.callbacks import AutoStableMax
        >>> callback = AutoStableMax()   # the default recipe, as in `dynscope demo`
        >>> callback.actions
        ('stablemax', 'orthograd', 'rescale', 'reset_optimizer')
        >>> only_orthograd = AutoStableMax(actions=["orthograd", "reset_optimizer"], nlm_threshold=0.6)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
        >>> callback.triggered_step is None
        True
    """

    dashboard_groups = ("collapse", "mitigation")

    def __init__(
        self,
        every_n_steps: int = 10,
        dtype: Optional[str] = None,
        *,
        threshold: float = 0.1,
        patience: int = 3,
        orthograd: bool = False,
        actions: Union[str, Sequence[str]] = DEFAULT_ACTIONS,
        rescale_factor: float = 0.5,
        nlm_trigger: bool = True,
        nlm_threshold: float = 0.5,
        accuracy_threshold: float = 1.0,
        per_layer: bool = True,
        held_data: str = "none",
        held_batches: int = 1,
        ignore_index: int = -100,
        loss_fn: Optional[Callable] = None,
        schedule: str = "steps",
        points_per_decade: int = 10,
        fixed_batch: bool = False,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        if isinstance(every_n_steps, float) or isinstance(dtype, (int, float)):
            raise TypeError(
                "AutoStableMax's positional arguments are SoftmaxCollapse's (every_n_steps, dtype); pass threshold, "
                f"patience and orthograd by name (got every_n_steps={every_n_steps!r}, dtype={dtype!r})"
            )
        super().__init__(
            every_n_steps, dtype, nlm=True, per_layer=per_layer, held_data=held_data, held_batches=held_batches,
            ignore_index=ignore_index, loss_fn=loss_fn, schedule=schedule, points_per_decade=points_per_decade,
            fixed_batch=fixed_batch, mode=mode, strict=strict,
        )
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold is a fraction of samples in (0, 1], got {threshold}")
        self.trigger = Trigger("stablemax", patience, conditions=("sc", "nlm"))
        if not -1.0 <= nlm_threshold <= 1.0:
            raise ValueError(f"nlm_threshold is a cosine in [-1, 1], got {nlm_threshold}")
        if not 0.0 <= accuracy_threshold <= 1.0:
            raise ValueError(f"accuracy_threshold must be in [0, 1], got {accuracy_threshold}")
        if not 0.0 < rescale_factor <= 1.0:
            raise ValueError(f"rescale_factor must be in (0, 1], got {rescale_factor}")
        chosen = [a.strip() for a in actions.split(",")] if isinstance(actions, str) else [str(a) for a in actions]
        chosen = [a for a in chosen if a]
        unknown = [a for a in chosen if a not in ACTIONS]
        if unknown:
            raise ValueError(f"actions take any of {ACTIONS}, got {unknown}")
        if orthograd and "orthograd" not in chosen:
            chosen.append("orthograd")
        if not chosen:
            raise ValueError(f"actions must name at least one of {ACTIONS}")
        self.threshold = threshold
        self.actions: Tuple[str, ...] = tuple(a for a in ACTIONS if a in chosen)
        self.orthograd = "orthograd" in self.actions
        self.rescale_factor = float(rescale_factor)
        self.nlm_trigger = nlm_trigger
        self.nlm_threshold = nlm_threshold
        self.accuracy_threshold = accuracy_threshold
        self.applied: Optional[List[str]] = None

    def _cannot(self, key: str, message: str) -> None:
        """A requested action cannot act: raise under ``strict``, else warn once."""
        if self.strict:
            raise LossProtocolError(f"AutoStableMax: {message}")
        self.warn_once(key, message)

    def check_module(self, trainer, pl_module) -> None:
        if "stablemax" in self.actions and not switchable_losses(pl_module, self.loss_fn):
            self._cannot(
                "no-loss",
                f"{type(pl_module).__name__} holds no dynscope.nn.CrossEntropy, so the StableMax switch is skipped"
                + (f" (the other actions, {', '.join(a for a in self.actions if a != 'stablemax')}, still apply)"
                   if len(self.actions) > 1 else "")
                + "; to enable it, compute the loss with one kept on the module, e.g. "
                "`self.criterion = dynscope.nn.CrossEntropy()` in __init__",
            )

    def on_train_start(self, trainer, pl_module) -> None:
        if self.active:  # resumed from a checkpoint taken after the trigger: only the lasting actions again
            self._apply(trainer, pl_module, [a for a in (self.applied or self.actions) if a in ("stablemax", "orthograd")])

    # -- deciding -------------------------------------------------------------------------------
    def drop(self, reason: str) -> None:
        # a started run must not end over a mitigation: measure nothing more, act never
        super().drop(f"cannot measure this module's batches, the mitigation is skipped: {reason}")

    def run(self, trainer, pl_module, batch) -> Dict[str, float]:
        metrics = super().run(trainer, pl_module, batch)
        step = trainer.global_step
        if not self.active:
            fired = self.trigger.check(trainer, self._hits(metrics), pl_module.device)
            if fired is not None:
                self._trigger(trainer, pl_module, step, self._reason(fired), metrics)
        scalars = {tag("mitigation", "stablemax"): float(self.active)}
        if self.orthograd:
            scalars[tag("mitigation", "orthograd")] = float(self.active)
        log_scalars(trainer, scalars, step)
        return metrics

    def _hits(self, metrics: Dict[str, float]) -> Dict[str, Optional[bool]]:
        """This check's conditions (``None``: not measured; no metrics at all: the check does not count)."""
        if not metrics:
            return {}
        sc, acc, cos = metrics.get("sc_fraction"), metrics.get("train_accuracy"), metrics.get("nlm_cos")
        fitted = acc is not None and cos is not None and acc >= self.accuracy_threshold and cos >= self.nlm_threshold
        return {"sc": None if sc is None else sc >= self.threshold, "nlm": fitted if self.nlm_trigger else None}

    def _reason(self, fired: str) -> str:
        if fired == "sc":
            return f"softmax collapse: sc_fraction >= {self.threshold:g} for {self.trigger.held}"
        if fired == "nlm":
            return (
                f"fitted and aligned (naive loss minimisation): train_accuracy >= {self.accuracy_threshold:g} and "
                f"nlm_cos >= {self.nlm_threshold:g} for {self.trigger.held}"
            )
        return fired  # ANOTHER_RANK

    def _trigger(self, trainer, pl_module, step: int, reason: str, metrics: Dict[str, float]) -> None:
        keys = ("sc_fraction", "zero_loss_fraction", "max_logit_gap", "train_accuracy", "nlm_cos")
        self.trigger.fire(step, reason, metrics, keys)
        done = self._apply(trainer, pl_module, self.actions)
        self.applied = [a for a in self.actions if done.get(a)]
        action = "; ".join(done[a] for a in self.actions if done.get(a)) or "no action could be taken"
        # the event text the dashboards and the report parse (run() logs the 0/1 scalars)
        self.trigger.announce(trainer, f"{reason}; {action} (from step {step + 1} on)", scalar=False)

    def _apply(self, trainer, pl_module, actions) -> Dict[str, str]:
        """Take ``actions``; ``{action: what was done}`` for those that could act."""
        done: Dict[str, str] = {}
        optimizers = [o for o in getattr(trainer.strategy, "optimizers", None) or [] if not _is_mock(o)]
        if "stablemax" in actions:
            losses = switchable_losses(pl_module, self.loss_fn)
            for loss in losses:
                loss.mode = "stablemax"
            if losses:
                done["stablemax"] = f"switched {len(losses)} CrossEntropy loss{'es' if len(losses) != 1 else ''} to StableMax"
        if not optimizers and any(a in actions for a in ("orthograd", "reset_optimizer")):
            self._cannot("no-optimizer", "the trainer has no optimizer to wrap in OrthoGrad or reset; skipped")
        if "orthograd" in actions and optimizers:
            wrap_optimizers(trainer)
            done["orthograd"] = f"wrapped {len(optimizers)} optimizer{'s' if len(optimizers) != 1 else ''} in OrthoGrad"
        if "rescale" in actions:
            with torch.no_grad():
                params = [p for p in pl_module.parameters() if p.requires_grad and p.is_floating_point()]
                for p in params:
                    p.mul_(self.rescale_factor)
            done["rescale"] = f"multiplied {len(params)} weight tensors by {self.rescale_factor:g} once"
        if "reset_optimizer" in actions and optimizers:
            for optimizer in trainer.strategy.optimizers:
                if not _is_mock(optimizer):
                    optimizer.state = defaultdict(dict)
            done["reset_optimizer"] = "reset the optimizer state"
        return done

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(self.trigger.state_dict(), applied=self.applied)
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.trigger.load_state_dict(state_dict)
        # checkpoints from before `applied` existed: StableMax and, if configured, OrthoGrad were on
        self.applied = state_dict.get("applied") or (["stablemax"] + (["orthograd"] if self.orthograd else [])
                                                      if self.active else None)


def wrap_optimizers(trainer) -> None:
    """Wrap each of the trainer's optimizers in :class:`~dynscope.optim.OrthoGrad` (once), in place.

    Goes through ``trainer.strategy.optimizers``' setter so that Lightning rebuilds the
    ``LightningOptimizer`` wrappers the training loop steps.
    """
    strategy = trainer.strategy
    strategy.optimizers = [o if isinstance(o, OrthoGrad) or _is_mock(o) else OrthoGrad(o) for o in strategy.optimizers]


def _is_mock(optimizer) -> bool:
    """Lightning's stand-in when ``configure_optimizers`` returns nothing."""
    return type(optimizer).__name__ == "_MockOptimizer"
