"""Local complexity against hand counts, and the LinearRegions callback."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from models import Classifier, Recorder, SmallCNN, classification_data, loader, mlp, trainer
from observer import assert_same_weights, trained_weights

from dynscope import NotPiecewiseLinearWarning, local_complexity, orthonormal_directions
from dynscope.callbacks import LinearRegions


def one_hidden_1d(weights, biases) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(1, len(weights)), nn.ReLU(), nn.Linear(len(weights), 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(weights, dtype=torch.float64)[:, None])
        net[0].bias.copy_(torch.tensor(biases, dtype=torch.float64))
    return net


def hand_count_1d(w, b, xs, r, kinks=(0.0,)):
    """#{j : the interval [x - r, x + r] has w_j x' + b_j strictly on both sides of a kink}."""
    counts = []
    for x in xs:
        n = 0
        for wj, bj in zip(w, b):
            if any(abs(wj * x + bj - k) < r * abs(wj) for k in kinks):
                n += 1
        counts.append(n)
    return np.array(counts, dtype=np.float64)


# -- the core metric -------------------------------------------------------------------------------
def test_one_hidden_layer_1d_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(64, generator=g).tolist(), torch.randn(64, generator=g).tolist()
    net = one_hidden_1d(w, b)
    xs = torch.randn(40, 1, generator=g, dtype=torch.float64)
    for r in (0.05, 0.3, 1.0):
        lc = local_complexity(net, xs, r, 1)
        expected = hand_count_1d(w, b, xs[:, 0].tolist(), r)
        assert list(lc.per_layer) == ["1"] and lc.neurons == {"1": 64}
        np.testing.assert_array_equal(lc.per_point_layer["1"].numpy(), expected)
        np.testing.assert_array_equal(lc.per_point.numpy(), expected)
        assert lc.total == pytest.approx(expected.mean(), abs=1e-12)
        assert lc.fraction_per_layer["1"] == pytest.approx(expected.mean() / 64, abs=1e-12)
    assert 0 < local_complexity(net, xs, 0.3, 1).total < 64  # the radii above are not degenerate


def test_full_cross_polytope_first_layer_closed_form_and_chunking():
    torch.manual_seed(0)
    net = mlp((3, 32, 2)).double()
    xs = torch.randn(25, 3, dtype=torch.float64)
    w, b = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    for directions in (3, 2):  # the full cross-polytope, then a 2-D slice of it
        v = orthonormal_directions(3, directions, seed=4).numpy()
        reach = np.abs(w @ v.T).max(1)  # max_k |w_j . v_k|: how far the vertices move pre-activation j
        r = 0.4
        expected = (np.abs(xs.numpy() @ w.T + b) < r * reach).sum(1).astype(np.float64)
        for chunk in (1, 7, None):
            lc = local_complexity(net, xs, r, directions, seed=4, chunk_size=chunk)
            np.testing.assert_array_equal(lc.per_point.numpy(), expected)


def test_default_forwards_keep_their_pre_activations_within_the_bound_and_count_as_one_forward_would():
    # a conv net with 4x16x16 + 8 pre-activations a vertex (1056 float32 = 4224 bytes): at 8 directions
    # (16 vertices a point) and a 256 KiB bound, 3 points (48 vertices) a forward after the first point
    import dynscope.regions as regions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 8), nn.ReLU(),
                        nn.Linear(8, 2))
    xs = torch.randn(10, 1, 16, 16)
    rows = []
    handle = net.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
    bound = regions.ACTIVATION_BYTES_PER_FORWARD
    try:
        regions.ACTIVATION_BYTES_PER_FORWARD = 256 * 1024
        lc = local_complexity(net, xs, 0.1, 8, seed=1)
        first, rows[:] = list(rows), []
        again = local_complexity(net, xs, 0.1, 8, seed=1)  # the model's size is known: no lone first point
    finally:
        regions.ACTIVATION_BYTES_PER_FORWARD = bound
        handle.remove()
    per_point = 16 * (4 * 16 * 16 + 8) * 4
    assert first == [16, 48, 48, 48]  # one point, then 256 KiB // 67584 bytes = 3 points a forward
    assert max(first[1:]) // 16 * per_point <= 256 * 1024
    assert rows == [48, 48, 48, 16]
    whole = local_complexity(net, xs, 0.1, 8, seed=1, chunk_size=len(xs))  # one forward of all 160 vertices
    np.testing.assert_array_equal(lc.per_point.numpy(), whole.per_point.numpy())
    np.testing.assert_array_equal(again.per_point.numpy(), whole.per_point.numpy())


