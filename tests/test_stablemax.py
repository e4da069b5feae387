"""StableMax, its cross-entropy and the switchable CrossEntropy against closed forms and torch."""

import math

import pytest
import torch
import torch.nn.functional as F

from dynscope.nn import CrossEntropy, StableMaxCrossEntropy, log_stablemax, stablemax, stablemax_cross_entropy
from dynscope.objective import per_sample_loss_fn


def test_stablemax_closed_forms():
    assert torch.allclose(stablemax(torch.tensor([1.0, -1.0], dtype=torch.float64)),
                          torch.tensor([0.8, 0.2], dtype=torch.float64), atol=0, rtol=1e-15)
    # s(2) = 3, s(-3) = 1/4, s(0) = 1
    got = stablemax(torch.tensor([2.0, -3.0, 0.0], dtype=torch.float64))
    total = 3 + 0.25 + 1
    assert torch.allclose(got, torch.tensor([3 / total, 0.25 / total, 1 / total], dtype=torch.float64), rtol=1e-15)
    assert torch.allclose(log_stablemax(torch.tensor([1.0, -1.0])), torch.tensor([math.log(0.8), math.log(0.2)]))


def test_stablemax_is_softmax_of_sign_log1p():
    x = torch.randn(5, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20
    for dim in (0, 1, -1):
        reference = torch.softmax(torch.sign(x) * torch.log1p(x.abs()), dim=dim)
        assert torch.allclose(stablemax(x, dim=dim), reference, rtol=1e-12, atol=0)
        assert torch.allclose(log_stablemax(x, dim=dim), reference.log(), rtol=1e-12, atol=1e-12)


def test_stablemax_is_not_shift_invariant_unlike_softmax():
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert torch.allclose(torch.softmax(x + 5, -1), torch.softmax(x, -1))
    assert not torch.allclose(stablemax(x + 5), stablemax(x))
    assert torch.allclose(stablemax(x + 5), torch.tensor([7 / 12, 5 / 12], dtype=torch.float64))


def test_outputs_keep_the_input_dtype_but_are_computed_in_float64():
    x = torch.tensor([[1e4, 0.5, -2.0]], dtype=torch.float32)
    reference = stablemax(x.double()).float()
    assert stablemax(x).dtype == torch.float32
    assert torch.equal(stablemax(x), reference)
    assert stablemax(x.bfloat16()).dtype == torch.bfloat16
    loss = stablemax_cross_entropy(x, torch.tensor([1]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-math.log(1.5 / (10001 + 1.5 + 1 / 3)), rel=1e-7)


def test_cross_entropy_values_reductions_and_ignore_index():
    logits = torch.tensor([[1.0, -1.0], [1.0, -1.0], [3.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1])
    # -log 0.8, -log 0.2, -log(1 / (4 + 1))
    expected = torch.tensor([-math.log(0.8), -math.log(0.2), math.log(5.0)], dtype=torch.float64)
    assert stablemax_cross_entropy(logits[:1], targets[:1]).item() == pytest.approx(0.22314355, abs=1e-8)
    assert torch.allclose(StableMaxCrossEntropy(reduction="none")(logits, targets), expected)
    assert StableMaxCrossEntropy(reduction="sum")(logits, targets).item() == pytest.approx(expected.sum().item())
    assert StableMaxCrossEntropy()(logits, targets).item() == pytest.approx(expected.mean().item())
    ignored = torch.tensor([0, -100, 1])
    assert torch.allclose(StableMaxCrossEntropy(reduction="none")(logits, ignored),
                          torch.tensor([expected[0], 0.0, expected[2]], dtype=torch.float64))
    assert StableMaxCrossEntropy()(logits, ignored).item() == pytest.approx((expected[0] + expected[2]).item() / 2)
    assert StableMaxCrossEntropy(ignore_index=1)(logits, targets).item() == pytest.approx(expected[0].item())


def test_cross_entropy_layouts_follow_torch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 5, dtype=torch.float64, generator=g)  # [N, C, d]
    targets = torch.randint(0, 3, (4, 5), generator=g)
    picked = log_stablemax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)
    assert torch.allclose(stablemax_cross_entropy(logits, targets, reduction="none"), -picked)
    # a single sample [C] with a scalar target
    assert stablemax_cross_entropy(logits[0, :, 0], targets[0, 0]).item() == pytest.approx(-picked[0, 0].item())
    # class probabilities
    probs = torch.softmax(torch.randn(4, 3, dtype=torch.float64, generator=g), -1)
    expected = -(probs * log_stablemax(logits[:, :, 0], dim=-1)).sum(-1)
    assert torch.allclose(stablemax_cross_entropy(logits[:, :, 0], probs, reduction="none"), expected)
    one_hot = F.one_hot(targets[:, 0], 3).double()
    assert torch.allclose(stablemax_cross_entropy(logits[:, :, 0], one_hot),
                          stablemax_cross_entropy(logits[:, :, 0], targets[:, 0]))


def test_stablemax_gradient_lives_where_float32_softmax_collapsed():
    logits = torch.tensor([[120.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0])
    softmax_loss = F.cross_entropy(logits, target)
    (softmax_grad,) = torch.autograd.grad(softmax_loss, logits)
    assert softmax_loss.item() == 0.0 and not softmax_grad.any()  # collapsed: nothing to learn from

    (grad,) = torch.autograd.grad(stablemax_cross_entropy(logits, target), logits)
    # L = -log(s0 / S), s0 = 121, S = 123, s'(x) = 1 for x >= 0: dL/dz0 = -(1/121 - 1/123), dL/dzj = 1/123
    expected = torch.tensor([[-(1 / 121 - 1 / 123), 1 / 123, 1 / 123]])
    assert torch.isfinite(grad).all() and grad.abs().min() > 0
    assert torch.allclose(grad, expected, rtol=1e-6)


def test_gradients_are_finite_at_the_branch_points():
    x = torch.tensor([[1.0, 0.0, -1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(stablemax_cross_entropy(x, torch.tensor([0])), x)
    assert torch.isfinite(grad).all()
    # against the smooth formula: dL/dx_j = s'(x_j)/S - [j = y] s'(x_y)/s_y, s'(x) = 1 (x >= 0), 1/(1-x)^2 (x < 0)
    s = torch.tensor([2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    ds = torch.tensor([1.0, 1.0, 0.25, 1.0], dtype=torch.float64)
    expected = ds / s.sum()
    expected[0] -= ds[0] / s[0]
    assert torch.allclose(grad[0], expected, rtol=1e-12)


def test_switchable_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    loss = CrossEntropy()
    assert torch.equal(loss(logits, targets), F.cross_entropy(logits, targets))
    loss.mode = "stablemax"
    assert torch.equal(loss(logits, targets), stablemax_cross_entropy(logits, targets))
    unreduced = per_sample_loss_fn(loss)  # what dynscope's objectives use: keeps the mode
    assert torch.equal(unreduced(logits, targets), stablemax_cross_entropy(logits, targets, reduction="none"))
    assert "stablemax" in repr(loss)
    assert CrossEntropy(reduction="sum", ignore_index=2)(logits, targets).item() == pytest.approx(
        F.cross_entropy(logits, targets, reduction="sum", ignore_index=2).item()
    )


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="mode"):
        CrossEntropy(mode="sparsemax")
    loss = CrossEntropy()
    with pytest.raises(ValueError, match="mode"):
        loss.mode = "soft"
    with pytest.raises(ValueError, match="reduction"):
        StableMaxCrossEntropy(reduction="avg")
    with pytest.raises(TypeError, match="floating-point"):
        stablemax(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        stablemax_cross_entropy(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        stablemax_cross_entropy(torch.randn(2, 2), torch.tensor([0, 2]))
