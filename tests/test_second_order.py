"""The cheap-second-derivative rules equal torch's values, gradients and Hessians (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynscope import Objective
from dynscope.hvp import hvp_flat
from dynscope.second_order import cheap_second_order, gelu_derivatives
from reference import exact_hessian, finite_difference_hessian


class Attention(nn.Module):
    """Single-head attention through ``F.scaled_dot_product_attention`` (optionally causal)."""

    def __init__(self, dim: int, causal: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.causal = causal

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, need_weights: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.need_weights = need_weights

    def forward(self, x):
        out, weights = self.attn(x, x, x, need_weights=self.need_weights)
        return out + weights.sum() if self.need_weights else out


class Softmax(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x * torch.softmax(x, self.dim) + x.softmax(self.dim) ** 2


class ChannelBatchNorm(nn.Module):
    """BatchNorm1d over the features of ``[batch, sequence, features]`` (as ``[batch, features, sequence]``)."""

    def __init__(self, features: int, affine: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(features, affine=affine)
        with torch.no_grad():  # running statistics away from 0 and 1
            self.bn.running_mean.uniform_(-1.0, 1.0)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def head(*layers, inputs=3):
    return nn.Sequential(nn.Linear(inputs, 4), *layers, nn.Flatten(), nn.LazyLinear(2))


CASES = {
    "gelu": lambda: head(nn.GELU()),
    "gelu-tanh": lambda: head(nn.GELU(approximate="tanh")),
    "layernorm": lambda: head(nn.LayerNorm(4)),
    "layernorm-2d": lambda: head(nn.Unflatten(-1, (2, 2)), nn.LayerNorm((2, 2))),
    "layernorm-no-affine": lambda: head(nn.LayerNorm(4, elementwise_affine=False)),
    "layernorm-no-bias": lambda: head(nn.LayerNorm(4, bias=False)),
    "softmax-last": lambda: head(Softmax(-1)),
    "softmax-sequence": lambda: head(Softmax(1)),
    "sdpa": lambda: head(Attention(4, causal=False)),
    "sdpa-causal": lambda: head(Attention(4, causal=True)),
    "multihead": lambda: head(SelfAttention(4, 2, need_weights=False)),
    "multihead-weights": lambda: head(SelfAttention(4, 2, need_weights=True)),
    "batchnorm-eval": lambda: head(ChannelBatchNorm(4), nn.ReLU()),
    "batchnorm-eval-no-affine": lambda: head(ChannelBatchNorm(4, affine=False), nn.Tanh()),
    "encoder-layer": lambda: head(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, activation="gelu",
                                                             batch_first=True, norm_first=True)),
}


def objective(name):
    torch.manual_seed(0)
    net = CASES[name]()
    x = torch.randn(3, 5, 3)  # [batch, sequence, features]
    net(x)  # materialise the lazy head
    obj = Objective(net.double(), F.cross_entropy, (x.double(), torch.tensor([0, 1, 1])))
    with torch.no_grad():  # move LayerNorm's affine parameters off their trivial initial values
        for module in net.modules():
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.3)
    return obj


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_equal_torch(name):
    obj = objective(name)
    params = {n: p.detach().requires_grad_(True) for n, p in obj.params.items()}
    with obj.measuring():
        plain = obj.loss(params)
        plain_grads = torch.autograd.grad(plain, list(params.values()))
        with cheap_second_order():
            cheap = obj.loss(params)
            cheap_grads = torch.autograd.grad(cheap, list(params.values()))
    assert cheap.item() == pytest.approx(plain.item(), rel=1e-12)
    for a, b in zip(cheap_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", ["reverse", "loop"])
@pytest.mark.parametrize("name", list(CASES))
def test_hessian_vector_products_equal_the_exact_hessian(name, method):
    # The retained-graph kernels build their graph inside cheap_second_order; the reference
    # Hessian is plain double backward through torch's own rules (checked against finite
    # differences below).
    obj = objective(name)
    V = torch.randn(3, obj.layout.numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(hvp_flat(obj, V, method=method), V @ exact_hessian(obj).T, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["layernorm", "multihead", "encoder-layer"])
def test_reference_agrees_with_finite_differences(name):
    obj = objective(name)
    assert torch.allclose(exact_hessian(obj), finite_difference_hessian(obj), atol=1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_derivatives_are_torchs(approximate):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    y, d1, d2 = gelu_derivatives(x.detach(), approximate)
    (g,) = torch.autograd.grad(F.gelu(x, approximate=approximate).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.allclose(y, F.gelu(x, approximate=approximate).detach(), atol=1e-14)
    assert torch.allclose(d1, g.detach(), atol=1e-12)
    assert torch.allclose(d2, h, atol=1e-12)


def test_cases_it_does_not_cover_use_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 5, dtype=torch.float64).unbind()
    mask = torch.rand(4, 4) > 0.3
    half = torch.randn(4, 6).bfloat16()
    with cheap_second_order():
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        mha = nn.MultiheadAttention(5, 1, batch_first=True).double()
        padded = mha(q[:, :3], q[:, :3], q[:, :3], key_padding_mask=torch.tensor([[False, False, True]] * 2))[0]
        low = (F.gelu(half), F.layer_norm(half, (6,)), torch.softmax(half, -1, dtype=torch.float32))
    assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(padded, mha(q[:, :3], q[:, :3], q[:, :3], key_padding_mask=torch.tensor([[False, False, True]] * 2))[0])
    assert torch.equal(low[0], F.gelu(half))
    assert torch.equal(low[1], F.layer_norm(half, (6,)))
    assert torch.equal(low[2], torch.softmax(half, -1, dtype=torch.float32))


def test_torchs_keyword_arguments_are_accepted():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    calls = [
        lambda: F.gelu(input=x, approximate="tanh"),
        lambda: torch.softmax(input=x, dim=0),
        lambda: F.softmax(input=x, dim=0),
        lambda: F.layer_norm(input=x, normalized_shape=(4,)),
    ]
    for call in calls:
        with cheap_second_order():
            y = call()
            (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        expected = call()
        (g_expected,) = torch.autograd.grad(expected.square().sum(), x, create_graph=True)
        assert torch.allclose(y, expected, atol=1e-14) and torch.allclose(g, g_expected, atol=1e-12)


def test_a_rule_that_fails_falls_back_to_torch(monkeypatch):
    import dynscope.second_order as rules

    def broken(*args, **kwargs):
        raise RuntimeError("no rule for this call")

    monkeypatch.setitem(rules._RULES, F.gelu, broken)
    obj = objective("gelu")
    V = torch.randn(2, obj.layout.numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.warns(UserWarning, match="second-order rules failed"):
        out = hvp_flat(obj, V, method="loop")
    assert torch.allclose(out, V @ exact_hessian(obj).T, atol=1e-10, rtol=1e-8)


def test_a_normalized_shape_that_does_not_fit_gets_torchs_error():
    x = torch.randn(3, 4, requires_grad=True)
    with cheap_second_order(), pytest.raises(RuntimeError, match="normalized_shape"):
        F.layer_norm(x, (4, 1))
