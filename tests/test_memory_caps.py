"""Memory caps are bytes everywhere (``memory_cap``); ``memory_cap_mb`` stays as an alias."""

import pytest
import torch
import torch.nn.functional as F

from dynscope import Objective
from dynscope.callbacks import AttentionLogits, Curvature, GradientNoise, SpikeForensics
from models import classification_data, mlp


@pytest.mark.parametrize("cls, default", [(GradientNoise, 2 * 2**30), (AttentionLogits, 64 * 2**20),
                                          (SpikeForensics, 64 * 2**20)])
def test_memory_cap_in_bytes_with_the_mib_alias(cls, default):
    assert cls().memory_cap == default
    assert cls(memory_cap=3 * 2**20).memory_cap == cls(memory_cap_mb=3).memory_cap == 3 * 2**20
    with pytest.raises(ValueError, match="not both"):
        cls(memory_cap=2**20, memory_cap_mb=1)
    for bad in (dict(memory_cap=0), dict(memory_cap_mb=0)):
        with pytest.raises(ValueError, match="at least one byte"):
            cls(**bad)


def test_curvature_passes_its_memory_cap_and_chunk_size_to_the_hessian_operator():
    torch.manual_seed(0)
    obj = Objective(mlp((3, 5, 2)), F.cross_entropy, classification_data(8, (3,), classes=2))
    op = Curvature(memory_cap=2**20, chunk_size=3, hvp_method="reverse")._operator(obj)
    assert (op.memory_cap, op.chunk_size, op.method) == (2**20, 3, "reverse")
    with pytest.raises(ValueError, match="memory_cap"):
        Curvature(memory_cap=0)
