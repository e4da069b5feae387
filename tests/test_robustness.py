"""Mixed precision, gradient accumulation and injected faults (non-finite loss, gradient and HVP, out
of memory in a batched kernel, an exception inside a diagnostic), with exact references."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import pytorch_lightning as pl
from pytorch_lightning.plugins.precision import MixedPrecision

from dynscope import Objective, directional_sharpness, softmax_collapse
from dynscope.hvp import _Kernel
from dynscope.callbacks import Curvature, DiagnosticCallback, GradientNoise, SoftmaxCollapse
from models import Classifier, classification_data, loader, mlp, trainer
from observer import assert_same_weights
from reference import exact_hessian

hvp_module = importlib.import_module("dynscope.hvp")  # the module, not the function dynscope.hvp


def fit(callbacks, steps=4, batch_size=8, net=None, module_cls=Classifier, **kwargs):
    torch.manual_seed(0)
    module = module_cls(net or mlp((4, 8, 3)), lr=0.1)
    x, y = classification_data(64, (4,))
    trainer(max_steps=steps, callbacks=list(callbacks), **kwargs).fit(module, loader(x, y, batch_size=batch_size))
    return module, (x, y)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- precision -------------------------------------------------------------------------------------------------
def test_bf16_mixed_curvature_is_the_float32_curvature_and_sc_uses_the_autocast_logits():
    curvature = Curvature(every_n_steps=2, num_matvecs=6, eigen=False, sharpness=False, strict=True)
    collapse = SoftmaxCollapse(every_n_steps=2, strict=True)
    noise = GradientNoise(every_n_steps=2, strict=True)
    torch.manual_seed(0)
    net = mlp((4, 8, 3))
    with torch.no_grad():
        net[-1].weight.mul_(100.0)  # large logits: some rows collapse
    module, (x, y) = fit([curvature, collapse, noise], steps=4, precision="bf16-mixed", net=net)
    batch = (x[24:32], y[24:32])  # the batch of step 4, the last measurement, at the final weights
    objective = Objective(module, F.cross_entropy, batch)
    assert objective.dtype == torch.float32
    # a ReLU network: the trace is exact (tr(H) = tr(GGN)), so it is the float32 Hessian's own trace
    expected = float(exact_hessian(objective).diagonal().sum())
    assert curvature.last_metrics["hessian_trace"] == pytest.approx(expected, rel=1e-5)
    assert curvature.last_metrics["hessian_trace_stderr"] == 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module(batch[0])
    assert logits.dtype == torch.bfloat16
    expected_sc = softmax_collapse(logits, "float32")
    assert 0 < expected_sc < 1 and collapse.last_metrics["sc_fraction"] == expected_sc
    assert noise.last_metrics["gsnr"] > 0


def test_16_mixed_sc_check_runs_under_float16_autocast_and_counts_in_float32():
    # Lightning runs "16-mixed" as bf16 on a CPU, so the float16 path is checked with its precision plugin.
    torch.manual_seed(0)
    net = mlp((4, 8, 3))
    with torch.no_grad():
        net[-1].weight.mul_(400.0)  # large logits: some rows collapse
    x, y = classification_data(32, (4,))
    fake = SimpleNamespace(
        strategy=SimpleNamespace(precision_plugin=MixedPrecision("16-mixed", device="cpu", scaler=None)),
        precision="16-mixed", world_size=1, global_step=1,
    )
    metrics = SoftmaxCollapse(nlm=False).measure(fake, Classifier(net), (x, y))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        logits = net(x)
    assert logits.dtype == torch.float16
    expected = softmax_collapse(logits, "float32")
    assert 0 < expected < 1 and metrics["sc_fraction"] == expected


# -- gradient accumulation -------------------------------------------------------------------------------------
class Batches(DiagnosticCallback):
    group = "batches"

    def __init__(self):
        super().__init__(every_n_steps=1, strict=True)
        self.seen = []

    def measure(self, trainer, pl_module, batch):
        self.seen.append((trainer.global_step, batch[0].clone()))
        return {}


def test_with_gradient_accumulation_the_accumulated_batch_is_measured_once_per_optimizer_step():
    batches, noise = Batches(), GradientNoise(every_n_steps=1, strict=True)
    module, (x, y) = fit([batches, noise], steps=3, accumulate_grad_batches=2)
    assert [step for step, _ in batches.seen] == [1, 2, 3]
    for k, (_, seen) in enumerate(batches.seen):
        assert torch.equal(seen, x[16 * k : 16 * (k + 1)])  # micro-batches 2k and 2k+1, joined
    # the last measurement is at the final weights, on micro-batches 4 and 5 joined (16 samples)
    from dynscope import gradient_noise_scale

    ref = gradient_noise_scale(Objective(module, F.cross_entropy, (x[32:48], y[32:48])))
    assert ref.batch_size == 16
    assert noise.last_metrics["noise_scale"] == pytest.approx(ref.value, rel=1e-4)


def test_update_sharpness_under_accumulation_is_that_of_the_whole_update():
    class Snapshots(pl.Callback):
        def __init__(self):
            self.after = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    curvature = Curvature(every_n_steps=2, num_matvecs=2, eigen=False, strict=True)
    snaps = Snapshots()
    module, (x, y) = fit([snaps, curvature], steps=2, accumulate_grad_batches=2)
    update = {n: snaps.after[2][n] - snaps.after[1][n] for n in snaps.after[2]}
    objective = Objective(module, F.cross_entropy, (x[16:32], y[16:32]))
    expected = directional_sharpness(objective, {f"net.{k}" if not k.startswith("net.") else k: v for k, v in update.items()})
    assert curvature.last_metrics["update_sharpness_next"] == pytest.approx(expected, rel=1e-5)


# -- faults ------------------------------------------------------------------------------------------------------
class NaNGradient(Classifier):
    """Finite losses whose gradient is not finite (d sqrt(u)/du at u = 0), in dynscope's loss only."""

    def dynscope_loss(self, batch):
        x, y = batch
        kink = torch.sqrt(0.0 * self.net[0].weight.sum())
        return F.cross_entropy(self(x), y, reduction="none") + kink


