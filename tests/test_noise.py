"""Per-sample gradients, gradient SNR, noise scale and the GradientNoise callback."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynscope import (
    NotPerSampleError,
    Objective,
    TwoBatchNoiseScale,
    gradient_noise_scale,
    gradient_snr,
    per_sample_grads,
    per_sample_moments,
    two_batch_noise_scale,
)
from dynscope.callbacks import GradientNoise, LossProtocolError
from dynscope.persample import GradientMoments, default_sample_chunk
from models import (Classifier, Recorder, SeqFirstTagger, SmallCNN, TinyTransformer, classification_data, loader, mlp,
                    tagging_loss, trainer)
from observer import assert_same_weights, trained_weights


# -- references -------------------------------------------------------------------------------------


def looped_grads(model, loss_fn, x, y):
    """Per-sample gradients with one plain autograd call per sample: ``{name: [B, *shape]}``."""
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)])
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


def numpy_stats(grads, eps=None):
    """GSNR, per-layer GSNR, block g-SNR and B_simple from ``{name: [B, ...]}`` with numpy.

    A coordinate counts for GSNR when its per-sample std exceeds ``4 eps`` times the largest
    RMS per-sample gradient of its module's tensors (the documented rounding floor).
    """
    eps = eps if eps is not None else float(np.finfo(np.dtype(str(next(iter(grads.values())).dtype).split(".")[1])).eps)
    flat = {n: g.detach().double().numpy().reshape(g.shape[0], -1) for n, g in grads.items()}
    allg = np.concatenate(list(flat.values()), axis=1)
    mean, var = allg.mean(0), allg.var(0, ddof=1)
    module = lambda n: n.rpartition(".")[0]  # noqa: E731
    scale = {m: max(np.max(np.mean(g**2, 0)) for n, g in flat.items() if module(n) == m) for m in map(module, flat)}
    counts = {n: (g.var(0, ddof=1) > (4 * eps) ** 2 * scale[module(n)]) for n, g in flat.items()}
    nz = np.concatenate(list(counts.values()))
    per_layer, block = {}, {}
    for n, g in flat.items():
        m, v, keep = g.mean(0), g.var(0, ddof=1), counts[n]
        per_layer[n] = float(np.mean(m[keep] ** 2 / v[keep])) if keep.any() else math.nan
        block[n] = float(np.linalg.norm(m) / np.std(m)) if np.std(m) > 0 else math.nan
    return {
        "gsnr": float(np.mean(mean[nz] ** 2 / var[nz])),
        "per_layer": per_layer,
        "block": block,
        "noise_scale": float(var.sum() / (mean**2).sum()),
        "grad_sq_norm": float((mean**2).sum()),
    }


def assert_close_dict(a, b, **kw):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], **kw), n


# -- linear regression against numpy on closed-form per-sample gradients -----------------------------


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_linear_regression_gsnr_and_noise_scale_match_numpy(method):
    rng = np.random.default_rng(0)
    B, d = 32, 4
    x = rng.normal(size=(B, d))
    x[:, 2] = 0.0  # that weight's per-sample gradients are all 0: zero variance, left out of the mean
    y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=B) + 1.0
    w, b = rng.normal(size=d) * 0.5, 0.2
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w)[None])
        model.bias.fill_(b)
    # l_i = (w.x_i + b - y_i)^2, so g_i = 2 r_i (x_i, 1): an explicit loop in numpy
    gw, gb = np.zeros((B, 1, d)), np.zeros((B, 1))
    for i in range(B):
        r = x[i] @ w + b - y[i]
        gw[i, 0], gb[i, 0] = 2 * r * x[i], 2 * r
    ref = numpy_stats({"weight": torch.from_numpy(gw), "bias": torch.from_numpy(gb)})
    obj = Objective(model, F.mse_loss, (torch.from_numpy(x), torch.from_numpy(y)[:, None]))

    moments = per_sample_moments(obj, method)
    snr, noise = gradient_snr(moments), gradient_noise_scale(moments)
    assert snr.value == pytest.approx(ref["gsnr"], rel=1e-9)
    assert snr.num_coordinates == d  # 3 weights + bias
    for n in ("weight", "bias"):
        assert snr.per_layer[n] == pytest.approx(ref["per_layer"][n], rel=1e-9)
        assert snr.block[n] == pytest.approx(ref["block"][n], rel=1e-9, nan_ok=True)
    assert noise.value == pytest.approx(ref["noise_scale"], rel=1e-9)
    assert noise.grad_sq_norm == pytest.approx(ref["grad_sq_norm"], rel=1e-9)
    assert math.isnan(snr.block["bias"])  # one element: std = 0, guarded
    # the same numbers straight from the objective
    assert gradient_snr(obj, method=method).value == pytest.approx(ref["gsnr"], rel=1e-9)
    assert gradient_noise_scale(obj, method=method).value == pytest.approx(ref["noise_scale"], rel=1e-9)
    expected_method = "hooks" if method == "auto" else "vmap"
    assert set(moments.methods.values()) == {expected_method}


# -- per-sample gradients against a per-sample autograd loop -----------------------------------------


def _cases():
    torch.manual_seed(0)
    yield "mlp", mlp((4, 6, 3)), classification_data(10, (4,))
    torch.manual_seed(0)
    cnn = SmallCNN(channels=2)
    cnn.bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial eval-mode statistics
    yield "cnn", cnn, classification_data(6, (1, 8, 8))
    torch.manual_seed(0)
    yield "transformer", TinyTransformer(dim=4, heads=2), classification_data(6, (5,), vocab=11)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_per_sample_grads_equal_a_per_sample_autograd_loop(case):
    _, model, (x, y) = case
    obj = Objective(model, F.cross_entropy, (x, y))
    got = per_sample_grads(obj, chunk_size=4)  # chunks of 4, 4, 2 (or 4, 2)
    ref = looped_grads(model, F.cross_entropy, x, y)
    assert_close_dict(got, ref, atol=1e-6, rtol=1e-4)
    assert_close_dict(per_sample_grads(obj), got, atol=1e-6)


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_moments_match_looped_gradients_with_numpy(case):
    _, model, (x, y) = case
    model = model.double()  # tiny variances make float32 GSNR a poor reference
    x = x.double() if x.is_floating_point() else x
    ref = numpy_stats(looped_grads(model, F.cross_entropy, x, y))
    obj = Objective(model, F.cross_entropy, (x, y))
    snr, noise = gradient_snr(obj), gradient_noise_scale(obj)
    assert snr.value == pytest.approx(ref["gsnr"], rel=1e-8)
    assert noise.value == pytest.approx(ref["noise_scale"], rel=1e-8)
    for n, v in ref["per_layer"].items():
        assert snr.per_layer[n] == pytest.approx(v, rel=1e-8, nan_ok=True), n
        assert snr.block[n] == pytest.approx(ref["block"][n], rel=1e-8, nan_ok=True), n


# -- the hook fast path equals the vmap path -----------------------------------------------------------


class Mixed(nn.Module):
    """Every layer kind the fast path handles, and the cases where it must fall back."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 5, padding_idx=0)
        self.conv1 = nn.Conv1d(5, 4, 3, padding="same", dilation=2)
        self.conv2 = nn.Conv2d(1, 3, 3, stride=2, padding=1, bias=False)
        self.seq = nn.Linear(4, 4)  # sees [B, T, 4] and is called twice
        self.shared = nn.Linear(4, 4)  # also used directly through F.linear: must fall back
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4 + 3, 3)

    def forward(self, batch):
        tokens, image = batch
        h = self.conv1(self.embed(tokens).transpose(1, 2)).transpose(1, 2)  # [B, T, 4]
        h = self.seq(torch.tanh(self.seq(h)))
        h = self.shared(h) + F.linear(h.flip(1), self.shared.weight)
        h = F.gelu(self.norm(h)).mean(1)
        c = self.conv2(image).mean((2, 3))
        return self.head(torch.cat([h, c], 1))


