"""The exact trace of piecewise-linear networks (tr(H) = tr(GGN)) against the dense float64 Hessian, and
the certificate that decides where it applies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynscope import Objective, hessian_trace, measure_curvature
from dynscope.gauss_newton import MAX_OUTPUTS, NotExact, exact_trace, exact_trace_reason, gauss_newton_trace
from dynscope.piecewise import piecewise_linear_reason
from models import SmallCNN, mlp
from reference import exact_hessian


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = h + F.relu(self.b(h))
        return self.head(h.view(h.size(0), -1))


class SharedInParallel(nn.Module):  # one layer on two inputs, summed: still linear in each weight
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(x) + self.fc(2 * x)))


class Aliased(nn.Module):  # the same layer twice in a row: quadratic in its weight
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.again = self.body
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.relu(self.again(F.relu(self.body(x)))))


class Squared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h * h


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class OpaqueCube(Cube):  # computed where no torch function mode can see it
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.from_numpy(x.detach().numpy() ** 3)


class CustomOp(nn.Module):
    def __init__(self, function=Cube):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.function = function

    def forward(self, x):
        return self.head(self.function.apply(self.fc(x)))


def bn_cnn():
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4, 3),
    )
    bn = net[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return net


def conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(6, 3))


class TransposedWeight(nn.Module):  # x @ W.T + b, a one-parameter scale
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.head(F.leaky_relu(x @ self.w.T + self.b, 0.1) * self.scale)


def embedding_net():
    return nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def upsampling_net(mode):
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode=mode),
                         nn.Conv2d(2, 1, 3), nn.Flatten(), nn.Linear(36, 3))


class InPlaceResidual(nn.Module):  # torchvision's BasicBlock pattern: out += identity; relu(inplace=True)
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        identity = out = self.a(x)
        out = self.b(F.relu(out))
        out += identity
        return self.head(F.relu(out, inplace=True))


class Squeezed(nn.Module):  # a regression head squeezed: [B] outputs, a scalar for one sample
    def __init__(self):
        super().__init__()
        self.net = mlp((4, 6, 1))

    def forward(self, x):
        return self.net(x).squeeze()


def hard(n, classes=3):
    return torch.randint(0, classes, (n,))


def soft(n, classes=3):
    return torch.softmax(torch.randn(n, classes, dtype=torch.float64), 1)


CASES = {  # name: (model, input shape, loss, targets)
    "mlp, cross-entropy": (lambda: mlp((4, 6, 5, 3)), (4,), F.cross_entropy, hard),
    "mlp, mean squared error": (lambda: mlp((4, 6, 3)), (4,), F.mse_loss, lambda n: torch.randn(n, 3, dtype=torch.float64)),
    "mlp, CrossEntropyLoss with label smoothing": (lambda: mlp((4, 6, 3)), (4,), nn.CrossEntropyLoss(label_smoothing=0.1), hard),
    "mlp, soft targets": (lambda: mlp((4, 6, 3)), (4,), F.cross_entropy, soft),
    "residual sum, view": (Residual, (4,), F.cross_entropy, hard),
    "one layer on two inputs": (SharedInParallel, (4,), F.cross_entropy, hard),
    "conv + eval BatchNorm + pooling + dropout": (bn_cnn, (2, 4, 4), F.cross_entropy, hard),
    "conv1d": (conv1d_net, (2, 4), nn.CrossEntropyLoss(), hard),
    "SmallCNN": (SmallCNN, (1, 8, 8), F.cross_entropy, hard),
    "in-place ReLU after each layer": (lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5),
                                                             nn.ReLU(inplace=True), nn.Linear(5, 3)), (4,), F.cross_entropy, hard),
    "in-place residual sum": (InPlaceResidual, (4,), F.cross_entropy, hard),
    "squeezed regression output": (Squeezed, (4,), F.mse_loss, lambda n: torch.randn(n, dtype=torch.float64)),
    "W.T, a scalar scale": (TransposedWeight, (4,), F.cross_entropy, hard),
    "upsampling, nearest": (lambda: upsampling_net("nearest"), (2, 4, 4), F.cross_entropy, hard),
    "upsampling, bilinear": (lambda: upsampling_net("bilinear"), (2, 4, 4), F.cross_entropy, hard),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_gauss_newton_trace_is_the_hessian_trace_of_a_piecewise_linear_network(name):
    build, shape, loss, targets = CASES[name]
    torch.manual_seed(0)
    net = build().double()
    batch = (torch.randn(7, *shape, dtype=torch.float64), targets(7))
    objective = Objective(net, loss, batch)
    assert piecewise_linear_reason(objective) is None
    H = exact_hessian(objective)
    result = gauss_newton_trace(objective)
    assert result.value == pytest.approx(float(H.diagonal().sum()), rel=1e-10)
    for layer, block in objective.layout.slices().items():
        assert result.per_layer[layer] == pytest.approx(float(H.diagonal()[block].sum()), rel=1e-9, abs=1e-12)
    assert result.stderr == 0.0 and result.method == "exact" and result.num_matvecs == 0
    chunked = gauss_newton_trace(objective, memory_cap=1)  # the vmap path one sample at a time
    assert chunked.value == pytest.approx(result.value, rel=1e-12)


def test_the_gauss_newton_trace_of_a_curved_network_is_not_its_hessian_trace():
    # what the certificate guards against: with tanh the second-order term's diagonal does not vanish
    torch.manual_seed(0)
    net = mlp((4, 6, 3), act=nn.Tanh).double()
    objective = Objective(net, F.cross_entropy, (torch.randn(7, 4, dtype=torch.float64), hard(7)))
    assert "tanh" in exact_trace_reason(objective)
    with pytest.raises(NotExact, match="tanh"):
        gauss_newton_trace(objective)
    ggn = gauss_newton_trace(objective, check=False).value
    assert abs(ggn - float(exact_hessian(objective).diagonal().sum())) > 1e-3 * abs(ggn)


REFUSED = {  # name: (objective builder, words of the reason)
    "tanh": (lambda: Objective(mlp((4, 6, 3), act=nn.Tanh), F.cross_entropy, (torch.randn(4, 4), hard(4))), "tanh"),
    "GELU": (lambda: Objective(mlp((4, 6, 3), act=nn.GELU), F.cross_entropy, (torch.randn(4, 4), hard(4))), "gelu"),
    "LayerNorm": (lambda: Objective(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)), F.cross_entropy,
                                    (torch.randn(4, 4), hard(4))), "layer_norm"),
    "aliased module": (lambda: Objective(Aliased(), F.cross_entropy, (torch.randn(4, 4), hard(4))), "same parameter"),
    "squared output": (lambda: Objective(Squared(), F.mse_loss, (torch.randn(4, 4), torch.randn(4, 3))), "same parameter"),
    "custom autograd function": (lambda: Objective(CustomOp(), F.cross_entropy, (torch.randn(4, 4), hard(4))), "pow"),
    "opaque custom autograd function": (lambda: Objective(CustomOp(OpaqueCube), F.cross_entropy, (torch.randn(4, 4), hard(4))),
                                        "cannot follow"),
    "BatchNorm on batch statistics": (lambda: Objective(bn_cnn(), F.cross_entropy, (torch.randn(4, 2, 4, 4), hard(4)),
                                                        mode="train"), "batch statistics"),
    "dropout in train mode": (lambda: Objective(mlp((4, 6, 3), dropout=0.2), F.cross_entropy, (torch.randn(4, 4), hard(4)),
                                                mode="train"), "random mask"),
    "weight norm": (lambda: Objective(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)), nn.ReLU(),
                                                    nn.Linear(6, 3)), F.cross_entropy, (torch.randn(4, 4), hard(4))), "weight_norm"),
    "class weights": (lambda: Objective(mlp((4, 6, 3)), nn.CrossEntropyLoss(weight=torch.ones(3)), (torch.randn(4, 4), hard(4))),
                      "class weights"),
    "ignored targets": (lambda: Objective(mlp((4, 6, 3)), F.cross_entropy, (torch.randn(4, 4), torch.tensor([0, 1, -100, 2]))),
                        "ignored"),
    "another loss": (lambda: Objective(mlp((4, 6, 3)), F.nll_loss, (torch.randn(4, 4), hard(4))), "neither"),
    "sample_loss_fn": (lambda: Objective(mlp((4, 6, 3)), sample_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"),
                                         batch=(torch.randn(4, 4), hard(4))), "sample_loss_fn"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_the_exact_trace_is_refused_with_a_reason_where_it_would_be_wrong(name):
    build, words = REFUSED[name]
    torch.manual_seed(0)
    objective = build()
    reason = exact_trace_reason(objective)
    assert reason is not None and words in reason
    with pytest.raises(NotExact):
        hessian_trace(objective, method="exact")
    fallback = hessian_trace(objective, num_matvecs=4, method="auto", seed=0)
    assert fallback.method == "hutchinson" and fallback.num_matvecs == 4


def test_too_many_outputs_per_sample_are_refused():
    objective = Objective(mlp((4, 6, MAX_OUTPUTS + 1)), F.cross_entropy, (torch.randn(3, 4), hard(3, MAX_OUTPUTS + 1)))
    with pytest.raises(NotExact, match="outputs per sample"):
        gauss_newton_trace(objective)
    result, reason = exact_trace(objective)  # found only from the outputs: a refusal, not a failure
    assert result is None and "outputs per sample" in reason
    assert measure_curvature(objective, num_matvecs=2, eigen=False, sharpness=False).trace.method == "hutchinson"


def test_the_exact_trace_leaves_the_model_untouched():
    torch.manual_seed(0)
    net = bn_cnn()
    net.train()
    before = {n: t.clone() for n, t in net.state_dict().items()}
    objective = Objective(net, F.cross_entropy, (torch.randn(5, 2, 4, 4), hard(5)))
    gauss_newton_trace(objective)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[n], t) for n, t in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())


def test_data_parallel_ranks_agree_on_the_path():
    torch.manual_seed(0)
    objective = Objective(mlp((4, 6, 3)).double(), F.cross_entropy, (torch.randn(6, 4, dtype=torch.float64), hard(6)))
    alone, _ = exact_trace(objective)
    same, reason = exact_trace(objective, reduce=lambda t: t)  # one rank's view of a mean over identical ranks
    assert reason is None and same.value == pytest.approx(alone.value, rel=1e-12)
    refused = torch.zeros_like(torch.tensor([1.0, *alone.per_layer.values()], dtype=torch.float64))
    result, reason = exact_trace(objective, reduce=lambda t: (t + refused) / 2)  # the other rank cannot
    assert result is None and "every data-parallel rank" in reason


def test_measure_curvature_takes_the_exact_trace_and_keeps_estimating_elsewhere():
    torch.manual_seed(0)
    relu = Objective(mlp((4, 6, 3)).double(), F.cross_entropy, (torch.randn(8, 4, dtype=torch.float64), hard(8)))
    exact = float(exact_hessian(relu).diagonal().sum())
    result = measure_curvature(relu, num_matvecs=4, sharpness=False)
    assert result.trace.method == "exact" and result.value == pytest.approx(exact, rel=1e-10)
    estimated = measure_curvature(relu, num_matvecs=4, sharpness=False, exact_trace=False)
    assert estimated.trace.method == "hutchinson" and estimated.trace.num_matvecs == 4


def test_the_certificate_is_asked_again_when_a_layer_is_swapped():
    net = mlp((4, 6, 3))
    batch = (torch.randn(4, 4), hard(4))
    assert piecewise_linear_reason(Objective(net, F.cross_entropy, batch)) is None
    net[1] = nn.GELU()
    assert "gelu" in piecewise_linear_reason(Objective(net, F.cross_entropy, batch))


class SharedFailures:
    """A stand-in for the callbacks' RankReduce on one rank: ``fail`` joins the collective flagged and raises."""

    def __init__(self):
        self.failed_with = None

    def __call__(self, t):
        return t

    def fail(self, like, error):
        self.failed_with = (tuple(like.shape), error)
        raise error