def test_non_finite_gradients_skip_the_metric_warn_once_and_leave_training_alone():
    baseline, _ = fit([], module_cls=NaNGradient)
    noise = GradientNoise(every_n_steps=1)
    curvature = Curvature(every_n_steps=1, num_matvecs=2, eigen_max_iter=3)
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        module, _ = fit([noise, curvature], module_cls=NaNGradient)
    assert sum("GradientNoise" in str(w.message) for w in record) == 1
    assert sum("Curvature" in str(w.message) for w in record) == 1
    assert noise.last_metrics == {} and curvature.last_metrics == {} and noise.num_measurements == 4
    assert_same_weights(weights(baseline), weights(module))


def test_a_non_finite_hvp_is_skipped_with_one_warning(monkeypatch):
    monkeypatch.setattr(_Kernel, "run", lambda self, method, chunk: torch.full_like(chunk, float("nan")))
    curvature = Curvature(every_n_steps=1, num_matvecs=4, eigen=False, sharpness=False, exact_trace=False)
    with pytest.warns(RuntimeWarning, match="Hessian-vector product is not finite") as record:
        fit([curvature], steps=3)
    assert sum("dynscope" in str(w.message) for w in record) == 1 and curvature.num_measurements == 3


def test_out_of_memory_in_a_batched_kernel_halves_the_chunk_and_gives_the_same_value(monkeypatch):
    plain = Curvature(every_n_steps=2, num_matvecs=8, eigen=False, sharpness=False, chunk_size=8, strict=True,
                      exact_trace=False)
    fit([plain], steps=2)
    run = _Kernel.run
    sizes = []

    def tight(self, method, chunk):
        sizes.append(chunk.shape[0])
        if chunk.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run(self, method, chunk)

    monkeypatch.setattr(_Kernel, "run", tight)
    monkeypatch.setattr(hvp_module, "_ORDER", ("reverse",))  # a batched kernel, whatever is fastest here
    squeezed = Curvature(every_n_steps=2, num_matvecs=8, eigen=False, sharpness=False, chunk_size=8, strict=True,
                         exact_trace=False)
    with pytest.warns(UserWarning, match="out of memory"):
        fit([squeezed], steps=2)
    assert max(sizes) > 2 and 2 in sizes
    assert squeezed.last_metrics["hessian_trace"] == pytest.approx(plain.last_metrics["hessian_trace"], rel=1e-5)