def _mixed_objective(batch_size=9):
    torch.manual_seed(0)
    model = Mixed().double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 7, (batch_size, 6), generator=g)
    tokens[0, :3] = 0  # padding tokens get no gradient
    tokens[1] = 3  # one token repeated: its per-sample rows add up before squaring
    image = torch.randn(batch_size, 1, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (batch_size,), generator=g)
    return Objective(model, F.cross_entropy, ((tokens, image), y), forward_fn=lambda m, inputs: m(inputs))


def test_fast_path_equals_vmap_path_on_every_supported_layer_kind():
    obj = _mixed_objective()
    fast, slow = per_sample_moments(obj, chunk_size=4), per_sample_moments(obj, "vmap", chunk_size=4)
    assert fast.methods == {
        "embed.weight": "hooks", "conv1.weight": "hooks", "conv1.bias": "hooks", "conv2.weight": "hooks",
        "seq.weight": "hooks", "seq.bias": "hooks", "shared.weight": "vmap", "shared.bias": "hooks",
        "norm.weight": "vmap", "norm.bias": "vmap", "head.weight": "hooks", "head.bias": "hooks",
    }
    assert set(slow.methods.values()) == {"vmap"}
    assert fast.count == slow.count == 9
    assert_close_dict(fast.mean, slow.mean, atol=1e-12, rtol=1e-9)
    assert_close_dict(fast.sq_dev, slow.sq_dev, atol=1e-12, rtol=1e-8)
    # and both equal the materialised per-sample gradients
    assert_close_dict(GradientMoments.from_samples(per_sample_grads(obj)).sq_dev, slow.sq_dev, atol=1e-12, rtol=1e-9)


def test_fast_path_chunks_its_per_layer_gradients_to_the_memory_cap():
    obj = _mixed_objective()
    tiny = per_sample_moments(obj, memory_cap=1)  # one sample per chunk everywhere
    assert_close_dict(tiny.sq_dev, per_sample_moments(obj).sq_dev, atol=1e-12, rtol=1e-9)
    assert default_sample_chunk(obj, obj.layout.numel, memory_cap=1) == 1
    assert default_sample_chunk(obj, obj.layout.numel) == obj.batch_size


