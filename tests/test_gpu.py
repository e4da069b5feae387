"""The CUDA path: HVP and per-sample kernels, estimators and a training run with every diagnostic on a GPU.

Skipped where no CUDA device is present (CI has none); on a GPU machine run ``pytest tests/test_gpu.py``.
References are exact and computed on the CPU in float64: the dense Hessian by double backward,
per-sample gradients by a loop over samples, and the weights of the same run without diagnostics.
"""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from observer import assert_same_weights, trained_weights
from torch import nn

from dynscope import (GradientMoments, Objective, gauss_newton_trace, gradient_noise_scale, gradient_snr, hessian_trace,
                      local_complexity, measure_curvature, opposing_signals, per_sample_grads, spectral_density,
                      top_eigenvalues)
from dynscope.callbacks import DynScope
from dynscope.hvp import hvp_flat
from dynscope.kernel_choice import kernel_plan, probe_bytes
from dynscope.trace import RademacherProbes
from dynscope.tracking import CurvatureTracker
from models import Recorder, SmallCNN, kernel_case
from reference import exact_hessian

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")


def _objective(name: str, device, dtype=torch.float64) -> Objective:
    model, batch = kernel_case(name, device, dtype)
    return Objective(model.eval(), F.cross_entropy, batch)


MODELS = ["mlp", "cnn-batchnorm", "transformer"]


@pytest.mark.parametrize("method", ["auto", "forward", "reverse", "loop"])
@pytest.mark.parametrize("name", MODELS)
def test_every_hvp_kernel_on_cuda_equals_the_exact_hessian_times_v(name, method):
    H = exact_hessian(_objective(name, "cpu"))
    obj = _objective(name, CUDA)
    V = torch.randn(5, obj.layout.numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = hvp_flat(obj, V.to(CUDA), method=method, chunk_size=2)
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), V @ H.T, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", MODELS)
def test_trace_and_top_eigenvalue_on_cuda_match_the_dense_hessian(name):
    H = exact_hessian(_objective(name, "cpu"))
    exact_trace, top = float(H.trace()), float(torch.linalg.eigvalsh(H)[-1])
    obj = _objective(name, CUDA)
    n = obj.layout.numel
    sketched = hessian_trace(obj, 2 * n + 2, method="xtrace", seed=0)  # exact once the sketch spans the space
    assert sketched.value == pytest.approx(exact_trace, rel=1e-6, abs=1e-9)
    probed = hessian_trace(obj, 64, seed=0)  # unbiased: within 4 standard errors
    assert abs(probed.value - exact_trace) <= 4 * probed.stderr + 1e-9
    eig = top_eigenvalues(obj, which="LA", tol=1e-8, max_iter=n)
    assert eig.value == pytest.approx(top, rel=1e-6)


def test_per_sample_gradients_on_cuda_match_a_loop_over_samples():
    obj = _objective("cnn-batchnorm", CUDA)
    model, (x, y) = obj.model, obj.batch
    grads = per_sample_grads(obj)
    cpu_model = copy.deepcopy(model).cpu()
    for i in range(x.shape[0]):
        cpu_model.zero_grad()
        F.cross_entropy(cpu_model(x[i:i + 1].cpu()), y[i:i + 1].cpu()).backward()
        for name, p in cpu_model.named_parameters():
            assert torch.allclose(grads[name][i].cpu(), p.grad, rtol=1e-9, atol=1e-12), (i, name)
    moments = GradientMoments.from_samples(grads)
    assert all(v.device.type == "cuda" for v in moments.mean.values())


def test_a_gpu_batches_every_probe_where_the_cpu_rule_gives_one_per_call():
    # the CPU rule keeps a batched call within twice the per-probe loop's memory: one probe per call
    # on this CNN at batch 64; on a GPU launches dominate, and 32 probes go into one call
    torch.manual_seed(0)
    model = SmallCNN(channels=64).eval()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    assert kernel_plan(Objective(model, F.cross_entropy, (x, y)), 32, "reverse")[1] < 32
    on_gpu = Objective(copy.deepcopy(model).to(CUDA), F.cross_entropy, (x.to(CUDA), y.to(CUDA)))
    assert kernel_plan(on_gpu, 32) == ("forward", 32)
    assert kernel_plan(on_gpu, 32, memory_cap=2 * probe_bytes(on_gpu)) == ("forward", 2)


def test_probes_made_on_cuda_are_the_probes_made_on_the_cpu():
    assert torch.equal(RademacherProbes(5, 1001, seed=7, device=CUDA).rows(1, 4).cpu(), RademacherProbes(5, 1001, seed=7).rows(1, 4))
    assert torch.equal(RademacherProbes(5, 1001, seed=7, device=CUDA).row(3).cpu(), RademacherProbes(5, 1001, seed=7).row(3))


