"""The LinearRegions callback: local complexity at training, held-out and random points.

**Rule: never iterate the trainer's training loader.** Starting another iterator over it would
reset a loader with ``persistent_workers=True`` (its workers restart their iterable dataset) or
consume its sampler's randomness, so training would see other batches. Training points therefore
come from the training dataset by index when it is map-style (random access touches neither the
loader, its sampler, its workers nor any RNG) and otherwise from the batches training already
produced (the first measured batch). Held-out points may come from iterating the validation
loader (Lightning restarts it at every validation anyway), with every global RNG preserved.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

from dynscope.context import rngs_preserved
from dynscope.regions import PIECEWISE_LINEAR, SMOOTH, NotPiecewiseLinearWarning, local_complexity, random_points_in_box

from .base import DiagnosticCallback
from .protocol import LossProtocolError, _describe

INPUTS_HELP = (
    "LinearRegions reads the inputs of (x, y) batches or of tensor batches; for other batch structures "
    "define `dynscope_inputs(self, batch) -> x` on the LightningModule (then `module(x)` is the forward)"
)


def module_inputs(module, batch: Any) -> torch.Tensor:
    """The model inputs of ``batch``: ``module.dynscope_inputs(batch)``, ``x`` of ``(x, y)``, or the tensor."""
    hook = getattr(module, "dynscope_inputs", None)
    if callable(hook):
        inputs = hook(batch)
    elif isinstance(batch, torch.Tensor):
        inputs = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        inputs = batch[0]
    else:
        raise LossProtocolError(f"cannot find the inputs in {_describe(batch)}: {INPUTS_HELP}")
    if not isinstance(inputs, torch.Tensor):
        raise LossProtocolError(f"the inputs must be a tensor, got {type(inputs).__name__}: {INPUTS_HELP}")
    return inputs


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def sample_inputs(loader: Any, module, num_points: int, seed: int, iterate: bool = True) -> Optional[torch.Tensor]:
    """``num_points`` inputs drawn from a dataloader's dataset (seeded, without replacement).

    Map-style datasets are indexed directly (the loader's sampler and its RNG are not touched) and
    collated with the loader's ``collate_fn``; items of a ``DataLoader(batch_size=None)`` are whole
    batches (pre-batched data), drawn whole and then thinned to ``num_points``; iterable datasets
    are read from the start, unless ``iterate=False`` (the training loader: see the module
    docstring). ``None`` when there is no loader, or nothing could be read without iterating it.
    """
    loader = _first_loader(loader)
    if loader is None:
        return None
    dataset = getattr(loader, "dataset", None)
    with rngs_preserved(), torch.no_grad():
        indexable = not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "__len__")
        if dataset is not None and indexable and len(dataset):
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(dataset), generator=generator)
            collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
            if getattr(loader, "batch_size", 1) is None and getattr(loader, "batch_sampler", None) is None:
                # DataLoader(batch_size=None): every item is already a batch; take whole items, then points
                pieces, count = [], 0
                for i in order.tolist():
                    pieces.append(module_inputs(module, collate(dataset[i])).detach().cpu())
                    count += pieces[-1].shape[0]
                    if count >= num_points:
                        break
                inputs = torch.cat(pieces)
                pick = torch.randperm(inputs.shape[0], generator=generator)[:num_points].sort().values
                return inputs[pick].clone()
            indices = order[:num_points].tolist()
            return module_inputs(module, collate([dataset[i] for i in indices])).detach().cpu().clone()
        if not iterate:
            return None
        pieces, count = [], 0
        for batch in loader:
            inputs = module_inputs(module, batch).detach().cpu()
            pieces.append(inputs)
            count += inputs.shape[0]
            if count >= num_points:
                break
        return torch.cat(pieces)[:num_points].clone() if pieces else None


class LinearRegions(DiagnosticCallback):
    """Linear-region density (local complexity) at training, held-out and random points.

    Humayun, Balestriero, Baraniuk (2024), "Deep networks always grok and here is why": the number
    of neurons whose activation kink cuts a small cross-polytope around a point (see
    :func:`dynscope.local_complexity`). During grokking it falls, rises and falls again at the
    training points ("region migration"), over orders of magnitude of steps, hence the
    log-spaced schedule by default.

    Logged under ``dynscope/regions/``:

    * ``lc_train``: mean LC at ``num_points`` training inputs, drawn once (seeded) from the training
      dataloader's dataset by index (or, for a dataset that cannot be indexed, the inputs of the
      first measured batch: the training loader itself is never iterated) and kept for the whole
      run (and in checkpoints), so the curve is comparable across steps.
    * ``lc_test``: at held-out inputs drawn the same way from ``trainer.val_dataloaders``. There is
      none when the run has no validation (no validation dataloader, or a module without
      ``validation_step``); Lightning builds the loader at the sanity check or the first
      validation, so with ``num_sanity_val_steps=0`` ``lc_test`` starts after the first validation.
    * ``lc_random``: at points uniform in the bounding box of the training sample.
    * per layer: ``lc_train/<layer>`` (and ``lc_test/<layer>``, ``lc_random/<layer>``).

    With several radii every tag gets the suffix ``/r=<radius>`` (``lc_train/r=0.05``,
    ``lc_train/<layer>/r=0.05``); with one radius the tags are plain. The model is measured in eval
    mode; training is unaffected. Inputs are ``x`` of ``(x, y)`` batches or
    ``module.dynscope_inputs(batch)``; the forward is ``module(x)``. All ranks compute the same
    values (same points); rank zero logs. A model with smooth activation modules (GELU, SiLU, tanh,
    ...) has no linear regions: the callback refuses it at ``setup`` (``DynScope`` drops it with one
    warning); smooth functional calls found at the first measurement drop it with one warning.

    Args:
        radii: neighbourhood radius or radii, in input units; choose them small compared to the
            distance between data points.
        num_directions: directions of the cross-polytope (``2 *`` as many vertices per point),
            capped at the input size.
        num_points: training points. A measurement evaluates ``(2 * num_directions + 1) * len(radii)``
            vertices per point (train, test and random): at the defaults 816 forwards, about 2
            training steps on the benchmark MLP and 5 on the CNN (``benchmarks/bench_budget.py``);
            the values are means over the points, so more points give smoother curves at
            proportionally more cost (25 directions and 3 x 256 points cost ~700 steps on the CNN).
        num_test_points: held-out points (0: no ``lc_test``).
        num_random_points: random points (0: no ``lc_random``).
        per_layer: also log the per-layer values.
        functional: also count ``F.relu``-style calls inside ``forward`` methods (needed for models
            that do not use activation modules); see :func:`dynscope.local_complexity`.
        seed: seed of the sampled points and of the directions.
        chunk_size: items (here: points) per vectorized call, one batched forward (default: about
            8192 vertices per forward).
        loss_fn: accepted like every callback's ``loss_fn`` and not used (the regions need inputs only).
        Scheduling (``schedule="log"`` by default, ``points_per_decade``, ``every_n_steps``) and
        ``strict``: see :class:`~dynscope.callbacks.base.DiagnosticCallback`.

    Example:
        >>> import pytorch_lightning as pl
        >>> from dynscope.callbacks import LinearRegions
        >>> callback = LinearRegions(radii=[0.05, 0.2], num_directions=8, num_points=128)
        >>> trainer = pl.Trainer(callbacks=[callback], max_steps=10, logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False)
    """

    group = "regions"

    def __init__(
        self,
        radii: Union[float, Sequence[float]] = (0.1,),
        num_directions: int = 8,
        num_points: int = 16,
        num_test_points: int = 16,
        num_random_points: int = 16,
        *,
        per_layer: bool = True,
        functional: bool = False,
        schedule: str = "log",
        points_per_decade: int = 4,
        every_n_steps: int = 50,
        seed: int = 0,
        chunk_size: Optional[int] = None,
        loss_fn: Optional[Callable] = None,
        strict: bool = False,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps, schedule=schedule, points_per_decade=points_per_decade, loss_fn=loss_fn,
            strict=strict,
        )
        radii = (radii,) if isinstance(radii, (int, float)) else tuple(radii)
        if not radii or any(not (isinstance(r, (int, float)) and r > 0) for r in radii):
            raise ValueError(f"radii must be one or more positive numbers, got {radii!r}")
        if num_directions < 1:
            raise ValueError(f"num_directions must be >= 1, got {num_directions}")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        if num_test_points < 0 or num_random_points < 0:
            raise ValueError("num_test_points and num_random_points must be >= 0")
        self.radii = tuple(float(r) for r in radii)
        self.num_directions = num_directions
        self.num_points = num_points
        self.num_test_points = num_test_points
        self.num_random_points = num_random_points
        self.per_layer = per_layer
        self.functional = functional
        self.seed = seed
        self.chunk_size = chunk_size
        self.train_points: Optional[torch.Tensor] = None
        self.test_points: Optional[torch.Tensor] = None
        self.random_points: Optional[torch.Tensor] = None

    def check_module(self, trainer, pl_module) -> None:
        smooth = [f"{type(m).__name__} at {name!r}" for name, m in pl_module.named_modules() if isinstance(m, SMOOTH)]
        if smooth:
            raise ValueError(
                f"LinearRegions does not apply to {type(pl_module).__name__}: it has smooth activations "
                f"({', '.join(smooth[:3])}{', ...' if len(smooth) > 3 else ''}), so no linear regions to count"
            )
        if not self.functional and not any(isinstance(m, PIECEWISE_LINEAR) for m in pl_module.modules()):
            raise ValueError(
                f"LinearRegions: {type(pl_module).__name__} has no ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh or "
                "Hardsigmoid module; if its forward calls F.relu (or torch.relu, x.relu()), pass functional=True"
            )

    def expected_cost(self, batch_size: Optional[int] = None) -> float:
        """One measurement in training steps: a forward of every point's ``2 * num_directions + 1``
        cross-polytope vertices per radius, at about half a training step per batch of forwards
        (a step is a forward and a backward)."""
        declared = getattr(self, "expected_steps", None)
        if declared is not None:
            return float(declared)
        points = self.num_points + self.num_test_points + self.num_random_points
        forwards = points * (2 * self.num_directions + 1) * len(self.radii)
        return max(1.0, forwards / (2 * (batch_size or 64)))

    def pilot(self, trainer, pl_module, batch, clock: Callable[[], float],
              batch_size: Optional[int] = None) -> Optional[float]:
        """What one expected step of :meth:`expected_cost` costs on this model, in ``clock`` seconds,
        timed before the first measurement on two small sets of training points (``None``: none).

        The stated cost counts forwards as if each sample cost its share of a training step, which
        holds for a network whose forward is arithmetic (the benchmark CNN: 1.6x) but makes a small
        one, whose forwards are mostly per-call overhead, look up to 25x dearer than it is (the digits
        MLP). So the first 2 and the first 6 training points are measured (with the first radius),
        after one untimed point that pays a first call's one-time work, which gives a call's fixed
        and per-point cost, and the measurement's calls are predicted from them: a sixth of a
        measurement. The results are discarded.
        """
        if self.disabled:
            return None
        self._ensure_points(trainer, pl_module, batch)
        available = len(self.train_points)
        sizes = (min(2, available), min(6, available))
        directions = min(self.num_directions, self.train_points[0].numel())
        seconds = []

        def points(size: int):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotPiecewiseLinearWarning)
                return local_complexity(pl_module, self.train_points[:size], self.radii[0], directions, seed=self.seed,
                                        chunk_size=self.chunk_size, functional=self.functional)

        # untimed: one point, which pays the first call's one-time work (the forward that sizes the
        # measurement's forwards, new batch shapes, the hooks' first use) outside the timed calls
        points(1)
        for size in sizes:
            start = clock()
            result = points(size)
            seconds.append(clock() - start)
            if not result.applicable:
                self._drop_smooth(pl_module)
                return None
        per_point = max((seconds[1] - seconds[0]) / (sizes[1] - sizes[0]), 0.0) if sizes[1] > sizes[0] else seconds[0] / sizes[0]
        fixed = max(seconds[0] - sizes[0] * per_point, 0.0)
        calls = [n for n in (self.num_points, self.num_test_points, self.num_random_points) if n]
        predicted = len(self.radii) * sum(fixed + n * per_point for n in calls)
        expected = self.expected_cost(batch_size)
        return predicted / expected if predicted > 0 and expected > 0 else None

    def _drop_smooth(self, pl_module) -> None:
        self.drop(f"{type(pl_module).__name__} calls smooth activations (GELU, SiLU, tanh, ...) in its "
                  "forward: it has no linear regions, so local complexity does not apply")

    def _ensure_points(self, trainer, pl_module, batch) -> None:
        if self.train_points is None:
            points = sample_inputs(trainer.train_dataloader, pl_module, self.num_points, self.seed, iterate=False)
            if points is None:  # an iterable dataset: the inputs training just used
                points = module_inputs(pl_module, batch).detach().cpu()[: self.num_points].clone()
                if len(points) < self.num_points:
                    self.warn_once("points", f"the training data cannot be indexed, so lc_train uses the {len(points)} "
                                             f"inputs of the first measured batch (num_points={self.num_points})")
            self.train_points = points
        if self.random_points is None and self.num_random_points:
            self.random_points = random_points_in_box(self.train_points, self.num_random_points, self.seed + 1)
        if self.test_points is None and self.num_test_points:
            self.test_points = sample_inputs(trainer.val_dataloaders, pl_module, self.num_test_points, self.seed + 2)

    def measure(self, trainer, pl_module, batch) -> Dict[str, float]:
        self._ensure_points(trainer, pl_module, batch)
        dim = self.train_points[0].numel()
        if self.num_directions > dim:
            self.warn_once("directions", f"num_directions={self.num_directions} capped at the input size {dim}")
        directions = min(self.num_directions, dim)
        out: Dict[str, float] = {}
        for radius in self.radii:
            suffix = "" if len(self.radii) == 1 else f"/r={radius:g}"
            for name, points in (("train", self.train_points), ("test", self.test_points), ("random", self.random_points)):
                if points is None:
                    continue
                with warnings.catch_warnings():  # the core's "reported as NaN" is not what happens here
                    warnings.simplefilter("ignore", NotPiecewiseLinearWarning)
                    result = local_complexity(
                        pl_module, points, radius, directions, seed=self.seed, chunk_size=self.chunk_size,
                        functional=self.functional,
                    )
                if not result.applicable:
                    self._drop_smooth(pl_module)
                    return {}
                out[f"lc_{name}{suffix}"] = result.total
                if self.per_layer:
                    out.update({f"lc_{name}/{layer}{suffix}": v for layer, v in result.per_layer.items()})
        return out

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(train_points=self.train_points, test_points=self.test_points, random_points=self.random_points)
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.train_points = state_dict.get("train_points")
        self.test_points = state_dict.get("test_points")
        self.random_points = state_dict.get("random_points")