def test_fast_path_on_the_transformer_equals_vmap():
    torch.manual_seed(0)
    model = TinyTransformer(dim=4, heads=2).double()
    x, y = classification_data(8, (5,), vocab=11)
    obj = Objective(model, F.cross_entropy, (x, y))
    fast, slow = per_sample_moments(obj), per_sample_moments(obj, "vmap")
    hooked = {n for n, m in fast.methods.items() if m == "hooks"}
    assert hooked == {"embed.weight", "ff.0.weight", "ff.0.bias", "ff.2.weight", "ff.2.bias", "head.weight", "head.bias"}
    assert_close_dict(fast.sq_dev, slow.sq_dev, atol=1e-12, rtol=1e-9)


def loop_reference(model, sample_loss, batch):
    """Per-sample gradients by a plain loop over batches of one sample: ``{name: [B, *shape]}``."""
    size = batch[0].shape[0]
    out = {n: [] for n, _ in model.named_parameters()}
    for i in range(size):
        params = [p for _, p in model.named_parameters()]
        grads = torch.autograd.grad(sample_loss(model, tuple(t[i : i + 1] for t in batch))[0], params)
        for (n, _), g in zip(model.named_parameters(), grads):
            out[n].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_sequence_first_layers_with_length_equal_to_batch_are_measured_on_the_batch_dim(rnn):
    # T == B: the leading dim of the embedding's and head's inputs has the batch size but is time;
    # hooking it as the batch made GSNR 5.6x too high. A smaller probe batch tells the dims apart.
    torch.manual_seed(0)
    model = SeqFirstTagger(rnn).double().eval()
    tokens, tags = torch.randint(0, 7, (6, 6)), torch.randint(0, 3, (6, 6))
    obj = Objective(model, sample_loss_fn=tagging_loss, batch=(tokens, tags))
    ref = GradientMoments.from_samples(loop_reference(model, tagging_loss, (tokens, tags)))
    fast = per_sample_moments(obj)
    assert {n for n, m in fast.methods.items() if m == "hooks"} == {"embed.weight", "head.weight", "head.bias"}
    assert_close_dict(fast.sq_dev, ref.sq_dev, atol=1e-12, rtol=1e-9)
    assert math.isclose(gradient_snr(fast).value, gradient_snr(ref).value, rel_tol=1e-9)


# -- the decomposition is checked ---------------------------------------------------------------------


def test_losses_that_are_not_a_mean_of_per_sample_losses_are_refused():
    x, y = classification_data(8, (4,))
    model = mlp((4, 5, 3))
    for loss in (nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))):
        with pytest.raises(NotPerSampleError, match="not the mean of the per-sample losses"):
            gradient_snr(Objective(model, loss, (x, y)))
    batch_level = Objective(model, sample_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch=(x, y))
    with pytest.raises(NotPerSampleError, match="one loss per sample"):
        gradient_noise_scale(batch_level)
    with pytest.raises(NotPerSampleError, match="BatchNorm in train mode"):
        gradient_snr(Objective(SmallCNN(), F.cross_entropy, classification_data(4, (1, 8, 8)), mode="train"))
    with pytest.raises(ValueError, match="at least 2 samples"):
        gradient_snr(Objective(model, F.cross_entropy, (x[:1], y[:1])))
    with pytest.raises(ValueError, match="method must be"):
        per_sample_moments(Objective(model, F.cross_entropy, (x, y)), "backpack")