def test_layer_that_never_changes_sign_counts_zero():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    with torch.no_grad():
        net[2].weight.mul_(0.01)
        net[2].bias.copy_(torch.tensor([50.0, -50.0, 40.0, -40.0, 60.0, -60.0]))
    xs = torch.rand(30, 2, dtype=torch.float64) * 2 - 1
    lc = local_complexity(net, xs, 0.5, 2)
    assert list(lc.per_layer) == ["1", "3"]
    assert torch.equal(lc.per_point_layer["3"], torch.zeros(30, dtype=torch.float64))
    assert lc.per_layer["3"] == 0.0 and lc.fraction_per_layer["3"] == 0.0
    assert lc.per_layer["1"] > 0
    only_first = local_complexity(net, xs, 0.5, 2, layers=["1"])
    assert list(only_first.per_layer) == ["1"]
    assert torch.equal(only_first.per_point, lc.per_point_layer["1"])


def test_kinks_of_other_piecewise_linear_activations():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(16, generator=g) * 2).tolist()
    b = (torch.randn(16, generator=g) * 2).tolist()
    xs = torch.randn(30, 1, generator=g, dtype=torch.float64)
    for act, kinks in (
        (nn.Hardtanh(-1.0, 2.0), (-1.0, 2.0)),
        (nn.ReLU6(), (0.0, 6.0)),
        (nn.LeakyReLU(0.1), (0.0,)),
        (nn.PReLU(), (0.0,)),
    ):
        net = one_hidden_1d(w, b)
        net[1] = act.double()
        lc = local_complexity(net, xs, 0.7, 1)
        expected = hand_count_1d(w, b, xs[:, 0].tolist(), 0.7, kinks)
        np.testing.assert_array_equal(lc.per_point.numpy(), expected, err_msg=type(act).__name__)


def test_small_radius_tends_to_neurons_through_the_point():
    # hyperplanes w x + b = 0 through x = 0.5 for neurons 0, 1, 2 (exact in binary); 3, 4 are far
    w, b = [1.0, 2.0, -4.0, 0.5, 3.0], [-0.5, -1.0, 2.0, 0.3, 1.0]
    net = one_hidden_1d(w, b)
    x = torch.tensor([[0.5]], dtype=torch.float64)
    counts = []
    for r in (2.0, 0.5, 0.1, 1e-3, 1e-9):
        lc = local_complexity(net, x, r, 1)
        assert lc.total == hand_count_1d(w, b, [0.5], r)[0]
        counts.append(lc.total)
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 5 and counts[-1] == 3


def test_a_vertex_exactly_on_the_kink_does_not_count():
    net = one_hidden_1d([1.0], [-1.0])  # kink at x = 1
    x = torch.tensor([[0.5]], dtype=torch.float64)
    assert local_complexity(net, x, 0.5, 1).total == 0.0  # vertices 0 and 1: pre-activations -1 and 0
    assert local_complexity(net, x, 0.5 + 2**-20, 1).total == 1.0


def cnn_reference(layers, xs, directions, r):
    """Explicit loop: each vertex alone through the layers, sign change per unit among the vertices."""
    counts = [[] for _ in layers]
    for x in xs:
        pres = [[] for _ in layers]
        for v in directions:
            for sign in (1.0, -1.0):
                h = (x.flatten() + sign * r * v).reshape(1, *x.shape)
                for i, layer in enumerate(layers):
                    pre = layer(h)
                    pres[i].append(pre.flatten())
                    h = F.relu(pre)
        for i in range(len(layers)):
            stacked = torch.stack(pres[i])
            counts[i].append(float(((stacked.amin(0) < 0) & (stacked.amax(0) > 0)).sum()))
    return [np.array(c) for c in counts]


def test_cnn_counts_every_channel_and_position():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)
    ).double()
    xs = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    lc = local_complexity(net, xs, 0.3, 5, seed=7)
    assert lc.neurons == {"1": 3 * 4 * 4, "3": 2 * 2 * 2}
    with torch.no_grad():
        expected = cnn_reference([net[0], net[2]], xs, orthonormal_directions(16, 5, seed=7), 0.3)
    np.testing.assert_array_equal(lc.per_point_layer["1"].numpy(), expected[0])
    np.testing.assert_array_equal(lc.per_point_layer["3"].numpy(), expected[1])
    assert lc.total > 0