def test_a_rank_whose_exact_trace_fails_still_joins_the_reduction(monkeypatch):
    import dynscope.gauss_newton as gn

    torch.manual_seed(0)
    objective = Objective(mlp((4, 6, 3)), F.cross_entropy, (torch.randn(6, 4), hard(6)))

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(gn, "gauss_newton_trace", broken)
    reduce = SharedFailures()
    with pytest.raises(RuntimeError, match="injected"):
        exact_trace(objective, reduce=reduce)
    # the flag and one value per parameter tensor, as the ranks that succeeded send
    assert reduce.failed_with[0] == (1 + len(objective.params),)


# -- adversarial models: wherever the exact trace is given, it is the dense Hessian's trace -------------

class TwoLayers(nn.Module):
    def __init__(self, forward, k=3):
        super().__init__()
        self.a, self.head = nn.Linear(4, 5), nn.Linear(5, k)
        self.body = forward

    def forward(self, x):
        return self.body(self, x)


def _view_of_a_buffer_written_later(net, x):  # v aliases buf; buf += h makes v depend on a: v * h is quadratic
    h = F.relu(net.a(x))
    buf = torch.zeros_like(h)
    v = buf[:, :5]
    buf += h
    return net.head(v * h)


def _centred_over_the_batch(net, x):  # samples mix: the per-sample Jacobians are not the batch's
    h = net.a(x)
    return net.head(F.relu(h - h.mean(0, keepdim=True)))