def test_dict_batches_through_sample_loss_fn():
    torch.manual_seed(0)
    model = mlp((3, 4, 2))
    batch = {"x": torch.randn(6, 3), "y": torch.randint(0, 2, (6,)), "tag": "not a tensor"}
    obj = Objective(model, sample_loss_fn=lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"), batch=batch)
    ref = looped_grads(model, F.cross_entropy, batch["x"], batch["y"])
    assert_close_dict(per_sample_grads(obj, chunk_size=4), ref, atol=1e-6)
    assert gradient_snr(obj).value == pytest.approx(numpy_stats(ref)["gsnr"], rel=1e-4)


def test_moments_all_reduced_over_ranks_equal_the_whole_batch():
    torch.manual_seed(0)
    model = mlp((4, 6, 3)).double()
    x, y = classification_data(10, (4,))
    x = x.double()
    whole = per_sample_moments(Objective(model, F.cross_entropy, (x, y)))
    a = per_sample_moments(Objective(model, F.cross_entropy, (x[:3], y[:3])))
    b = per_sample_moments(Objective(model, F.cross_entropy, (x[3:], y[3:])))
    sent = {}
    b.all_reduced(lambda t: sent.setdefault("b", t))  # what rank b contributes
    merged = a.all_reduced(lambda t: t + sent["b"])
    assert merged.count == 10
    assert_close_dict(merged.mean, whole.mean, atol=1e-12)
    assert_close_dict(merged.sq_dev, whole.sq_dev, atol=1e-10)


# -- the two-batch estimator --------------------------------------------------------------------------


def test_two_batch_estimator_recovers_a_known_noise_scale():
    g = torch.Generator().manual_seed(0)
    d, b_small, b_big, n = 16, 8, 64, 3000
    G = torch.randn(d, generator=g, dtype=torch.float64)
    G = G / G.norm()  # |G|^2 = 1
    std = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    true = float((std**2).sum() / G.square().sum())  # tr(Sigma) / |G|^2
    samples = G + std * torch.randn(n, b_big, d, generator=g, dtype=torch.float64)
    small = samples[:, :b_small].mean(1).square().sum(1)  # one device's batch
    big = samples.mean(1).square().sum(1)  # the all-reduced batch
    smoothed = TwoBatchNoiseScale(ema=0.995)
    for s, bg in zip(small.tolist(), big.tolist()):
        est = smoothed.update(s, bg, b_small, b_big)
    assert est.value == pytest.approx(true, rel=0.05)
    mean_est = two_batch_noise_scale(float(small.mean()), float(big.mean()), b_small, b_big)
    assert mean_est.value == pytest.approx(true, rel=0.05)
    assert mean_est.grad_sq_norm == pytest.approx(1.0, rel=0.05)
    # the per-sample estimator on one big batch of the same distribution
    one_batch = GradientMoments.from_samples({"g": samples[:50].reshape(-1, d)})
    assert gradient_noise_scale(one_batch).value == pytest.approx(true, rel=0.05)
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        two_batch_noise_scale(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match="ema"):
        TwoBatchNoiseScale(ema=1.0)
    restored = TwoBatchNoiseScale()
    restored.load_state_dict(smoothed.state_dict())
    assert restored.update(1.0, 0.5, 1, 2).value == smoothed.update(1.0, 0.5, 1, 2).value


# -- the callback -------------------------------------------------------------------------------------


def test_callback_logs_the_documented_tags_with_reference_values():
    torch.manual_seed(0)
    net = mlp((4, 6, 3))
    module = Classifier(net, lr=0.1)
    x, y = classification_data(32, (4,))
    callback = GradientNoise(every_n_steps=2, fixed_batch=True)
    recorder = Recorder()
    trainer(max_steps=4, callbacks=[callback], logger=recorder).fit(module, loader(x, y, batch_size=8))
    steps = [s for s, m in recorder.rows if "dynscope/noise/gsnr" in m]
    assert steps[-2:] == [2, 4]
    logged = [m for s, m in recorder.rows if s == 4 and "dynscope/noise/gsnr" in m][0]
    names = [n for n, _ in module.named_parameters()]
    expected = {"dynscope/noise/" + k for k in ("gsnr", "noise_scale", "noise_scale_over_batch", "critical_batch",
                                                "grad_norm")}
    expected |= {f"dynscope/noise/gsnr/{n}" for n in names} | {f"dynscope/noise/block_gsnr/{n}" for n in names}
    expected -= {f"dynscope/noise/block_gsnr/{n}" for n in names if module.get_parameter(n).numel() == 1}
    assert set(logged) == expected
    # step 4 is the last step: the weights now are the ones it measured, on the first batch (fixed)
    ref = numpy_stats({"net." + k: v for k, v in looped_grads(net, F.cross_entropy, x[:8], y[:8]).items()})
    assert logged["dynscope/noise/gsnr"] == pytest.approx(ref["gsnr"], rel=1e-3)
    assert logged["dynscope/noise/noise_scale"] == pytest.approx(ref["noise_scale"], rel=1e-4)
    # the smoothed estimate over the measurements (tests/test_noise_scale_smoothing.py), over the batch of 8
    assert logged["dynscope/noise/noise_scale_over_batch"] == pytest.approx(logged["dynscope/noise/critical_batch"] / 8)
    assert logged["dynscope/noise/grad_norm"] == pytest.approx(math.sqrt(ref["grad_sq_norm"]), rel=1e-5)
    for n in names:
        assert logged[f"dynscope/noise/gsnr/{n}"] == pytest.approx(ref["per_layer"][n], rel=1e-3)
    state = callback.state_dict()
    fresh = GradientNoise()
    fresh.load_state_dict(state)
    assert fresh.num_measurements == len(steps) and fresh.two_batch.state_dict() == callback.two_batch.state_dict()


class BatchLevel(Classifier):
    def dynscope_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)  # a scalar: not per sample


def test_callback_stops_with_a_clear_error_on_a_batch_level_loss():
    x, y = classification_data(16, (4,))
    with pytest.raises(LossProtocolError, match="dynscope_loss"):
        trainer(max_steps=2, callbacks=[GradientNoise(every_n_steps=1, strict=True)]).fit(BatchLevel(mlp()), loader(x, y, 8))
    dropped = GradientNoise(every_n_steps=1)  # not strict: dropped with the reason, training goes on
    run = trainer(max_steps=2, callbacks=[dropped])
    with pytest.warns(RuntimeWarning, match="dropped for the rest of this run: .*dynscope_loss"):
        run.fit(BatchLevel(mlp()), loader(x, y, 8))
    assert run.global_step == 2 and dropped.disabled
    with pytest.raises(LossProtocolError, match="BatchNorm"):
        trainer(max_steps=1, callbacks=[GradientNoise(mode="train")]).fit(
            Classifier(SmallCNN()), loader(*classification_data(8, (1, 8, 8)), 4)
        )
    for bad in (dict(method="loop"), dict(chunk_size=0), dict(memory_cap_mb=0), dict(two_batch_ema=1.5)):
        with pytest.raises(ValueError):
            GradientNoise(**bad)


def test_observer_effect_with_gradient_noise():
    baseline = trained_weights([], steps=12)
    measured = trained_weights([GradientNoise(every_n_steps=2)], steps=12)
    assert_same_weights(baseline, measured)