def test_functional_relu_in_a_batchnorm_cnn_in_eval_mode_leaves_the_model_alone():
    torch.manual_seed(0)
    net = SmallCNN(dropout=0.3).double()
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        net(torch.randn(32, 1, 8, 8, dtype=torch.float64) * 3 + 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xs = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="functional=True"):
        local_complexity(net, xs, 0.2, 3)
    lc = local_complexity(net, xs, 0.2, 3, functional=True)
    assert list(lc.per_layer) == ["relu"] and lc.neurons == {"relu": 4 * 8 * 8}
    net.eval()
    with torch.no_grad():
        expected = cnn_reference([lambda h: net.bn(net.conv(h))], xs, orthonormal_directions(64, 3), 0.2)
    net.train()
    np.testing.assert_array_equal(lc.per_point.numpy(), expected[0])
    assert all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.act = nn.ReLU()
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.mid(h))  # the same module twice
        return self.out(F.relu(h - 0.1) + torch.relu(h))


def test_layer_names_for_reused_modules_and_functional_calls():
    torch.manual_seed(0)
    net = Blocks().double()
    xs = torch.randn(10, 3, dtype=torch.float64)
    hooks = local_complexity(net, xs, 0.3, 3)
    assert list(hooks.per_layer) == ["act", "act@2"]
    both = local_complexity(net, xs, 0.3, 3, functional=True)
    assert list(both.per_layer) == ["act", "act@2", "relu", "relu@2"]
    for name in ("act", "act@2"):
        assert torch.equal(hooks.per_point_layer[name], both.per_point_layer[name])
    with torch.no_grad():  # F.relu(h - 0.1) crosses when h crosses 0.1: check against the act@2 input
        h1 = F.relu(net.inp(xs))
        v = orthonormal_directions(3, 3)
        vertices = torch.cat([xs[:, None] + 0.3 * v, xs[:, None] - 0.3 * v], 1)
        h2 = net.mid(F.relu(net.inp(vertices)))
        pre = F.relu(h2) - 0.1
        expected = ((pre.amin(1) < 0) & (pre.amax(1) > 0)).sum(1).double()
    assert h1.shape == (10, 6)
    assert torch.equal(both.per_point_layer["relu"], expected)


class GeluAndRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(F.gelu(F.relu(self.a(x))))


def test_smooth_activations_warn_once_and_are_not_applicable():
    model = mlp((3, 8, 2), act=nn.GELU)
    xs = torch.randn(5, 3)
    with pytest.warns(NotPiecewiseLinearWarning, match="GELU"):
        lc = local_complexity(model, xs, 0.1, 2)
    assert not lc.applicable and math.isnan(lc.total) and torch.isnan(lc.per_point).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(local_complexity(model, xs, 0.1, 2).total)
    with pytest.warns(NotPiecewiseLinearWarning, match="gelu"):
        mixed = local_complexity(GeluAndRelu(), xs, 0.1, 2, functional=True)
    assert not mixed.applicable and math.isnan(mixed.per_layer["relu"])


def test_bad_input_gets_a_clear_error():
    net = mlp((3, 4, 2))
    xs = torch.randn(5, 3)
    with pytest.raises(ValueError, match="no piecewise-linear activation"):
        local_complexity(nn.Sequential(nn.Linear(3, 2)), xs, 0.1, 2)
    with pytest.raises(ValueError, match="no piecewise-linear activation"):
        local_complexity(nn.Sequential(nn.Linear(3, 2)), xs, 0.1, 2, functional=True)
    with pytest.raises(ValueError, match="continuous inputs"):
        local_complexity(net, torch.ones(5, 3, dtype=torch.long), 0.1, 2)
    with pytest.raises(ValueError, match="radius"):
        local_complexity(net, xs, 0.0, 2)
    with pytest.raises(ValueError, match="num_directions"):
        local_complexity(net, xs, 0.1, 4)
    with pytest.raises(ValueError, match=r"unknown layers \['2'\]"):
        local_complexity(net, xs, 0.1, 2, layers=["2"])
    with pytest.raises(ValueError, match="leading batch dimension"):
        local_complexity(net, torch.randn(3), 0.1, 2)


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


@pytest.mark.parametrize("functional", [False, True])
def test_hooks_removed_and_modes_restored_after_an_exception(functional):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), Boom())
    net.train()
    net[2].eval()
    with pytest.raises(RuntimeError, match="boom"):
        local_complexity(net, torch.randn(4, 3), 0.1, 2, functional=functional)
    for m in net.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
    assert [m.training for m in net.modules()] == [True, True, True, False, True]
    assert torch._C._len_torch_function_stack() == 0


