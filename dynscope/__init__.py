"""dynscope: training-dynamics diagnostics.

The core (this package) is plain PyTorch: objectives, batched Hessian-vector products, estimators
and metrics, usable from any training loop. Lightning adapters live in :mod:`dynscope.callbacks`,
TensorBoard layouts and the static report in :mod:`dynscope.dashboards`.
"""

from .eigen import EigenResult, top_eigenvalues
from .hvp import HessianOperator, MatrixOperator, ScaledOperator, hvp
from .objective import NonFiniteError, NotPerSampleError, Objective
from .params import ParamLayout
from .sharpness import clip_top_coordinates, directional_sharpness
from .trace import TraceResult, hessian_trace

__version__ = "0.1.0"

__all__ = [
    "EigenResult",
    "HessianOperator",
    "MatrixOperator",
    "ScaledOperator",
    "NonFiniteError",
    "NotPerSampleError",
    "Objective",
    "ParamLayout",
    "TraceResult",
    "clip_top_coordinates",
    "directional_sharpness",
    "hessian_trace",
    "hvp",
    "top_eigenvalues",
]