def test_observer_effect_in_train_mode_with_dropout():
    def net():
        return nn.Sequential(nn.Flatten(), mlp((64, 16, 3), dropout=0.3))

    baseline = trained_weights([], steps=8, net_factory=net)
    measured = trained_weights([GradientNoise(every_n_steps=1, mode="train")], steps=8, net_factory=net)
    assert_same_weights(baseline, measured)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_statistics_do_not_depend_on_how_they_are_split(monkeypatch, method):
    # Summaries run over pieces of PIECE coordinates and the per-sample moments over column blocks
    # of BLOCK_ELEMENTS; tiny sizes make every tensor span several, ragged ones included.
    import dynscope.persample as persample

    monkeypatch.setattr(persample, "PIECE", 3)
    monkeypatch.setattr(persample, "BLOCK_ELEMENTS", 20)
    torch.manual_seed(0)
    model = mlp((4, 6, 3)).double()
    x, y = classification_data(10, (4,))
    x = x.double()
    x[:, 1] = 0.0  # first-layer weights of input 1: zero variance, left out
    ref = numpy_stats(looped_grads(model, F.cross_entropy, x, y))
    obj = Objective(model, F.cross_entropy, (x, y))
    moments = per_sample_moments(obj, method, chunk_size=4)
    snr, noise = gradient_snr(moments), gradient_noise_scale(moments)
    assert snr.value == pytest.approx(ref["gsnr"], rel=1e-9)
    assert noise.value == pytest.approx(ref["noise_scale"], rel=1e-9)
    assert snr.num_coordinates == sum(p.numel() for p in model.parameters()) - 6
    for n, v in ref["per_layer"].items():
        assert snr.per_layer[n] == pytest.approx(v, rel=1e-9), n
        assert snr.block[n] == pytest.approx(ref["block"][n], rel=1e-9), n


def test_block_gsnr_of_a_constant_gradient_is_nan():
    g = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float64)  # mean (2, 2, 2)
    assert math.isnan(gradient_snr(GradientMoments.from_samples({"w": g})).block["w"])
    assert math.isnan(gradient_snr(GradientMoments.from_sums(2, {"w": g.sum(0)}, {"w": g.square().sum(0)})).block["w"])


def _moments_of(g, path):
    if path == "vmap":
        return GradientMoments.from_samples({"w": g})
    g = g.float()  # the hook path: float32 sums
    return GradientMoments.from_sums(g.shape[0], {"w": g.sum(0)}, {"w": g.square().sum(0)})


@pytest.mark.parametrize("path, rel", [("hooks", 1e-4), ("vmap", 1e-9)])
def test_block_gsnr_of_elements_with_a_common_offset(path, rel):
    # The elements of G share an offset 1e4 times their spread: mean(G**2) - mean(G)**2 cancels
    # (in float32 sums it is lost altogether). Several summary pieces, the last one ragged. The
    # hook path's pieces divide the float32 sums in float32: float32 accuracy there.
    torch.manual_seed(0)
    base = 1.0 + 1e-4 * torch.randn(200_003, dtype=torch.float64)
    moments = _moments_of(base * (1 + 0.01 * torch.randn(6, 1, dtype=torch.float64)), path)
    mean = moments.mean["w"].numpy()
    assert gradient_snr(moments).block["w"] == pytest.approx(np.linalg.norm(mean) / np.std(mean), rel=rel)


@pytest.mark.parametrize("path", ["hooks", "vmap"])
def test_block_gsnr_of_a_large_constant_gradient_is_nan(path):
    g = torch.full((4, 100_000), 0.3, dtype=torch.float64) + torch.randn(4, 1, dtype=torch.float64)
    moments = _moments_of(g, path)
    assert torch.unique(moments.mean["w"]).numel() == 1  # every element of G is the same
    assert math.isnan(gradient_snr(moments).block["w"])


def test_moments_survive_pickling():
    import pickle

    torch.manual_seed(0)
    model = mlp((4, 6, 3)).double()
    x, y = classification_data(10, (4,))
    moments = per_sample_moments(Objective(model, F.cross_entropy, (x.double(), y)))
    copy = pickle.loads(pickle.dumps(moments))
    assert list(copy.mean) == list(moments.mean) and copy.methods == moments.methods
    for name in moments.mean:
        assert torch.equal(copy.mean[name], moments.mean[name]) and torch.equal(copy.sq_dev[name], moments.sq_dev[name])
    assert gradient_snr(copy).value == gradient_snr(moments).value


def test_float32_statistics_agree_with_float64_numpy():
    # The hook path's summaries run in float32 for a float32 model (see GradientMoments.pieces).
    torch.manual_seed(0)
    model = mlp((4, 16, 3))
    x, y = classification_data(64, (4,))
    ref = numpy_stats(looped_grads(model, F.cross_entropy, x, y))
    moments = per_sample_moments(Objective(model, F.cross_entropy, (x, y)))
    assert set(moments.methods.values()) == {"hooks"}
    assert gradient_snr(moments).value == pytest.approx(ref["gsnr"], rel=1e-4)
    assert gradient_noise_scale(moments).value == pytest.approx(ref["noise_scale"], rel=1e-5)


