import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynscope import HessianOperator, Objective, hvp
from dynscope.hvp import hvp_flat
from models import classification_data, kernel_case, mlp
from reference import exact_hessian, finite_difference_hessian


MODELS = ["mlp", "cnn-batchnorm", "transformer", "mlp-dropout"]


@pytest.fixture(scope="module")
def objectives():
    """Each test model with its exact Hessian (computed once per module)."""
    built = {name: Objective(model, F.cross_entropy, batch) for name, (model, batch) in
             ((name, kernel_case(name)) for name in MODELS)}
    return {name: (obj, exact_hessian(obj)) for name, obj in built.items()}


@pytest.mark.parametrize("method", ["auto", "forward", "reverse", "loop"])
@pytest.mark.parametrize("name", MODELS)
def test_hvp_equals_the_exact_hessian_times_v(objectives, name, method):
    obj, H = objectives[name]
    V = torch.randn(5, obj.layout.numel, generator=torch.Generator().manual_seed(1))
    out = hvp_flat(obj, V, method=method, chunk_size=2)
    assert torch.allclose(out, V @ H.T, atol=1e-5, rtol=1e-4)


def test_dict_vectors_and_a_single_vector():
    torch.manual_seed(0)
    net = mlp((3, 4, 2))
    obj = Objective(net, F.cross_entropy, classification_data(8, (3,), classes=2))
    H = exact_hessian(obj).float()
    V = {n: torch.randn(3, *p.shape) for n, p in net.named_parameters()}
    out = hvp(obj, V)
    flat = obj.layout.flatten(V, batch_dims=1)
    assert torch.allclose(obj.layout.flatten(out, batch_dims=1), flat @ H.T, atol=1e-5)
    single = {n: v[0] for n, v in V.items()}
    out1 = hvp(obj, single)
    assert out1["0.weight"].shape == net[0].weight.shape
    assert torch.allclose(obj.layout.flatten(out1, batch_dims=0), H @ flat[0], atol=1e-5)


def test_quadratic_closed_form():
    # L(x) = 1/2 x^T A x with a known A: the Hessian is A exactly.
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.tensor([0.3, -1.0, 2.0]))

        def forward(self, _inputs):
            return 0.5 * self.x @ A @ self.x

    obj = Objective(Quadratic(), lambda out, _t: out, (torch.zeros(1, 1), torch.zeros(1)))
    V = torch.randn(4, 3)
    for method in ("forward", "reverse", "loop"):
        assert torch.allclose(hvp_flat(obj, V, method=method), V @ A, atol=1e-6)


def test_forward_over_reverse_works_with_mse_loss_module():
    # Linear-Tanh-Linear with MSELoss raised "ZeroTensors are immutable" in torch 2.13 before the
    # forward kernel gave the targets a materialised zero tangent.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    obj = Objective(net, nn.MSELoss(), (torch.randn(16, 4), torch.randn(16, 2)))
    V = torch.randn(3, obj.layout.numel)
    H = exact_hessian(obj).float()
    assert torch.allclose(hvp_flat(obj, V, method="forward"), V @ H.T, atol=1e-5)
    assert torch.allclose(hvp_flat(obj, V), V @ H.T, atol=1e-5)  # auto


def test_operator_reuses_its_graph_and_counts_matvecs():
    torch.manual_seed(0)
    obj = Objective(mlp((3, 5, 2)), F.cross_entropy, classification_data(8, (3,), classes=2))
    op = HessianOperator(obj)
    H = exact_hessian(obj).float()
    for _ in range(3):
        v = torch.randn(1, op.size)
        assert torch.allclose(op.matmat(v), v @ H.T, atol=1e-5)
    assert op.num_matvecs == 3


def test_out_of_memory_halves_the_chunk(monkeypatch):
    from dynscope.hvp import _Kernel

    torch.manual_seed(0)
    obj = Objective(mlp((3, 5, 2)), F.cross_entropy, classification_data(8, (3,), classes=2))
    seen = []
    real = _Kernel.run

    def flaky(self, method, chunk):
        seen.append(chunk.shape[0])
        if chunk.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, method, chunk)

    monkeypatch.setattr(_Kernel, "run", flaky)
    V = torch.randn(8, obj.layout.numel)
    with pytest.warns(UserWarning, match="out of memory"):
        out = hvp_flat(obj, V, method="reverse", chunk_size=8)
    assert seen[:3] == [8, 4, 2]
    assert torch.allclose(out, V @ exact_hessian(obj).float().T, atol=1e-5)