def test_an_exception_inside_a_diagnostic_never_ends_the_run_unless_strict(monkeypatch):
    baseline, _ = fit([])

    def boom(self, trainer, pl_module, batch):
        raise RuntimeError("boom")

    monkeypatch.setattr(Curvature, "measure", boom)
    with pytest.warns(RuntimeWarning, match="boom") as record:
        module, _ = fit([Curvature(every_n_steps=1)])
    assert sum("boom" in str(w.message) for w in record) == 1
    assert_same_weights(weights(baseline), weights(module))
    with pytest.raises(RuntimeError, match="boom"):
        fit([Curvature(every_n_steps=1, strict=True)])


def test_out_of_memory_in_the_per_sample_kernel_halves_the_chunk_and_gives_the_same_gradients(monkeypatch):
    from dynscope import per_sample_grads

    torch.manual_seed(0)
    model = mlp((4, 8, 3))
    x, y = classification_data(16, (4,))
    objective = Objective(model, F.cross_entropy, (x, y))
    expected = per_sample_grads(objective, chunk_size=16)
    real_vmap, sizes = torch.vmap, []

    def tight_vmap(fn, *args, **kwargs):
        mapped = real_vmap(fn, *args, **kwargs)

        def run(params, batch):
            sizes.append(batch[0].shape[0])
            if batch[0].shape[0] > 4:
                raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return mapped(params, batch)

        return run

    monkeypatch.setattr(torch, "vmap", tight_vmap)
    squeezed = per_sample_grads(objective, chunk_size=16)
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) == 4
    for name in expected:
        torch.testing.assert_close(squeezed[name], expected[name])


