"""The one measurement context: how dynscope runs a model without changing its training.

Every measurement (the objective's loss and HVPs, a long-horizon metric, logits for collapse
counting, linear-region counting) runs the model inside :func:`measurement`: in the mode asked for,
with every RNG forked, and afterwards each submodule's train/eval flag (and, where asked, every
buffer) is exactly what it was.
"""

from __future__ import annotations

import contextlib
import random
from typing import ContextManager, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def rngs_preserved() -> Iterator[None]:
    """Python's, numpy's and torch's (CPU) global RNGs come back as they were (dataset transforms may draw).

    Example:
        >>> state = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
        >>> with rngs_preserved():
        ...     _ = random.random(), np.random.rand(), torch.rand(1)
        >>> after = random.getstate(), np.random.get_state()[1], torch.random.get_rng_state()
        >>> after[0] == state[0], bool((after[1] == state[1]).all()), torch.equal(after[2], state[2])
        (True, True, True)
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def cuda_devices(tensors) -> list:
    """The CUDA device indices among ``tensors`` (what ``torch.random.fork_rng`` must fork)."""
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})


def _sdp_switches() -> Optional[list]:
    """``(get, set, is_math)`` of each scaled-dot-product backend flag, or None if torch names them otherwise."""
    try:
        from torch.nn.attention import _backend_names

        return [(getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"), value == "MATH")
                for name, value in _backend_names.items()]
    except (ImportError, AttributeError):
        return None


_SDP_SWITCHES = _sdp_switches()


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """``sdpa_kernel([SDPBackend.MATH])`` without its name lookups per flag (a measurement of a small model pays them)."""
    if _SDP_SWITCHES is None:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
        return
    before = [get() for get, _, _ in _SDP_SWITCHES]
    for _, switch, is_math in _SDP_SWITCHES:
        switch(is_math)
    try:
        yield
    finally:
        for (_, switch, _), was in zip(_SDP_SWITCHES, before):
            switch(was)


@contextlib.contextmanager
def measurement(
    module: nn.Module,
    mode: str = "eval",
    *,
    grad: bool = False,
    restore_buffers: Optional[bool] = None,
    autocast: Optional[ContextManager] = None,
    math_attention: bool = False,
    devices: Optional[Sequence[int]] = None,
    modules: Optional[Sequence[nn.Module]] = None,
) -> Iterator[nn.Module]:
    """Run the enclosed code on ``module`` in ``mode`` without a trace on training; yields ``module``.

    Args:
        module: the model; every submodule's ``training`` flag is restored afterwards (and only
            touched when one differs from ``mode``).
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"``.
        grad: autograd on (``torch.enable_grad``) or off (``torch.no_grad``, the default).
        restore_buffers: put every buffer's value back afterwards (BatchNorm running statistics
            updated by a train-mode forward); default: in train mode.
        autocast: a context to run inside, e.g. the autocast of mixed-precision training so that
            the values are the ones training sees.
        math_attention: scaled-dot-product attention uses its math kernel (the fused ones have no
            double-backward or forward-AD rules).
        devices: the CUDA devices whose RNG to fork (default: those of the module's parameters).
        modules: ``list(module.modules())`` where the caller has it already (default: walked here).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2)).train()
        >>> state = torch.random.get_rng_state()
        >>> with measurement(model, "train"):
        ...     _ = model(torch.randn(4, 2))          # draws dropout masks, updates BatchNorm statistics
        >>> model.training, bool((model[2].running_mean == 0).all()), torch.equal(state, torch.random.get_rng_state())
        (True, True, True)
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    want = mode == "train"
    flags = [(m, m.training) for m in (module.modules() if modules is None else modules)]
    switch = any(training != want for _, training in flags)
    # where no module overrides train() or __setattr__, the flags are plain attributes: set them
    # directly (Module.train and Module.__setattr__ cost more than a small model's measurement ops)
    plain = all(type(m).train is nn.Module.train and type(m).__setattr__ is nn.Module.__setattr__
                and not hasattr(type(m), "training") for m, _ in flags)  # no class-level training (a property)
    keep = want if restore_buffers is None else restore_buffers
    saved = [(b, b.clone()) for b in module.buffers()] if keep else []
    forked = cuda_devices(module.parameters()) if devices is None else list(devices)
    try:
        with contextlib.ExitStack() as stack:
            if forked:
                stack.enter_context(torch.random.fork_rng(devices=forked))
            else:  # what fork_rng(devices=[]) does, without its accelerator lookups
                stack.callback(torch.random.set_rng_state, torch.random.get_rng_state())
            stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
            if math_attention:
                stack.enter_context(_math_attention())
            if autocast is not None:
                stack.enter_context(autocast)
            if switch and plain:
                for m, _ in flags:
                    m.__dict__["training"] = want
            elif switch:
                module.train(want)
            yield module
    finally:
        if switch or any(m.training != training for m, training in flags):
            for m, training in flags:
                if plain:
                    m.__dict__["training"] = training
                else:
                    m.training = training
        if saved:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)
