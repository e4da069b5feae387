"""Every result speaks the same vocabulary: ``.value`` is the headline number, ``.per_layer`` maps a
parameter tensor (or layer) to the same quantity, ``.stderr`` (where defined) is ``.value``'s standard error."""

import math

import torch
from torch import nn

from dynscope import LocalComplexityResult, NLMAlignment, ProbeResult, hessian_trace, nlm_alignment


def test_nlm_alignment_value_and_per_layer_are_its_cosines():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 4.0]]))
    net.weight.grad = torch.tensor([[-1.0, 0.0]])  # cos(theta, -grad) = 3 / 5
    result = nlm_alignment(net)
    assert isinstance(result, NLMAlignment)
    assert result.value == result.global_cos and math.isclose(result.value, 0.6, rel_tol=1e-6)
    assert result.per_layer == result.per_tensor and math.isclose(result.per_layer["weight"], 0.6, rel_tol=1e-6)


def test_trace_eigen_probe_and_region_results_share_value():
    D = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    trace = hessian_trace(D, num_matvecs=4, seed=0)
    assert math.isclose(trace.value, 6.0, rel_tol=1e-12) and trace.stderr == 0.0  # Rademacher probes: exact
    probe = ProbeResult(amplification=7.0, metric_change=0.7, loss_change=0.1, metric=1.0, loss=1.0, step_norm=0.1,
                        num_directions=4)
    assert probe.value == 7.0
    lc = LocalComplexityResult(total=3.0, per_layer={"0": 3.0}, fraction_per_layer={"0": 0.5}, per_point=torch.ones(1),
                               per_point_layer={"0": torch.ones(1)}, neurons={"0": 6}, radius=0.1, num_directions=2)
    assert lc.value == lc.total == 3.0 and lc.per_layer == {"0": 3.0}