def test_wrong_shapes_are_named():
    obj = Objective(nn.Linear(3, 2), F.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="shape"):
        hvp(obj, torch.randn(2, 7))
    with pytest.raises(ValueError, match="weight"):
        hvp(obj, {"weight": torch.randn(2, 3, 3), "bias": torch.randn(2, 2)})
    with pytest.raises(ValueError, match="missing"):
        hvp(obj, {"weight": torch.randn(2, 3)})


def test_reference_hessian_agrees_with_finite_differences_on_layernorm():
    # Guards the reference itself (torch.func.hessian is wrong for LayerNorm in torch 2.13).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Flatten(), nn.Linear(15, 2)).double()
    obj = Objective(net, F.cross_entropy, (torch.randn(4, 5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0])))
    H = exact_hessian(obj)
    assert torch.allclose(H, H.T, atol=1e-12)
    assert torch.allclose(H, finite_difference_hessian(obj), atol=1e-7)


def test_auto_kernel_is_chosen_from_the_structure_and_gives_the_same_numbers_every_run():
    from dynscope.hvp import choose_method

    def fresh(sizes, batch):
        torch.manual_seed(0)
        return Objective(mlp(sizes), F.cross_entropy, classification_data(batch, (sizes[0],), classes=sizes[-1]))

    V = torch.randn(6, fresh((4, 6, 3), 12).layout.numel, generator=torch.Generator().manual_seed(2))
    runs = []
    for _ in range(3):
        obj = fresh((4, 6, 3), 12)
        runs.append(hvp_flat(obj, V))
        assert obj._hvp_method == choose_method(obj) == "reverse"  # a tiny model on CPU: batched
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    big = fresh((64, 256, 256, 10), 16)  # 85k parameters, even on a 16-sample slice: the per-probe loop on CPU
    assert choose_method(big) == "loop"


def test_a_batched_kernel_that_fails_falls_back_to_the_loop(monkeypatch):
    from dynscope.hvp import _Kernel

    torch.manual_seed(0)
    obj = Objective(mlp((3, 5, 2)), F.cross_entropy, classification_data(8, (3,), classes=2))
    real = _Kernel.run

    def no_batching_rule(self, method, chunk):
        if method == "reverse":
            raise RuntimeError("Batching rule not implemented for aten::something")
        return real(self, method, chunk)

    monkeypatch.setattr(_Kernel, "run", no_batching_rule)
    V = torch.randn(4, obj.layout.numel)
    with pytest.warns(UserWarning, match="using 'loop'"):
        out = hvp_flat(obj, V)
    assert obj._hvp_method == "loop"
    assert torch.allclose(out, V @ exact_hessian(obj).float().T, atol=1e-5)


@pytest.mark.parametrize("method", ["forward", "reverse", "loop"])
@pytest.mark.parametrize("how", ["loss_fn", "sample_loss_fn"])
def test_mse_loss_with_every_kernel_matches_torch_func_hessian(method, how):
    # F.mse_loss's forward-mode derivative of its backward fails on a target without a tangent
    # ("ZeroTensors are immutable") unless the kernel gives the batch a materialised zero tangent.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    if how == "loss_fn":
        obj = Objective(net, F.mse_loss, (x, y))
    else:
        obj = Objective(net, sample_loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1], reduction="none").mean(1),
                        batch=(x, y))
    params = {n: p.detach() for n, p in net.named_parameters()}
    H = torch.func.hessian(lambda p: F.mse_loss(torch.func.functional_call(net, p, (x,)), y))(params)
    dense = torch.cat([torch.cat([H[a][b].reshape(params[a].numel(), params[b].numel()) for b in params], 1)
                       for a in params])
    V = torch.randn(3, obj.layout.numel, generator=torch.Generator().manual_seed(1))
    out = HessianOperator(obj, method=method).matmat(V)
    assert torch.allclose(out, V @ dense.T, atol=1e-5, rtol=1e-4)
