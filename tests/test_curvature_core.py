"""The core curvature measurement (dynscope.curvature.measure_curvature) against dense Hessians.

References are torch.func.hessian of the loss written out with functional_call (not through
dynscope's Objective), its eigvalsh, and the closed forms of the stability thresholds.
"""

import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dynscope import MatrixOperator, Objective
from dynscope.curvature import (METRICS, CurvatureResult, density_histogram, measure_curvature, optimizer_hparams,
                                with_batch_statistics)
from dynscope.metrics import CURVATURE


def _model(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.Tanh(), nn.Linear(4, 2)]
    return nn.Sequential(*layers).double()


def _batch(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model, v):
    out, i = OrderedDict(), 0
    for n, p in model.named_parameters():
        out[n] = v[i:i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _loss(model, batch):
    return lambda v: F.cross_entropy(functional_call(model, _unflat(model, v), (batch[0],)), batch[1])


def _hessian(model, batch, v=None):
    return torch.func.hessian(_loss(model, batch))(_flat(model) if v is None else v)


def _blocks(model):
    out, i = OrderedDict(), 0
    for n, p in model.named_parameters():
        out[n] = slice(i, i + p.numel())
        i += p.numel()
    return out


EXACT = dict(num_matvecs=60, method="xtrace", eigen_tol=1e-10, eigen_max_iter=200)  # xtrace: exact for rank < 30


def test_trace_eigenvalues_and_per_layer_values_are_those_of_the_dense_hessian():
    model, batch = _model().eval(), _batch()
    H = _hessian(model, batch)
    ev = torch.linalg.eigvalsh(H)
    res = measure_curvature(Objective(model, F.cross_entropy, batch), num_eigenvalues=3, lambda_min=True,
                            layer_eigen=True, **EXACT)
    assert isinstance(res, CurvatureResult)
    assert res.value == pytest.approx(float(H.trace()), rel=1e-8)
    blocks = _blocks(model)
    assert list(res.per_layer) == list(blocks)
    for name, b in blocks.items():
        assert res.per_layer[name] == pytest.approx(float(H[b, b].trace()), rel=1e-7, abs=1e-10)
        assert res.metrics()[f"lambda_max/{name}"] == pytest.approx(float(torch.linalg.eigvalsh(H[b, b])[-1]), rel=1e-6)
    m = res.metrics()
    assert res.lambda_max == m["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-8)
    assert [m[f"eigenvalues/{i}"] for i in range(3)] == pytest.approx(ev.flip(0)[:3].tolist(), rel=1e-6)
    assert m["lambda_min"] == pytest.approx(float(ev[0]), rel=1e-6, abs=1e-9)
    assert m["lambda_max_converged"] == 1.0
    assert "hessian_trace/0.weight" not in res.metrics(per_layer=False)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-2)])
def test_sgd_stability_ratios_are_the_closed_forms(momentum, weight_decay):
    model, batch, lr = _model().eval(), _batch(), 0.1
    H = _hessian(model, batch)
    ev = torch.linalg.eigvalsh(H)
    lam, tr = float(ev[-1]), float(H.trace())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    res = measure_curvature(Objective(model, F.cross_entropy, batch), optimizer=opt, batch_size=4, num_samples=40,
                            **EXACT)
    m = res.metrics()
    a_star = 2.0 + 2.0 * momentum  # heavy ball, no dampening: lr * lambda < 2 + 2 mu
    assert m["eos_threshold"] == pytest.approx(a_star / lr - weight_decay, rel=1e-12)
    assert m["eos_ratio"] == pytest.approx(lr * (lam + weight_decay) / a_star, rel=1e-8)
    if momentum == 0.0:
        assert m["eos_ratio"] == pytest.approx(lr * lam / 2, rel=1e-8)
    assert m["trace_ratio"] == pytest.approx(lr * tr / 2, rel=1e-8)
    k = (40 - 4) / (4 * (40 - 1))
    assert m["linear_stability_ratio"] == pytest.approx(lr * ((1 - k) * lam + k * tr + weight_decay) / a_star, rel=1e-8)
    g = torch.func.grad(_loss(model, batch))(_flat(model))
    grad_sharp = float(g @ H @ g / (g @ g))
    assert m["grad_sharpness"] == pytest.approx(grad_sharp, rel=1e-8)
    assert m["batch_sharpness"] == m["grad_sharpness"]
    assert m["batch_sharpness_ratio"] == pytest.approx(grad_sharp * lr / a_star, rel=1e-8)