def _flipped_over_the_batch(net, x):
    h = F.relu(net.a(x))
    return net.head(h + h.flip(0))


def _weight_read_by_another_call(net, x):  # a's weight is used outside a's own call: the hooks see one use
    return net.head(F.relu(net.a(x)) + F.relu(F.linear(2 * x, net.a.weight)))


def _data_dependent_branch(net, x):  # vmap cannot take per-sample Jacobians through the branch
    h = net.a(x[:, None]).squeeze(1)  # on a 3-d input: the vmap path
    if h.sum() > 0:
        h = F.relu(h)
    return net.head(h)


def _written_into_a_buffer(net, x):  # vmap cannot write a per-sample value into a buffer made inside
    h = F.relu(net.a(x[:, None]).squeeze(1))  # on a 3-d input: the vmap path
    out = torch.zeros(x.shape[0], 5, dtype=x.dtype)
    out[:, :2] = h[:, :2]
    out[:, 2:] = h[:, 2:]
    return net.head(out)


class Surrogate(torch.autograd.Function):  # relu forward, a smooth surrogate derivative (spiking nets, STE)
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.relu()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(4 * x)


def _surrogate_gradient(net, x):
    return net.head(Surrogate.apply(net.a(x)))


class ViewedBuffer(nn.Module):  # a view of a buffer made before the forward; the forward writes a's bias into it
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.register_buffer("state", torch.zeros(5))
        self.view = self.state[:]

    def forward(self, x):
        self.state.zero_()
        self.state += self.a.bias  # the view follows: h * view is quadratic in a.bias
        return self.head(F.relu(self.a(x)) * self.view)


