"""Lightning callbacks: dynscope's diagnostics and mitigations inside a ``Trainer``.

Each callback works with ``pytorch_lightning`` and ``lightning.pytorch`` alike. How a module tells
dynscope its loss is described in :mod:`dynscope.callbacks.protocol`.
"""

from .base import DiagnosticCallback
from .curvature import Curvature
from .protocol import LossProtocolError
from .schedule import Schedule

__all__ = ["Curvature", "DiagnosticCallback", "LossProtocolError", "Schedule"]