def test_update_sharpness_is_the_quadratic_form_of_the_hessian_before_and_after_the_step():
    model, batch = _model().eval(), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):  # two steps: the update is not the gradient any more
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        before = OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters())
        opt.step()
    u = _flat(model) - torch.cat([p.reshape(-1) for p in before.values()])
    H_before = _hessian(model, batch, torch.cat([p.reshape(-1) for p in before.values()]))
    H_after = _hessian(model, batch)
    unclipped = OrderedDict((n, torch.ones_like(p)) for n, p in before.items())
    m = measure_curvature(Objective(model, F.cross_entropy, batch), before=before, unclipped_update=unclipped,
                          eigen=False, num_matvecs=2).metrics()
    assert m["update_sharpness"] == pytest.approx(float(u @ H_before @ u / (u @ u)), rel=1e-8)
    assert m["update_sharpness_next"] == pytest.approx(float(u @ H_after @ u / (u @ u)), rel=1e-8)
    one = torch.ones_like(u)
    assert m["update_sharpness_unclipped"] == pytest.approx(float(one @ H_before @ one / (one @ one)), rel=1e-8)
    # no step taken (before == after): no update sharpness, the gradient's still
    same = measure_curvature(Objective(model, F.cross_entropy, batch), before=dict(model.named_parameters()),
                             eigen=False, num_matvecs=2).metrics()
    assert "update_sharpness" not in same and "grad_sharpness" in same


def test_batch_sharpness_is_the_mean_over_the_minibatches_of_their_own_sharpness():
    model = _model().eval()
    batches = [_batch(6, seed=s) for s in (1, 2, 3)]
    expected = []
    for b in batches:
        H, g = _hessian(model, b), torch.func.grad(_loss(model, b))(_flat(model))
        expected.append(float(g @ H @ g / (g @ g)))
    res = measure_curvature(Objective(model, F.cross_entropy, batches[0]), eigen=False, num_matvecs=2,
                            batches=(Objective(model, F.cross_entropy, b) for b in batches))
    assert res.metrics()["batch_sharpness"] == pytest.approx(sum(expected) / 3, rel=1e-8)


def test_adam_ratio_is_the_top_eigenvalue_of_the_bias_corrected_preconditioned_hessian():
    model, batch = _model().eval(), _batch()
    lr, (b1, b2), eps = 1e-2, (0.9, 0.99), 1e-8
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    t = 3
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    P = (1 - b1**t) * ((v / (1 - b2**t)).sqrt() + eps)
    H = _hessian(model, batch)
    pre = torch.linalg.eigvalsh(H / P.sqrt()[:, None] / P.sqrt()[None, :])[-1]  # P^-1/2 H P^-1/2 ~ P^-1 H
    threshold = (2 + 2 * b1) / ((1 - b1) * lr)
    res = measure_curvature(Objective(model, F.cross_entropy, batch), optimizer=opt, **EXACT)
    m = res.metrics()
    assert m["preconditioned_lambda_max"] == pytest.approx(float(pre), rel=1e-6)
    assert m["eos_threshold"] == pytest.approx(threshold, rel=1e-12)
    assert m["eos_ratio"] == pytest.approx(float(pre) / threshold, rel=1e-6)
    assert res.preconditioned_eigenvector is not None and res.eigenvector is not None
    assert "linear_stability_ratio" not in m and "batch_sharpness_ratio" not in m


def test_batch_statistics_objective_is_the_train_mode_loss_and_leaves_the_running_statistics():
    model, batch = _model(bn=True).eval(), _batch()
    running = [b.clone() for b in model.buffers()]
    obj = with_batch_statistics(Objective(model, F.cross_entropy, batch))
    reference = F.cross_entropy(functional_call(model.train(), dict(model.named_parameters()), (batch[0],)), batch[1])
    model.eval()
    for b, r in zip(model.buffers(), running):  # the reference's own update, undone
        b.copy_(r)
    assert float(obj.value()) == pytest.approx(float(reference.detach()), rel=1e-12)
    assert all(torch.equal(b, r) for b, r in zip(model.buffers(), running)) and not model.training
    assert not any(m.training for m in model.modules())