# -- NaN samples and low precision in the per-sample check (issue 15 items 2, 13) ------------------------------
class NaNSample(Classifier):
    """Training leaves out samples with non-finite inputs; dynscope's loss sees them (the first batch holds one)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        keep = x.isfinite().all(1)
        return F.cross_entropy(self(x[keep]), y[keep])

    def dynscope_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


def nan_sample_fit(callbacks, steps=3):
    torch.manual_seed(0)
    module = NaNSample(mlp((4, 8, 3)), lr=0.1)
    x, y = classification_data(64, (4,))
    x[3, 1] = float("nan")  # in the batch of step 1, the first (unchecked) per-sample measurement
    trainer(max_steps=steps, callbacks=list(callbacks)).fit(module, loader(x, y, batch_size=8))
    return module, (x, y)


def last_batch_grad_norm(module, x, y, step):
    batch = (x[8 * (step - 1) : 8 * step], y[8 * (step - 1) : 8 * step])
    gradient = Objective(module, F.cross_entropy, batch).gradient()
    return float(torch.sqrt(sum(g.double().square().sum() for g in gradient.values())))


def test_a_nan_sample_skips_that_gradient_noise_measurement_with_one_warning():
    noise = GradientNoise(every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        module, (x, y) = nan_sample_fit([noise])
    assert sum("dynscope" in str(w.message) for w in record) == 1
    assert noise.num_measurements == 3 and noise._checked  # steps 2 and 3 measured (and checked)
    assert noise.last_metrics["grad_norm"] == pytest.approx(last_batch_grad_norm(module, x, y, 3), rel=1e-5)


def test_a_nan_sample_at_the_first_check_does_not_make_dynscope_drop_gradient_noise():
    from dynscope.callbacks import DynScope

    scope = DynScope(budget=None, curvature=False, collapse=False, regions=False, noise={"every_n_steps": 1})
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        module, (x, y) = nan_sample_fit([scope])
    assert not any("left out of this run" in str(w.message) for w in record)
    noise = scope.callbacks["noise"]
    assert noise.last_metrics["grad_norm"] == pytest.approx(last_batch_grad_norm(module, x, y, 3), rel=1e-5)


def test_gradient_noise_under_bf16_true_passes_the_per_sample_check():
    noise = GradientNoise(every_n_steps=1, strict=True)
    module, (x, y) = fit([noise], steps=2, precision="bf16-true", batch_size=32)
    assert next(module.parameters()).dtype == torch.bfloat16
    batch = (x[32:64].bfloat16(), y[32:64])
    gradient = Objective(module, F.cross_entropy, batch).gradient()
    expected = float(torch.sqrt(sum(g.double().square().sum() for g in gradient.values())))
    assert noise.num_measurements == 2 and noise.last_metrics["grad_norm"] == pytest.approx(expected, rel=2e-2)


# -- checkpoints, batch structures, options (issue 15 item 15) ------------------------------------------------
def test_checkpointed_eigenvectors_are_optional():
    kept, left = Curvature(every_n_steps=2, num_matvecs=4), Curvature(every_n_steps=2, num_matvecs=4,
                                                                        checkpoint_eigenvectors=False)
    module, _ = fit([kept], steps=2)
    fit([left], steps=2)
    numel = sum(p.numel() for p in module.parameters())
    assert kept.state_dict()["eigenvector"].shape == (numel,)  # parameter-sized, as documented
    assert "eigenvector" not in left.state_dict() and left._eigvec is not None


def test_a_nested_inputs_batch_gets_a_message_that_says_what_is_wrong():
    from dynscope.callbacks.protocol import LossProtocolError, module_logits, module_objective
    from dynscope.callbacks.regions import module_inputs

    batch = ((torch.randn(4, 2), torch.randn(4, 2)), torch.zeros(4, dtype=torch.long))
    for call in (lambda: module_objective(torch.nn.Linear(2, 2), batch, F.cross_entropy),
                 lambda: module_logits(torch.nn.Linear(2, 2), batch), lambda: module_inputs(torch.nn.Linear(2, 2), batch)):
        with pytest.raises(LossProtocolError, match=r"\(x, y\) pair whose x is a tuple of 2, not a tensor") as error:
            call()
        assert "dynscope_" in str(error.value)  # and what to define instead


def test_mitigation_options_without_the_mitigation_are_a_clear_error():
    from dynscope.callbacks import DynScope

    with pytest.raises(ValueError, match=r"unknown options \['patience', 'threshold'\].*add 'ema' to mitigate="):
        DynScope(metric=lambda m: 0.0, gva={"threshold": 5.0, "patience": 2})
    with pytest.raises(ValueError, match=r"\['patience'\].*add 'stablemax' to mitigate="):
        DynScope(collapse={"patience": 2})
    with pytest.raises(ValueError, match=r"curvature= got unknown options \['num_probes'\] for Curvature$"):
        DynScope(curvature={"num_probes": 2})
    DynScope(metric=lambda m: 0.0, gva={"threshold": 5.0, "patience": 2}, mitigate=("ema",))  # fine with it


# -- non-finite logits and pre-activations (issue 15 item 10) ----------------------------------------------------
def test_non_finite_logits_and_pre_activations_are_skipped_with_one_warning_not_logged_as_zero():
    from dynscope.callbacks import LinearRegions
    from models import Recorder

    torch.manual_seed(0)
    net = mlp((4, 8, 3))
    with torch.no_grad():
        net[0].bias[0] = float("nan")  # one hidden unit is NaN: logits and its pre-activation too
    collapse = SoftmaxCollapse(every_n_steps=1, nlm=False)
    regions = LinearRegions(every_n_steps=1, schedule="steps", num_points=8, num_test_points=0, num_random_points=0,
                            num_directions=2)
    recorder = Recorder()
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        fit([collapse, regions], steps=3, net=net, logger=recorder)
    assert sum("SoftmaxCollapse" in str(w.message) for w in record) == 1
    assert sum("LinearRegions" in str(w.message) for w in record) == 1
    assert collapse.num_measurements == regions.num_measurements == 3
    assert not [tag for tag in recorder.scalars if tag.startswith(("dynscope/collapse", "dynscope/regions"))]
    # a masked class (-inf logit) is fine; NaN, +inf or a row without a finite logit are not
    from dynscope.callbacks.collapse import collapse_counts
    from dynscope.objective import NonFiniteError

    inf = float("inf")
    masked = torch.tensor([[2.0, 0.0, -inf], [0.0, 200.0, -inf]])
    assert collapse_counts(masked, torch.tensor([0, 1]), "float32", -100).tolist()[:3] == [2.0, 1.0, 1.0]
    for bad in (float("nan"), inf, -inf):
        rows = torch.tensor([[2.0, 0.0, 1.0], [bad, bad if bad == -inf else 0.0, -inf]])
        with pytest.raises(NonFiniteError, match="the logits are not finite"):
            collapse_counts(rows, torch.tensor([0, 1]), "float32", -100)


# -- data loaders and RNGs (issue 15 items 5, 7) -----------------------------------------------------------------
class Stream(torch.utils.data.IterableDataset):
    """Samples 0..63 in order; x holds the sample's index."""

    def __iter__(self):
        for i in range(64):
            yield torch.full((4,), float(i)), i % 3