def test_directions_are_orthonormal_seeded_and_leave_the_global_rng_alone():
    rng = torch.get_rng_state()
    v = orthonormal_directions(10, 4, seed=3)
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.allclose(v @ v.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(v, orthonormal_directions(10, 4, seed=3))
    assert not torch.allclose(v, orthonormal_directions(10, 4, seed=4))
    v[0, 0] = 100.0  # callers get copies: the cache is not corrupted
    assert orthonormal_directions(10, 4, seed=3)[0, 0] != 100.0


# -- the callback --------------------------------------------------------------------------------------
class Validated(Classifier):
    def validation_step(self, batch, batch_idx):
        return self.criterion(self(batch[0]), batch[1])


def fit(callback, with_val=True, steps=6, net=None):
    torch.manual_seed(0)
    module = Validated(net or mlp((4, 16, 16, 3)), lr=0.1)
    x, y = classification_data(64, (4,), seed=0)
    xv, yv = classification_data(32, (4,), seed=1)
    recorder = Recorder()
    t = trainer(max_steps=steps, callbacks=[callback], logger=recorder, limit_val_batches=1)
    t.fit(module, loader(x, y, shuffle=True), loader(xv, yv) if with_val else None)
    return module, recorder, (x, xv)


def rows_of(points, data):
    return all(any(torch.equal(p, row) for row in data) for p in points)


def test_linear_regions_logs_train_test_random_with_fixed_points():
    callback = LinearRegions(
        radii=[0.3], num_directions=3, num_points=20, num_test_points=10, num_random_points=12,
        schedule="steps", every_n_steps=3,
    )
    module, recorder, (x, xv) = fit(callback)
    base = "dynscope/regions/"
    expected = {f"{base}lc_{s}{layer}" for s in ("train", "test", "random") for layer in ("", "/net.1", "/net.3")}
    assert expected <= set(recorder.scalars)
    assert [step for step, _ in recorder.scalars[base + "lc_train"]] == [1, 3, 6]
    assert callback.train_points.shape == (20, 4) and rows_of(callback.train_points, x)
    assert callback.test_points.shape == (10, 4) and rows_of(callback.test_points, xv)
    low, high = callback.train_points.amin(0), callback.train_points.amax(0)
    assert callback.random_points.shape == (12, 4)
    assert bool(((callback.random_points >= low) & (callback.random_points <= high)).all())
    for name, points in (("train", callback.train_points), ("random", callback.random_points)):
        final = local_complexity(module, points, 0.3, 3)  # the last measurement is at the final weights
        assert recorder.scalars[f"{base}lc_{name}"][-1][1] == pytest.approx(final.total)
        assert recorder.scalars[f"{base}lc_{name}/net.3"][-1][1] == pytest.approx(final.per_layer["net.3"])

    restored = LinearRegions()
    restored.load_state_dict(callback.state_dict())
    assert torch.equal(restored.train_points, callback.train_points)
    assert torch.equal(restored.random_points, callback.random_points)


def test_several_radii_get_suffixes_and_no_val_loader_means_no_lc_test():
    callback = LinearRegions(radii=[0.1, 0.5], num_directions=2, num_points=8, num_random_points=4,
                             per_layer=True, schedule="steps", every_n_steps=100)
    _, recorder, _ = fit(callback, with_val=False, steps=2)
    tags = set(recorder.scalars)
    for r in ("0.1", "0.5"):
        assert {f"dynscope/regions/lc_train/r={r}", f"dynscope/regions/lc_random/r={r}",
                f"dynscope/regions/lc_train/net.1/r={r}"} <= tags
    assert not any("lc_test" in t for t in tags)
    assert "dynscope/regions/lc_train" not in tags
    small, large = (recorder.scalars[f"dynscope/regions/lc_train/r={r}"][0][1] for r in ("0.1", "0.5"))
    assert small <= large  # nested neighbourhoods along the same directions


def test_linear_regions_fails_early_without_activation_modules_and_skips_smooth_models():
    with pytest.raises(ValueError, match="functional=True"):
        fit(LinearRegions(num_directions=2, schedule="steps", every_n_steps=1),
            net=nn.Sequential(nn.Linear(4, 3)), steps=1)
    callback = LinearRegions(num_directions=2, num_points=8, schedule="steps", every_n_steps=1)
    with pytest.raises(ValueError, match=r"smooth activations \(GELU at 'net.1'\), so no linear regions"):
        fit(callback, net=mlp((4, 8, 3), act=nn.GELU), steps=3)  # at setup, before any training step


def test_smooth_functional_activations_drop_linear_regions_with_a_true_message():
    class GeluInForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    callback = LinearRegions(num_directions=2, num_points=8, schedule="steps", every_n_steps=1, functional=True)
    with pytest.warns(RuntimeWarning) as caught:
        _, recorder, _ = fit(callback, net=GeluInForward(), steps=3)
    messages = [str(w.message) for w in caught if "LinearRegions" in str(w.message)]
    assert len(messages) == 1 and "dropped for the rest of this run" in messages[0] and "NaN" not in messages[0]
    assert not any(issubclass(w.category, NotPiecewiseLinearWarning) for w in caught)
    assert callback.disabled and callback.num_measurements == 1
    assert not any(t.startswith("dynscope/regions") for t in recorder.scalars)


def test_dynscope_drops_linear_regions_of_a_gelu_model_and_the_report_has_no_regions_section(tmp_path):
    import torch.nn.functional as F

    from dynscope.callbacks import DynScope
    from dynscope.dashboards.report import write_report

    scope = DynScope(loss_fn=F.cross_entropy, budget=None, curvature=False, noise=False,
                     collapse={"every_n_steps": 1}, regions={"every_n_steps": 1, "num_points": 4})
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="gelu", default_hp_metric=False)
    x, y = classification_data(32, (4,), seed=0)
    with pytest.warns(RuntimeWarning, match="regions does not apply .* smooth activations"):
        trainer(max_steps=2, callbacks=[scope], logger=logger).fit(Validated(mlp((4, 8, 3), act=nn.GELU)), loader(x, y))
    logger.experiment.flush()
    assert list(scope.callbacks) == ["collapse"]
    page = open(write_report(str(tmp_path), str(tmp_path / "r.html")), encoding="utf-8").read()
    assert "Linear regions" not in page and "Softmax collapse" in page