def test_an_operator_target_and_optimizer_hparams():
    d = torch.tensor([3.0, 1.0, 2.0, -0.5], dtype=torch.float64)
    res = measure_curvature(MatrixOperator(torch.diag(d)), num_matvecs=4, lambda_min=True, eigen_tol=1e-10, lr=0.2)
    m = res.metrics()
    assert res.value == pytest.approx(5.5, rel=1e-12)  # Rademacher probes are exact on a diagonal
    assert m["lambda_max"] == pytest.approx(3.0, rel=1e-9) and m["lambda_min"] == pytest.approx(-0.5, rel=1e-9)
    assert m["trace_ratio"] == pytest.approx(0.2 * 5.5 / 2, rel=1e-12)
    w = nn.Parameter(torch.zeros(2))
    info = optimizer_hparams(torch.optim.AdamW([w], lr=0.01, betas=(0.8, 0.9)))
    assert (info["kind"], info["lr"], info["beta1"], info["beta2"]) == ("adam", 0.01, 0.8, 0.9)

    class Trainer:
        optimizers = [torch.optim.SGD([w], lr=0.3)]

    assert optimizer_hparams(Trainer())["lr"] == 0.3 and optimizer_hparams(object()) == {}


def test_the_density_histogram_counts_the_eigenvalues_of_a_diagonal():
    # Lanczos over the whole space is exact, and a Rademacher probe puts mass 1/n on each coordinate:
    # the counts are exactly the eigenvalues' multiplicities
    eig = torch.tensor([1.0, 1.0, 2.0, 3.3, 10.0, -4.0], dtype=torch.float64)
    res = measure_curvature(MatrixOperator(torch.diag(eig)), num_matvecs=2, eigen=False, density=True,
                            density_probes=3, density_steps=6)
    h = density_histogram(res.density, bins=64)
    edges = torch.linspace(-4.0, 10.0, 65, dtype=torch.float64)
    expected = torch.zeros(64, dtype=torch.float64)
    for lam in eig.tolist():
        expected[min(int(((lam - edges) >= 0).sum()) - 1, 63)] += 1
    assert h["min"] == pytest.approx(-4.0, rel=1e-9) and h["max"] == pytest.approx(10.0, rel=1e-9)
    assert h["bucket_counts"] == pytest.approx(expected.tolist(), abs=1e-9)
    assert h["bucket_limits"] == pytest.approx(edges[1:].tolist(), rel=1e-9)
    assert (h["num"], h["sum"], h["sum_squares"]) == pytest.approx((6.0, 13.3, 132.89), rel=1e-9)
    m = res.metrics()
    assert m["density_mass_negative"] == pytest.approx(1 / 6, rel=1e-9)
    assert m["density_moment2"] == pytest.approx(132.89 / 6, rel=1e-9)


def test_the_metric_names_are_the_declared_ones():
    assert METRICS is CURVATURE
    model, batch = _model().eval(), _batch()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05}, {"params": model[2].parameters()}], lr=0.1)
    before = OrderedDict((n, p.detach() + 0.01) for n, p in model.named_parameters())
    m = measure_curvature(Objective(model, F.cross_entropy, batch), optimizer=opt, num_eigenvalues=2, lambda_min=True,
                          layer_eigen=True, density=True, before=before, num_matvecs=4).metrics()
    seen = set()
    for key in m:
        name, layered = key.split("/")[0], "/" in key
        assert name in CURVATURE, key
        assert CURVATURE[name].per_layer if layered else not CURVATURE[name].layer_only, key
        seen.add(name)
    assert "eos_ratio/group0" in m and "eos_ratio/group1" in m
    # left out here: ratios of one common setting (SGD, Adam), the CoordinateClip update
    assert {"eos_threshold", "linear_stability_ratio", "batch_sharpness_ratio", "preconditioned_lambda_max",
            "update_sharpness_unclipped"} | seen == set(CURVATURE.names)


def test_the_core_measurement_imports_no_lightning():
    code = "import sys, dynscope.curvature\nprint(sorted(m for m in ('pytorch_lightning', 'lightning') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_grad_sharpness_reads_the_gradient_off_the_products_graph(monkeypatch):
    model, batch = _model().eval(), _batch()
    H = _hessian(model, batch)
    g = torch.func.grad(_loss(model, batch))(_flat(model))
    calls = []
    gradient = Objective.gradient
    monkeypatch.setattr(Objective, "gradient", lambda self: calls.append(self) or gradient(self))
    m = measure_curvature(Objective(model, F.cross_entropy, batch), **EXACT).metrics()
    assert m["grad_sharpness"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-8)
    assert calls == []  # no forward and backward of its own: Lanczos's products held the gradient