class Batches0(pl.Callback):
    def __init__(self):
        self.first = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first.append(int(batch[0][0, 0]))


def test_linear_regions_never_iterates_the_training_loader():
    from dynscope.callbacks import LinearRegions

    regions = LinearRegions(every_n_steps=2, schedule="steps", num_points=16, num_test_points=0, num_random_points=4,
                            num_directions=2)
    seen = Batches0()
    torch.manual_seed(0)
    module = Classifier(mlp((4, 8, 3)), lr=0.01)
    stream = torch.utils.data.DataLoader(Stream(), batch_size=8, num_workers=1, persistent_workers=True)
    with pytest.warns(RuntimeWarning, match="lc_train uses the 8 inputs of the first measured batch"):
        trainer(max_steps=8, callbacks=[seen, regions]).fit(module, stream)
    assert seen.first == [0, 8, 16, 24, 32, 40, 48, 56]
    assert regions.train_points[:, 0].tolist() == list(range(8))  # the batch of step 1
    assert regions.num_measurements == 5 and "lc_train" in regions.last_metrics


class DropoutClassifier(Classifier):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_held_out_collapse_checks_leave_the_rng_alone():
    def run(callbacks):
        torch.manual_seed(0)
        module = DropoutClassifier(mlp((4, 16, 3), dropout=0.5), lr=0.1)
        x, y = classification_data(64, (4,))
        trainer(max_steps=6, callbacks=callbacks, num_sanity_val_steps=0, val_check_interval=3).fit(
            module, loader(x, y, batch_size=8), loader(x[:16], y[:16], batch_size=8, shuffle=True))
        return weights(module)

    collapse = SoftmaxCollapse(every_n_steps=1, held_data="val", strict=True)
    assert_same_weights(run([]), run([collapse]))
    assert "held_sc_fraction" in collapse.last_metrics and collapse.num_measurements == 6


# -- manual optimization with two optimizers (issue 15 item 11) ---------------------------------------------------
class TwoOptimizers(Classifier):
    """Manual optimization: the hidden layer and the head each have their own optimizer, both step per batch."""

    def __init__(self):
        super().__init__(mlp((4, 8, 3)), lr=0.1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        loss = self.criterion(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[0].parameters(), lr=self.lr),
                torch.optim.SGD(self.net[2].parameters(), lr=self.lr))


def test_under_manual_optimization_with_two_optimizers_cadences_count_training_batches():
    from dynscope.callbacks import VarianceAmplification
    from models import Recorder

    curvature = Curvature(every_n_steps=4, num_matvecs=2, eigen_max_iter=3)
    noise = GradientNoise(every_n_steps=4)
    collapse = SoftmaxCollapse(every_n_steps=4)
    gva = VarianceAmplification(lambda m: float(m.net[0].weight.norm()), every_n_steps=4, window=3)
    recorder = Recorder()
    torch.manual_seed(0)
    module = TwoOptimizers()
    x, y = classification_data(160, (4,))
    fit_trainer = trainer(max_steps=40, callbacks=[curvature, noise, collapse, gva], logger=recorder)
    fit_trainer.fit(module, loader(x, y, batch_size=8))  # 20 batches, 40 optimizer steps
    assert fit_trainer.global_step == 40
    assert curvature.num_measurements == noise.num_measurements == collapse.num_measurements == 6  # batches 1, 4, ..., 20
    assert gva.num_measurements == 5
    # logged against global_step (two optimizer steps per batch), with the update and the NLM alignment in place
    assert [s for s, _ in recorder.scalars["dynscope/curvature/hessian_trace"]] == [2, 8, 16, 24, 32, 40]
    assert [s for s, _ in recorder.scalars["dynscope/curvature/update_sharpness"]] == [2, 8, 16, 24, 32, 40]
    assert [s for s, _ in recorder.scalars["dynscope/collapse/nlm_cos"]] == [2, 8, 16, 24, 32, 40]
    objective = Objective(module, F.cross_entropy, (x[152:], y[152:]))
    assert curvature.last_metrics["hessian_trace"] == pytest.approx(float(exact_hessian(objective).diagonal().sum()), rel=1e-5)