def test_linear_regions_every_step_leaves_training_bit_identical():
    baseline = trained_weights([])
    callback = LinearRegions(
        radii=[0.2], num_directions=4, num_points=16, num_random_points=8, functional=True,
        schedule="steps", every_n_steps=3, strict=True,
    )
    measured = trained_weights([callback])
    assert_same_weights(baseline, measured)
    assert callback.num_measurements == 11 and "lc_train/net.relu" in callback.last_metrics


def test_the_pilot_fits_a_fixed_and_a_per_point_cost_and_touches_nothing():
    class Clock:  # the test says what each timed call costs: 1 s fixed plus 0.25 s per point
        def __init__(self):
            self.now, self.calls = 0.0, 0

        def __call__(self):
            self.calls += 1
            if self.calls % 2 == 0:  # the reading after a call
                self.now += 1.0 + 0.25 * (2 if self.calls == 2 else 6)
            return self.now

    torch.manual_seed(0)
    net = mlp((4, 8, 3))
    module = Classifier(net)
    callback = LinearRegions(radii=(0.1, 0.2), num_points=8, num_test_points=4, num_random_points=0)
    callback.train_points, callback.test_points = torch.randn(8, 4), torch.randn(4, 4)
    before = {n: p.clone() for n, p in net.named_parameters()}
    rng = torch.get_rng_state()
    rate = callback.pilot(None, module, None, Clock(), batch_size=16)
    # two radii, a call for 8 training and one for 4 test points: 2 * ((1 + 8/4) + (1 + 4/4)) = 10 s
    assert rate == pytest.approx(10.0 / callback.expected_cost(16))
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng) and callback.num_measurements == 0
    # a first call's one-time work (the forward that sizes a model's forwards, new shapes) is paid by an
    # untimed call of one point before the timer is read: the timed calls are the 2- and 6-point ones
    import sys

    regions_module = sys.modules[LinearRegions.__module__]
    seen, clock, real = [], Clock(), regions_module.local_complexity

    def recording(model, points, *args, **kwargs):
        seen.append((len(points), clock.calls))
        return real(model, points, *args, **kwargs)

    regions_module.local_complexity = recording
    try:
        callback.pilot(None, Classifier(mlp((4, 8, 3))), None, clock, batch_size=16)
    finally:
        regions_module.local_complexity = real
    assert seen == [(1, 0), (2, 1), (6, 3)]
    smooth = Classifier(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)))
    callback.functional = True
    with pytest.warns(RuntimeWarning, match="no linear regions"):
        assert callback.pilot(None, smooth, None, Clock(), batch_size=16) is None  # nothing to time: dropped
    assert callback.disabled