def test_float32_trace_on_cuda_agrees_with_float64_on_cpu():
    # TF32 and reduction order differ on the GPU; the estimate with the same probes must not
    reference = hessian_trace(_objective("mlp", "cpu"), 16, seed=3).value
    value = hessian_trace(_objective("mlp", CUDA, torch.float32), 16, seed=3).value
    assert value == pytest.approx(reference, rel=1e-3)


def _same_on_cuda(compute, name="mlp"):
    """``compute(objective)`` as a flat dict of floats on the CPU and on CUDA, both in float64."""
    return compute(_objective(name, "cpu")), compute(_objective(name, CUDA))


def _assert_close(cpu, gpu, rel=1e-6):
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], rel=rel, abs=1e-9, nan_ok=True), key


def _train_a_little(obj):
    with torch.no_grad():
        for p in obj.model.parameters():
            p.mul_(1.01)


def _tracked(obj):
    tracker, out = CurvatureTracker(trace_matvecs=4, sketch=2, eigen_tol=1e-6), {}
    for step in range(3):  # cold, then warm from the carried pair and sketch as the weights drift
        result = measure_curvature(obj, num_matvecs=4, tracker=tracker, exact_trace=False)
        out.update({f"{step}/{k}": v for k, v in result.metrics(per_layer=False).items()})
        _train_a_little(obj)
    return out


ESTIMATORS = {
    "curvature": lambda obj: measure_curvature(obj, num_matvecs=8, lambda_min=True, density=True, layer_eigen=True,
                                               num_eigenvalues=2, eigen_tol=1e-6, lr=0.1).metrics(),
    "tracked curvature": _tracked,
    "gauss-newton trace": lambda obj: {"trace": gauss_newton_trace(obj).value},
    "spectral density": lambda obj: dict(enumerate(spectral_density(obj, 2, 8).nodes.flatten().tolist())),
    "noise scale and snr": lambda obj: {"b_simple": gradient_noise_scale(obj).value, **gradient_snr(obj).per_layer},
    "opposing signals": lambda obj: opposing_signals(obj, top_k=2, tol=1e-8).metrics(),
    "linear regions": lambda obj: local_complexity(obj.model, obj.batch[0][:4], 0.1, 4, functional=True).per_layer,
}


@pytest.mark.parametrize("name", ["mlp", "cnn-batchnorm"])
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_estimator_gives_the_same_numbers_on_cuda_as_on_the_cpu(estimator, name):
    _assert_close(*_same_on_cuda(ESTIMATORS[estimator], name))


def _scope():
    return DynScope(loss_fn=F.cross_entropy, budget=None, strict=True,
                    curvature={"every_n_steps": 5, "num_matvecs": 4, "eigen_max_iter": 5},
                    noise={"every_n_steps": 5}, collapse={"every_n_steps": 5},
                    regions={"schedule": "steps", "every_n_steps": 10, "num_points": 4,
                             "num_test_points": 4, "num_random_points": 4})


class _Devices(pl.Callback):
    def __init__(self):
        self.seen = set()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.add(pl_module.device.type)


def test_a_gpu_training_run_with_every_diagnostic_is_bit_identical_and_logs_each():
    net = lambda: SmallCNN(dropout=0.3)  # noqa: E731 - BatchNorm statistics and dropout masks too
    plain = trained_weights([], steps=20, net_factory=net, accelerator="gpu")
    recorder, devices = Recorder(), _Devices()
    measured = trained_weights([_scope(), devices], steps=20, net_factory=net, accelerator="gpu", logger=recorder)
    assert devices.seen == {"cuda"}
    assert_same_weights(plain, measured)
    wanted = {"dynscope/curvature/hessian_trace", "dynscope/curvature/lambda_max", "dynscope/noise/gsnr",
              "dynscope/collapse/zero_loss_fraction"}
    assert wanted <= set(recorder.scalars), sorted(recorder.scalars)
    assert any(tag.startswith("dynscope/regions/") for tag in recorder.scalars), sorted(recorder.scalars)
    for tag in wanted:
        assert all(math.isfinite(v) for _, v in recorder.scalars[tag]), tag


def test_a_transformer_on_cuda_measures_through_the_default_attention_kernel():
    # the fused attention kernels have no double backward: the objective must still give H v
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(16 * 5, 3)).to(CUDA).eval()
    x, y = torch.randn(4, 5, 16, device=CUDA), torch.randint(0, 3, (4,), device=CUDA)
    obj = Objective(model, F.cross_entropy, (x, y))
    cpu = Objective(copy.deepcopy(model).cpu().double(), F.cross_entropy, (x.cpu().double(), y.cpu()))
    result = hessian_trace(obj, 8, seed=0)
    assert result.value == pytest.approx(hessian_trace(cpu, 8, seed=0).value, rel=1e-3)