# -- complex parameters (issue 15 item 12) --------------------------------------------------------------------------
class ComplexFilter(Classifier):
    """A real loss of a model with one complex weight vector."""

    def __init__(self):
        super().__init__(mlp((4, 3)), lr=0.1)
        self.phase = torch.nn.Parameter(torch.randn(4, dtype=torch.cfloat))

    def forward(self, x):
        return self.net((x * self.phase).abs())


def test_gradient_noise_refuses_complex_parameters_clearly():
    from dynscope.callbacks import DynScope
    from dynscope.callbacks.protocol import LossProtocolError

    with pytest.raises(LossProtocolError, match=r"does not support complex parameters \(phase\)"):
        fit([GradientNoise(every_n_steps=1)], steps=2, module_cls=lambda net, lr: ComplexFilter())
    scope = DynScope(budget=None, curvature=False, collapse=False, regions=False)
    with pytest.warns(RuntimeWarning, match="noise does not apply to this model.*complex parameters"):
        fit([scope], steps=2, module_cls=lambda net, lr: ComplexFilter())
    assert "noise" not in scope.callbacks


# -- torch.compile (issue 15 item 6) --------------------------------------------------------------------------------
class Compiled(Classifier):
    def training_step(self, batch, batch_idx):  # no self.log: dynamo cannot trace Lightning's logging
        x, y = batch
        return self.criterion(self(x), y)


def test_a_compiled_module_is_measured_through_its_original_code_and_trains_bit_identically():
    calls = []

    def counting(graph, example_inputs):  # a torch.compile backend that counts the runs of its graphs
        def run(*args):
            calls.append(len(args))
            return graph.forward(*args)
        return run

    def compiled_fit(callbacks):
        calls.clear()
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = Compiled(mlp((4, 16, 3), dropout=0.3), lr=0.1)
        x, y = classification_data(64, (4,))
        trainer(max_steps=8, callbacks=callbacks).fit(torch.compile(module, backend=counting), loader(x, y, batch_size=8))
        return module, weights(module), len(calls), (x, y)

    _, baseline, baseline_calls, _ = compiled_fit([])
    noise = GradientNoise(every_n_steps=2, strict=True)
    curvature = Curvature(every_n_steps=2, num_matvecs=2, eigen_max_iter=3, strict=True)
    module, measured, measured_calls, (x, y) = compiled_fit([noise, curvature, SoftmaxCollapse(every_n_steps=2, strict=True)])
    assert baseline_calls == measured_calls == 8  # every training step ran the compiled graph, and nothing else did
    assert_same_weights(baseline, measured)  # Dropout included
    objective = Objective(module, F.cross_entropy, (x[56:], y[56:]))
    gradient = objective.gradient()
    assert noise.last_metrics["grad_norm"] == pytest.approx(
        float(torch.sqrt(sum(g.double().square().sum() for g in gradient.values()))), rel=1e-5)


def test_dynscope_under_manual_optimization_with_two_optimizers_fires_its_cadences():
    from dynscope.callbacks import DynScope

    scope = DynScope(budget=None, curvature={"every_n_steps": 4, "num_matvecs": 2, "eigen_max_iter": 3},
                     noise={"every_n_steps": 4}, collapse={"every_n_steps": 4}, regions=False, strict=True)
    torch.manual_seed(0)
    x, y = classification_data(160, (4,))
    trainer(max_steps=40, callbacks=[scope]).fit(TwoOptimizers(), loader(x, y, batch_size=8))
    assert {n: c.num_measurements for n, c in scope.callbacks.items()} == {"curvature": 6, "noise": 6, "collapse": 6}