def test_membership_in_lazy_moments_computes_nothing():
    calls = []
    g = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    moments = GradientMoments.from_sums(2, {"w": g.sum(0)}, {"w": g.square().sum(0)})
    import dynscope.persample as persample

    mean = persample._LazyTensors(["w"], lambda n: calls.append(n) or moments.mean[n])
    assert "w" in mean and "v" not in mean and not calls
    assert mean["w"].tolist() == [2.0, 3.5] and calls == ["w"]


def float64_loop_moments(model, sample_loss, batch):
    """Reference moments: a float64 copy of the model, one backward per sample."""
    import copy

    ref = copy.deepcopy(model).double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    return GradientMoments.from_samples(loop_reference(ref, sample_loss, batch))


def _mse_per_sample(model, batch):
    x, y = batch
    return (model(x) - y).square().reshape(x.shape[0], -1).mean(1)


@pytest.mark.parametrize("sequence", [False, True])
def test_fast_path_keeps_float32_accuracy_at_high_snr(sequence):
    # a regression head with offset targets: per-sample gradients ~1e4 times their spread. float32
    # sum g**2 - n mean**2 cancelled (per-layer GSNR 14% / 32% off); now vmap's accuracy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    shape = (64, 5) if sequence else (64,)
    x, y = torch.randn(*shape, 8), 300 + 0.01 * torch.randn(*shape, 1)
    obj = Objective(model, sample_loss_fn=_mse_per_sample, batch=(x, y))
    fast = per_sample_moments(obj)
    assert set(fast.methods.values()) == {"hooks"}
    ref = float64_loop_moments(model, _mse_per_sample, (x, y))
    got, want = gradient_snr(fast), gradient_snr(ref)
    assert want.value > 5000
    assert got.num_coordinates == want.num_coordinates
    for name in want.per_layer:
        assert math.isclose(got.per_layer[name], want.per_layer[name], rel_tol=1e-4), name
    assert math.isclose(gradient_noise_scale(fast).value, gradient_noise_scale(ref).value, rel_tol=1e-5)


