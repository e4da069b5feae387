"""OrthoGrad: the step is orthogonal to each weight tensor and keeps the gradient norm."""

import copy

import pytest
import torch
from torch import nn

from dynscope.optim import OrthoGrad


def _model_with_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return model


def _dot(a, b):
    return float((a.double() * b.double()).sum())


def test_sgd_step_is_orthogonal_per_tensor_and_norm_preserving_across_param_groups():
    model = _model_with_grads()
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr": 0.5}, {"params": params[2:], "lr": 0.1}]
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    OrthoGrad(torch.optim.SGD(groups)).step()
    for p, old, g in zip(params, before, grads):
        update = p.detach() - old
        assert abs(_dot(update, old)) < 1e-6 * update.norm() * old.norm()
        assert update.norm().item() == pytest.approx(lr_of[id(p)] * g.norm().item(), rel=1e-6)
        assert _dot(update, -g) > 0  # still a descent direction for this g


def test_matches_the_formula_with_adam():
    model, reference = _model_with_grads(), _model_with_grads()
    wrapped = OrthoGrad(torch.optim.Adam(model.parameters(), lr=0.01))
    plain = torch.optim.Adam(reference.parameters(), lr=0.01)
    for p in reference.parameters():  # g_perp = g - (w.g / w.w) w, rescaled to |g|
        w, g = p.detach(), p.grad
        perp = g - (w * g).sum() / (w * w).sum() * w
        p.grad = perp * g.norm() / perp.norm()
    wrapped.step()
    plain.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_exempt_groups_zero_weights_and_parallel_gradients():
    a, b, c = (nn.Parameter(t) for t in (torch.tensor([1.0, 2.0]), torch.zeros(2), torch.tensor([3.0, 4.0])))
    opt = OrthoGrad(torch.optim.SGD([{"params": [a], "orthograd": False}, {"params": [b, c]}], lr=1.0))
    a.grad, b.grad, c.grad = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0]), torch.tensor([6.0, 8.0])
    opt.step()
    assert torch.equal(a.detach(), torch.tensor([0.0, 1.0]))  # exempt: plain SGD
    assert torch.equal(b.detach(), torch.tensor([-1.0, 1.0]))  # zero weights: gradient kept
    assert torch.equal(c.detach(), torch.tensor([3.0, 4.0]))  # only scaling left: no step


def test_closure_zero_grad_param_groups_and_state_dict_round_trip():
    model = _model_with_grads()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    inner = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    opt = OrthoGrad(inner)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    bare = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1)
    bare.load_state_dict(state)  # the wrapper's checkpoint loads into the bare optimizer
    rewrapped = OrthoGrad(torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1))
    rewrapped.load_state_dict(bare.state_dict())
    assert rewrapped.state_dict()["state"][0]["step"] == 1
    opt.step(closure)

    def twin_closure():
        rewrapped.zero_grad()
        loss = twin(x).square().mean()
        loss.backward()
        return loss

    rewrapped.step(twin_closure)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)

    extra = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["params"][0] is extra


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        OrthoGrad(nn.Linear(2, 2))
    opt = OrthoGrad(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already wrapped"):
        OrthoGrad(opt)
