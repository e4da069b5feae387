"""Lightning callbacks: dynscope's diagnostics and mitigations inside a ``Trainer``.

Each callback works with ``pytorch_lightning`` and ``lightning.pytorch`` alike. How a module tells
dynscope its loss is described in :mod:`dynscope.callbacks.protocol`.
"""

from .amplification import AutoEMA, VarianceAmplification
from .attention import AttentionLogits
from .base import DiagnosticCallback
from .collapse import AutoStableMax, SoftmaxCollapse
from .curvature import Curvature
from .logits import AutoZLoss, OutputLogits
from .noise import GradientNoise
from .protocol import LossProtocolError
from .regions import LinearRegions
from .spikes import SpikeForensics
from .suite import DynScope
from .schedule import Schedule

__all__ = [
    "AttentionLogits",
    "AutoEMA",
    "VarianceAmplification",
    "AutoStableMax",
    "AutoZLoss",
    "Curvature",
    "DiagnosticCallback",
    "DynScope",
    "GradientNoise",
    "LinearRegions",
    "LossProtocolError",
    "OutputLogits",
    "Schedule",
    "SoftmaxCollapse",
    "SpikeForensics",
]