class _SharedWeight(nn.Module):
    """``fc.weight`` is also used through ``F.linear`` on a LayerNorm output (zero row sums)."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.out = nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) + F.linear(self.ln(x), self.fc.weight))


def test_a_use_of_the_weight_the_hooks_do_not_see_is_caught():
    # the old check compared only row sums, which the LayerNorm use leaves unchanged: 5.6x off
    torch.manual_seed(0)
    model = _SharedWeight().double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    fast = per_sample_moments(Objective(model, sample_loss_fn=loss, batch=(x, y)))
    assert fast.methods["fc.weight"] != "hooks" and fast.methods["out.weight"] == "hooks"
    ref = GradientMoments.from_samples(loop_reference(model, loss, (x, y)))
    assert_close_dict(fast.sq_dev, ref.sq_dev, atol=1e-12, rtol=1e-9)


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_the_rounding_floor_keeps_coordinates_float32_resolves():
    # one input feature ~1e-4 of the others: its input weights' spread is 23-130 eps of the largest
    # in the module, resolved by float32 to 1e-7, partly under the old 64 eps floor (GSNR 0.2-0.3% off)
    torch.manual_seed(0)
    model = _Recurrent()
    x = torch.randn(16, 5, 3) * torch.tensor([1.0, 1.0, 1e-4])
    y = torch.randn(16, 1)
    obj = Objective(model, sample_loss_fn=_mse_per_sample, batch=(x, y))
    ref = float64_loop_moments(model, _mse_per_sample, (x, y))
    want = gradient_snr(ref)
    for method in ("auto", "vmap"):
        got = gradient_snr(per_sample_moments(obj, method))
        assert got.num_coordinates == want.num_coordinates == sum(p.numel() for p in model.parameters())
        assert math.isclose(got.value, want.value, rel_tol=1e-4)
        for name in want.per_layer:
            assert math.isclose(got.per_layer[name], want.per_layer[name], rel_tol=1e-4), name


def test_the_rounding_floor_drops_a_key_bias_that_is_zero_in_exact_arithmetic():
    # nn.Linear key projection (Hugging Face style): its bias gets a cancelling sum of the key's output
    # gradients, pure float noise; the floor is relative to the module (key.weight), not to the tensor
    class Attention(nn.Module):
        def __init__(self, dim=6):
            super().__init__()
            self.query, self.key, self.value, self.head = (nn.Linear(dim, dim) for _ in range(3)), None, None, None
            self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.head = nn.Linear(dim, 3)

        def forward(self, x):
            att = torch.softmax(self.query(x) @ self.key(x).transpose(1, 2), -1)
            return self.head((att @ self.value(x)).mean(1))

    torch.manual_seed(0)
    model = Attention()
    x, y = torch.randn(12, 5, 6), torch.randint(0, 3, (12,))
    obj = Objective(model, F.cross_entropy, (x, y))
    for method in ("auto", "vmap"):
        snr = gradient_snr(per_sample_moments(obj, method))
        assert math.isnan(snr.per_layer["key.bias"])
        assert snr.num_coordinates == sum(p.numel() for p in model.parameters()) - 6


def test_an_embedding_also_used_as_the_output_projection_is_not_hooked():
    # weight tying through F.linear (no second module): the graph has two uses, the hooks saw one
    class FunctionallyTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mix = nn.Embedding(7, 5), nn.Linear(5, 5)

        def forward(self, tokens):
            return F.linear(torch.tanh(self.mix(self.embed(tokens).mean(1))), self.embed.weight)

    torch.manual_seed(0)
    model = FunctionallyTied().double()
    x, y = torch.randint(0, 7, (8, 4)), torch.randint(0, 7, (8,))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    fast = per_sample_moments(Objective(model, sample_loss_fn=loss, batch=(x, y)))
    assert fast.methods["embed.weight"] != "hooks" and fast.methods["mix.weight"] == "hooks"
    ref = GradientMoments.from_samples(loop_reference(model, loss, (x, y)))
    assert_close_dict(fast.sq_dev, ref.sq_dev, atol=1e-12, rtol=1e-9)


class _Convs(nn.Module):
    """Convolutions the grouped per-sample rule must get right: asymmetric 'same' padding (even
    kernel), stride with dilation, and one layer called twice."""

    def __init__(self):
        super().__init__()
        self.even = nn.Conv1d(2, 3, 4, padding="same")  # pads 1 left, 2 right
        self.strided = nn.Conv2d(1, 2, 3, stride=2, dilation=2, padding=2)
        self.twice = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(3 + 2, 1)

    def forward(self, batch):
        seq, image = batch
        a = torch.tanh(self.even(seq)).mean(2)
        b = self.twice(torch.tanh(self.twice(torch.tanh(self.strided(image))))).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


def _conv_batch(offset=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    seq, image = torch.randn(10, 2, 7, generator=g, dtype=dtype), torch.randn(10, 1, 9, 9, generator=g, dtype=dtype)
    y = offset + (0.1 if offset else 1.0) * torch.randn(10, 1, generator=g, dtype=dtype)
    return seq, image, y


def _conv_loss(model, batch):
    seq, image, y = batch
    return (model((seq, image)) - y).square()[:, 0]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped kernel", "unfold"])
def test_convolution_rule_equals_a_per_sample_loop(grouped, monkeypatch):
    import dynscope.persample as persample

    if not grouped:  # the CUDA branch (unfold + batched GEMM), here on the CPU
        monkeypatch.setattr(persample, "GROUPED_CONV_DEVICES", ())
    torch.manual_seed(0)
    model = _Convs().double()
    batch = _conv_batch()
    fast = per_sample_moments(Objective(model, sample_loss_fn=_conv_loss, batch=batch))
    assert set(fast.methods.values()) == {"hooks"}
    ref = GradientMoments.from_samples(loop_reference(model, _conv_loss, batch))
    assert_close_dict(fast.mean, ref.mean, atol=1e-13, rtol=1e-10)
    assert_close_dict(fast.sq_dev, ref.sq_dev, atol=1e-13, rtol=1e-9)
    tiny = per_sample_moments(Objective(model, sample_loss_fn=_conv_loss, batch=batch), memory_cap=1)  # a sample a chunk
    assert_close_dict(tiny.sq_dev, ref.sq_dev, atol=1e-13, rtol=1e-9)


def test_convolution_rule_keeps_float32_accuracy_at_high_snr():
    # targets offset 30 with spread 0.1: per-sample conv gradients ~1e2-1e3 times their spread (shifted sums)
    torch.manual_seed(0)
    model = _Convs()
    batch = _conv_batch(offset=30.0, dtype=torch.float32)
    fast = per_sample_moments(Objective(model, sample_loss_fn=_conv_loss, batch=batch))
    assert set(fast.methods.values()) == {"hooks"}
    ref = float64_loop_moments(model, _conv_loss, batch)
    got, want = gradient_snr(fast), gradient_snr(ref)
    assert want.value > 1000
    assert got.num_coordinates == want.num_coordinates
    for name in want.per_layer:
        assert math.isclose(got.per_layer[name], want.per_layer[name], rel_tol=1e-4), name
    assert math.isclose(gradient_noise_scale(fast).value, gradient_noise_scale(ref).value, rel_tol=1e-5)


def rel_error(got, want):
    return float(((got - want).abs() / want).max())


def test_hot_rows_of_a_linear_layer_are_recomputed_and_the_rest_kept():
    # half the outputs regress onto offset targets (SNR ~1e4: float32's s2 - s1**2/n would cancel),
    # half onto noise (SNR < 1: float32 is exact enough); each half must match the float64 loop
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x = 1 + 0.01 * torch.randn(48, 6)  # nearly equal hidden features: the weight rows inherit the targets' SNR
    y = torch.cat([300 + 0.01 * torch.randn(48, 2), torch.randn(48, 2)], 1)
    obj = Objective(model, sample_loss_fn=_mse_per_sample, batch=(x, y))
    fast = per_sample_moments(obj)
    assert set(fast.methods.values()) == {"hooks"}
    ref = float64_loop_moments(model, _mse_per_sample, (x, y))
    mean, var = ref.mean["2.weight"], ref.sq_dev["2.weight"] / (ref.count - 1)
    per_row = (mean.square() / var).mean(1)
    assert bool((per_row[:2] > 1e3).all()) and bool((per_row[2:] < 10).all())  # hot rows and cool rows
    samples = per_sample_moments(obj, "vmap")  # float32 per-sample gradients: what float32 can resolve
    for name in ref.sq_dev:
        error, floor = (rel_error(m.sq_dev[name], ref.sq_dev[name]) for m in (fast, samples))
        assert error < 1e-3 and error < 2 * floor + 1e-5, (name, error, floor)  # float32 s2 - s1**2/n: up to 180
    got, want = gradient_snr(fast), gradient_snr(ref)
    for name in want.per_layer:
        assert math.isclose(got.per_layer[name], want.per_layer[name], rel_tol=1e-4), name


def test_the_probe_runs_once_per_model_and_call_structure(monkeypatch):
    import dynscope.persample as persample

    probes = []
    real = persample._call_shapes
    monkeypatch.setattr(persample, "_call_shapes", lambda *a: probes.append(1) or real(*a))
    torch.manual_seed(0)
    model = mlp((4, 6, 3))
    x, y = classification_data(10, (4,))
    first = per_sample_moments(Objective(model, F.cross_entropy, (x, y)))
    again = per_sample_moments(Objective(model, F.cross_entropy, (x, y)))
    assert len(probes) == 1 and again.methods == first.methods == {n: "hooks" for n in first.methods}
    assert_close_dict(again.sq_dev, first.sq_dev, atol=0, rtol=0)
    per_sample_moments(Objective(model, F.cross_entropy, (x[:7], y[:7])))  # another batch size: probed
    assert len(probes) == 2


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("batch_elements", [1, 40, 1 << 17])
def test_batched_summaries_match_a_per_sample_loop(monkeypatch, method, batch_elements):
    # Small tensors are summarised in batched passes over their concatenation (groups of up to
    # BATCH_ELEMENTS coordinates); dead ReLU units and a zero input feature give zero-variance
    # coordinates in several modules, each with its own rounding floor.
    import dynscope.noise as noise

    monkeypatch.setattr(noise, "BATCH_ELEMENTS", batch_elements)
    torch.manual_seed(1)
    model = mlp((5, 7, 6, 3)).double()
    with torch.no_grad():
        model[0].bias[:2] = -50.0  # two dead units: their rows of the next layer and their own get no gradient
    x, y = classification_data(12, (5,))
    x = x.double()
    x[:, 3] = 0.0
    grads = looped_grads(model, F.cross_entropy, x, y)
    ref = numpy_stats(grads)
    moments = per_sample_moments(Objective(model, F.cross_entropy, (x, y)), method)
    snr, noise_scale = gradient_snr(moments), gradient_noise_scale(moments)
    assert snr.value == pytest.approx(ref["gsnr"], rel=1e-9)
    assert noise_scale.value == pytest.approx(ref["noise_scale"], rel=1e-9)
    for n, v in ref["per_layer"].items():
        assert snr.per_layer[n] == pytest.approx(v, rel=1e-9, nan_ok=True), n
        assert snr.block[n] == pytest.approx(ref["block"][n], rel=1e-9, nan_ok=True), n
    varying = sum(int((g.var(0) > 1e-20).sum()) for g in grads.values())  # float64: exact zeros, or well above
    assert snr.num_coordinates == varying < sum(p.numel() for p in model.parameters()) - (10 + 2 + 12 + 5)


def test_batched_summaries_equal_piecewise_ones_in_float32():
    # The hook path's float32 sums: the batched pass and the piece-by-piece one agree to float32 rounding.
    import dynscope.noise as noise

    torch.manual_seed(2)
    model = mlp((6, 16, 16, 4))
    x, y = classification_data(32, (6,))
    moments = per_sample_moments(Objective(model, F.cross_entropy, (x, y)))
    noise._summaries(moments)
    batched = dict(moments.__dict__.pop("_summaries"))
    for name in moments.mean:
        one = noise._summary(moments, name)
        b = batched[name]
        assert one.snr_count == b.snr_count, name
        for field in ("snr_sum", "sq_dev_sum", "sq_norm", "block_gsnr"):
            assert getattr(b, field) == pytest.approx(getattr(one, field), rel=1e-5, nan_ok=True), (name, field)


def test_moments_are_not_overwritten_by_a_later_measurement():
    # Temporaries come from buffers reused across calls; nothing a result holds may live there.
    torch.manual_seed(3)
    model = mlp((6, 16, 4))
    (xa, ya), (xb, yb) = classification_data(16, (6,)), classification_data(16, (6,))
    first = per_sample_moments(Objective(model, F.cross_entropy, (xa, ya)))
    raw = {n: (r.total.clone(), r.sq_dev.clone()) for n, r in first.sums.items()}
    assert raw and set(first.methods.values()) == {"hooks"}
    before = gradient_snr(first).value
    second = per_sample_moments(Objective(model, F.cross_entropy, (xb, yb)))
    gradient_snr(second), gradient_noise_scale(second)
    for n, (total, sq_dev) in raw.items():
        assert torch.equal(first.sums[n].total, total) and torch.equal(first.sums[n].sq_dev, sq_dev), n
    first.__dict__.pop("_summaries")
    assert gradient_snr(first).value == before
