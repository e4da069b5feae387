"""Lightning, whichever way it is installed.

dynscope callbacks derive from the ``Callback`` class of every installed Lightning distribution
(``pytorch_lightning`` and ``lightning.pytorch``), so one callback object is accepted by either
package's ``Trainer``.
"""

from __future__ import annotations

import importlib

_packages = []
for _name in ("pytorch_lightning", "lightning.pytorch"):
    try:
        _packages.append(importlib.import_module(_name))
    except ImportError:  # pragma: no cover - depends on the environment
        pass
if not _packages:  # pragma: no cover
    raise ImportError("dynscope.callbacks needs PyTorch Lightning: pip install pytorch-lightning")

CallbackBase = type("CallbackBase", tuple(p.Callback for p in _packages), {"__doc__": "Lightning's Callback."})
LightningModuleTypes = tuple(p.LightningModule for p in _packages)
TensorBoardLoggerTypes = tuple(p.loggers.TensorBoardLogger for p in _packages)


def lightning_package(trainer) -> object:
    """The Lightning package whose ``Trainer`` this is (``pytorch_lightning`` or ``lightning.pytorch``)."""
    for package in _packages:
        if isinstance(trainer, package.Trainer):
            return package
    return _packages[0]


def is_global_zero(trainer) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))