def _branch_on_a_weight(net, x):
    h = net.a(x)
    if net.a.bias.sum():  # a weight-dependent value decides the branch
        h = F.relu(h)
    return net.head(h)


def _rows_permuted_around_a_layer(net, x):  # per sample overall, but a's row n belongs to sample B-1-n
    return net.head(F.relu(net.a(x.flip(0))).flip(0))


class PositionsAsRows(nn.Module):  # a Linear on [B * T, d]: its rows are positions, not samples
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 5), nn.Linear(10, 3)

    def forward(self, x):
        return self.head(F.relu(self.a(x.reshape(-1, 4))).reshape(x.shape[0], -1))


class PerPosition(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(x))


def _hooked(net):  # a forward hook that replaces the first layer's output
    net[0].register_forward_hook(lambda module, inputs, output: 2 * output + 1)
    return net


def _x(n=6, *shape):
    return torch.randn(n, *(shape or (4,)), dtype=torch.float64)


def _obj(model, loss, batch, **kwargs):
    return Objective(model.double(), loss, batch, **kwargs)


ADVERSARIAL = {  # name: objective builder (float64)
    "in-place write into a tensor with a live view": lambda: _obj(TwoLayers(_view_of_a_buffer_written_later), F.cross_entropy, (_x(), hard(6))),
    "centred over the batch": lambda: _obj(TwoLayers(_centred_over_the_batch), F.cross_entropy, (_x(), hard(6))),
    "flipped over the batch": lambda: _obj(TwoLayers(_flipped_over_the_batch), F.mse_loss, (_x(), torch.randn(6, 3, dtype=torch.float64))),
    "a layer's weight read by another call": lambda: _obj(TwoLayers(_weight_read_by_another_call), F.cross_entropy, (_x(), hard(6))),
    "written into a buffer": lambda: _obj(TwoLayers(_written_into_a_buffer), F.cross_entropy, (_x(), hard(6))),
    "surrogate gradient (custom autograd.Function)": lambda: _obj(TwoLayers(_surrogate_gradient), F.cross_entropy, (_x(), hard(6))),
    "in-place write into a buffer viewed before the forward": lambda: _obj(ViewedBuffer(), F.cross_entropy, (_x(), hard(6))),
    "a forward hook replacing a layer's output": lambda: _obj(_hooked(mlp((4, 5, 3))), F.cross_entropy, (_x(), hard(6))),
    "rows permuted around a layer": lambda: _obj(TwoLayers(_rows_permuted_around_a_layer), F.cross_entropy, (_x(), hard(6))),
    "positions as rows": lambda: _obj(PositionsAsRows(), F.cross_entropy, (_x(6, 2, 4), hard(6))),
    "positions as rows, one sample": lambda: _obj(PositionsAsRows(), F.cross_entropy, (_x(1, 2, 4), hard(1))),
    "branch on a weight": lambda: _obj(TwoLayers(_branch_on_a_weight), F.cross_entropy, (_x(), hard(6))),
    "data-dependent branch": lambda: _obj(TwoLayers(_data_dependent_branch), F.cross_entropy, (_x(), hard(6))),
    "soft targets over positions": lambda: _obj(PerPosition(), F.cross_entropy,
                                                     (_x(6, 2, 5), torch.softmax(torch.randn(6, 3, 5, dtype=torch.float64), 1))),
    "unnormalised soft targets": lambda: _obj(mlp((4, 5, 3)), F.cross_entropy, (_x(), 2 * torch.rand(6, 3, dtype=torch.float64))),
    "unnormalised soft targets, label smoothing": lambda: _obj(mlp((4, 5, 3)), nn.CrossEntropyLoss(label_smoothing=0.2),
                                                                    (_x(), 2 * torch.rand(6, 3, dtype=torch.float64))),
    "more outputs than MAX_OUTPUTS": lambda: _obj(mlp((4, 5, MAX_OUTPUTS + 1)), F.cross_entropy, (_x(3), hard(3, MAX_OUTPUTS + 1))),
    "mean squared error with broadcast targets": lambda: _obj(mlp((4, 5, 3)), F.mse_loss, (_x(), torch.randn(3, dtype=torch.float64))),
    "measured parameters restricted": lambda: _obj(mlp((4, 5, 3)), F.cross_entropy, (_x(), hard(6)), param_names=["2.weight", "2.bias"]),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_the_exact_trace_is_the_hessian_trace_or_falls_back(name):
    torch.manual_seed(0)
    objective = ADVERSARIAL[name]()
    result, reason = exact_trace(objective)  # never raises: a refusal is a reason
    auto = hessian_trace(objective, num_matvecs=4, method="auto", seed=0)
    if result is None:
        assert reason and auto.method == "hutchinson"
        return
    H = exact_hessian(objective)
    assert result.value == pytest.approx(float(H.diagonal().sum()), rel=1e-10)
    assert auto.method == "exact" and auto.value == pytest.approx(result.value, rel=1e-12)


@pytest.mark.parametrize("name", ["unnormalised soft targets", "unnormalised soft targets, label smoothing",
                                  "measured parameters restricted"])
def test_the_exact_trace_applies_to(name):
    torch.manual_seed(0)
    objective = ADVERSARIAL[name]()
    assert exact_trace_reason(objective) is None


def test_measure_curvature_falls_back_where_the_exact_trace_fails_late():
    torch.manual_seed(0)
    objective = ADVERSARIAL["written into a buffer"]()
    assert exact_trace_reason(objective) is None  # certified: only vmap finds out
    result = measure_curvature(objective, num_matvecs=4, sharpness=False, eigen=False)
    assert result.trace.method == "hutchinson"


def test_data_parallel_ranks_fall_back_together_where_the_exact_trace_fails_late():
    torch.manual_seed(0)
    objective = ADVERSARIAL["written into a buffer"]()
    result, reason = exact_trace(objective, reduce=lambda t: t)
    assert result is None and reason


class Switchable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.act = F.relu  # a plain attribute: no module type changes when it does

    def forward(self, x):
        return self.head(self.act(self.a(x)))


def test_the_measured_forward_is_certified_itself_not_only_the_cached_answer():
    torch.manual_seed(0)
    net = Switchable().double()
    batch = (_x(), hard(6))
    assert exact_trace(Objective(net, F.cross_entropy, batch))[0] is not None
    net.act = torch.tanh  # the cached certificate is stale now
    objective = Objective(net, F.cross_entropy, batch)
    result, reason = exact_trace(objective)
    assert result is None and "tanh" in reason
    with pytest.raises(NotExact, match="tanh"):
        gauss_newton_trace(objective)
    assert hessian_trace(objective, num_matvecs=4, method="auto", seed=0).method == "hutchinson"


@pytest.mark.parametrize("name, words", [
    ("in-place write into a tensor with a live view", "views"),
    ("in-place write into a buffer viewed before the forward", "views"),
    ("surrogate gradient (custom autograd.Function)", "custom autograd.Function"),
    ("centred over the batch", "other samples"),
    ("branch on a weight", "control flow"),
])
def test_the_certificate_refuses(name, words):  # where a later step (vmap) would not hide a false certificate
    torch.manual_seed(0)
    assert words in piecewise_linear_reason(ADVERSARIAL[name]())


def test_plain_linear_layers_take_the_hooked_path_under_the_certificate_too():
    from dynscope.gauss_newton import _hooked_grams, _output_hessian

    torch.manual_seed(0)
    objective = ADVERSARIAL["a forward hook replacing a layer's output"]()
    _, done, rest = _hooked_grams(objective, lambda z: _output_hessian(objective, z), certify=True)
    assert rest == []  # the certificate's own reads of .requires_grad are not uses of the weights
    H = exact_hessian(objective).diagonal()
    for layer, block in objective.layout.slices().items():
        assert done[layer] == pytest.approx(float(H[block].sum()), rel=1e-10)
    single = Objective(mlp((4, 16, 16, 10)), F.cross_entropy, (torch.randn(64, 4), hard(64, 10)))  # float32 rounding
    assert _hooked_grams(single, lambda z: _output_hessian(single, z), certify=True)[2] == []


def test_a_global_forward_hook_replacing_outputs():
    torch.manual_seed(0)
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: 2 * output if isinstance(module, nn.Linear) else None)
    try:
        objective = _obj(mlp((4, 5, 3)), F.cross_entropy, (_x(), hard(6)))
        assert gauss_newton_trace(objective).value == pytest.approx(float(exact_hessian(objective).diagonal().sum()), rel=1e-10)
    finally:
        handle.remove()


def test_an_embedding_lookup_is_linear_in_its_table():
    torch.manual_seed(0)
    objective = Objective(embedding_net().double(), F.cross_entropy, (torch.randint(0, 7, (6, 2)), hard(6)))
    assert piecewise_linear_reason(objective) is None
    assert gauss_newton_trace(objective).value == pytest.approx(float(exact_hessian(objective).diagonal().sum()), rel=1e-10)
    renormalised = nn.Sequential(nn.Embedding(7, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 3))
    assert "max_norm" in piecewise_linear_reason(Objective(renormalised, F.cross_entropy, (torch.randint(0, 7, (6, 2)), hard(6))))
