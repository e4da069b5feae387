"""The Curvature callback's stability ratios, spectrum options and sharpness conventions in real runs,
against exact Hessians."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from dynscope import Objective
from dynscope.callbacks import Curvature
from dynscope.optim import CoordinateClip
from models import Classifier, SmallCNN, classification_data, loader, mlp, trainer
from reference import exact_hessian


class Module(Classifier):
    def __init__(self, net, make_optimizer):
        super().__init__(net)
        self.make_optimizer = make_optimizer

    def configure_optimizers(self):
        return self.make_optimizer(self)


def _fit(net, make_optimizer, callback, steps, x, y, batch_size=32):
    torch.manual_seed(0)
    module = Module(net, make_optimizer)
    trainer(max_steps=steps, callbacks=[callback]).fit(module, loader(x, y, batch_size=batch_size))
    return module


def _flat_state(module, key):
    opt = module.trainer.optimizers[0]
    return torch.cat([opt.state[p][key].reshape(-1).double() for _, p in module.net.named_parameters()])


def test_adam_ratio_uses_the_bias_corrected_preconditioner_exactly():
    x, y = classification_data(32, (4,))
    torch.manual_seed(0)
    net = mlp((4, 6, 3))
    cb = Curvature(every_n_steps=3, num_matvecs=2, eigen_tol=1e-8, eigen_max_iter=200, sharpness=False)
    module = _fit(net, lambda m: torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.9, 0.99)), cb, 3, x, y)
    H = exact_hessian(Objective(module.net, F.cross_entropy, (x, y))).double()
    v = _flat_state(module, "exp_avg_sq")
    P = (1 - 0.9**3) * ((v / (1 - 0.99**3)).sqrt() + 1e-8)
    d = P.rsqrt()
    pre = float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1])
    m = cb.last_metrics
    assert m["preconditioned_lambda_max"] == pytest.approx(pre, rel=1e-5)
    assert m["eos_threshold"] == pytest.approx(3.8 / (0.1 * 0.01))
    assert m["eos_ratio"] == pytest.approx(pre / m["eos_threshold"], rel=1e-5)


def test_adam_with_conv_bias_before_batchnorm_and_an_idle_head_is_not_inflated():
    # issue 20 item 8 (bias before BatchNorm: no gradient in train mode, curvature in eval mode) and
    # issue 16 item 7 (an unused trainable parameter): the ratio is logged and matches P^-1 H where
    # the gradients behind P were computed (BatchNorm on batch statistics), coordinates never moved left out
    class Net(SmallCNN):
        def __init__(self):
            super().__init__(channels=2)
            self.idle = nn.Linear(3, 3)  # trainable, never used

    x, y = classification_data(32, (1, 8, 8))
    cb = Curvature(every_n_steps=4, num_matvecs=2, eigen_tol=1e-8, eigen_max_iter=300, sharpness=False)
    torch.manual_seed(0)
    module = _fit(Net(), lambda m: torch.optim.Adam(m.parameters(), lr=0.01), cb, 4, x, y)
    m = cb.last_metrics
    assert "eos_ratio" in m and "preconditioned_lambda_max" in m
    opt = module.trainer.optimizers[0]
    names = [n for n, _ in module.net.named_parameters()]
    params = dict(module.net.named_parameters())
    scale = []
    for n in names:
        st = opt.state.get(params[n], {})
        if "exp_avg_sq" not in st:
            scale.append(torch.zeros(params[n].numel(), dtype=torch.float64))
            continue
        v = st["exp_avg_sq"].reshape(-1).double()
        P = (1 - 0.9**4) * ((v / (1 - 0.999**4)).sqrt() + 1e-8)
        scale.append(torch.where(v > 0, P.rsqrt(), torch.zeros_like(v)))
    d = torch.cat(scale)
    assert "idle.weight" not in [n for n in names if opt.state.get(params[n])]
    H_train = exact_hessian(Objective(module.net, F.cross_entropy, (x, y), mode="train")).double()
    pre = float(torch.linalg.eigvalsh(d[:, None] * H_train * d[None, :])[-1])
    assert m["preconditioned_lambda_max"] == pytest.approx(pre, rel=1e-4)
    # measured on the eval-mode Hessian the conv bias (v ~ rounding, P ~ eps) would blow it up
    H_eval = exact_hessian(Objective(module.net, F.cross_entropy, (x, y))).double()
    inflated = float(torch.linalg.eigvalsh(d[:, None] * H_eval * d[None, :])[-1])
    assert inflated > 100 * pre
    # measuring with batch statistics changed nothing: weights and BatchNorm buffers as without the callback
    torch.manual_seed(0)
    bare = _fit(Net(), lambda m: torch.optim.Adam(m.parameters(), lr=0.01), pl.Callback(), 4, x, y)
    for key, value in bare.state_dict().items():
        assert torch.equal(value, module.state_dict()[key]), key
    assert all(m.track_running_stats for m in module.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize(
    "make, threshold",
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True), 13.5714),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.5), 76.0),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01), 38.0 - 0.01),
    ],
    ids=["nesterov", "dampening", "weight-decay"],
)
def test_sgd_settings_in_the_callback(make, threshold):
    x, y = classification_data(32, (4,))
    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen_tol=1e-8, eigen_max_iter=200, sharpness=False)
    module = _fit(mlp((4, 6, 3)), make, cb, 2, x, y)
    H = exact_hessian(Objective(module.net, F.cross_entropy, (x, y))).double()
    lam = float(torch.linalg.eigvalsh(H)[-1])
    m = cb.last_metrics
    assert m["eos_threshold"] == pytest.approx(threshold, rel=1e-4)
    wd = 0.01 if threshold == pytest.approx(37.99) else 0.0
    assert m["eos_ratio"] == pytest.approx((lam + wd) / (threshold + wd), rel=1e-5)


def test_param_groups_with_their_own_lr_get_the_ratio_of_the_scaled_hessian():
    x, y = classification_data(32, (4,))
    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen_tol=1e-8, eigen_max_iter=200, sharpness=False)

    def make(m):
        return torch.optim.SGD([{"params": m.net[0].parameters(), "lr": 0.3},
                                {"params": m.net[2].parameters(), "lr": 0.05}], momentum=0.5)

    module = _fit(mlp((4, 6, 3)), make, cb, 2, x, y)
    H = exact_hessian(Objective(module.net, F.cross_entropy, (x, y))).double()
    s = torch.cat([torch.full((p.numel(),), (0.3 if n.startswith("0.") else 0.05) / 3.0, dtype=torch.float64)
                   for n, p in module.net.named_parameters()])
    ratio = float(torch.linalg.eigvalsh(s.sqrt()[:, None] * H * s.sqrt()[None, :])[-1])
    m = cb.last_metrics
    assert m["eos_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert "eos_threshold" not in m  # no single threshold on lambda_max
    first = torch.tensor([n.startswith("0.") for n, p in module.net.named_parameters() for _ in range(p.numel())])
    for g, mask in enumerate((first, ~first)):
        block = (s.sqrt()[:, None] * H * s.sqrt()[None, :])[mask][:, mask]
        assert m[f"eos_ratio/group{g}"] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-5)


def test_unsupported_optimizer_warns_once_and_logs_no_ratio():
    x, y = classification_data(32, (4,))
    cb = Curvature(every_n_steps=1, num_matvecs=2, eigen_max_iter=5, sharpness=False)
    with pytest.warns(RuntimeWarning, match="NAdam has no derived edge-of-stability threshold") as rec:
        _fit(mlp((4, 6, 3)), lambda m: torch.optim.NAdam(m.parameters(), lr=0.01), cb, 3, x, y, batch_size=8)
    assert sum("NAdam" in str(w.message) for w in rec) == 1
    assert "lambda_max" in cb.last_metrics and "eos_ratio" not in cb.last_metrics


def test_spectrum_options_match_eigvalsh():
    x, y = classification_data(32, (4,))
    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen_tol=1e-10, eigen_max_iter=200, sharpness=False,
                   num_eigenvalues=3, lambda_min=True, layer_eigen=True, density=True, density_probes=8,
                   density_steps=51)
    module = _fit(mlp((4, 6, 3)), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), cb, 2, x, y)
    H = exact_hessian(Objective(module.net, F.cross_entropy, (x, y))).double()
    ev = torch.linalg.eigvalsh(H)
    m = cb.last_metrics
    for i in range(3):
        assert m[f"eigenvalues/{i}"] == pytest.approx(float(ev[-1 - i]), rel=1e-5, abs=1e-7)
    assert m["lambda_min"] == pytest.approx(float(ev[0]), rel=1e-4, abs=1e-6)
    start = 0
    for n, p in module.net.named_parameters():
        block = H[start:start + p.numel(), start:start + p.numel()]
        start += p.numel()
        assert m[f"lambda_max/net.{n}"] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-5, abs=1e-7)
    # 51 Lanczos steps on 51 parameters: the nodes are the eigenvalues, each probe's quadrature exact
    dens = cb.last_density
    assert dens.mass() == pytest.approx(1.0, abs=1e-12)
    assert m["density_mass_negative"] == pytest.approx(dens.mass(high=-1e-12), abs=1e-12)


def test_update_sharpness_of_coordinate_clip_and_its_unclipped_update():
    x, y = classification_data(32, (4,))
    rec = {}

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}

    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen=False, fixed_batch=True)
    torch.manual_seed(0)
    module = Module(mlp((4, 6, 3)), lambda m: CoordinateClip(torch.optim.Adam(m.parameters(), lr=0.05), fraction=0.2))
    trainer(max_steps=2, callbacks=[Snap(), cb]).fit(module, loader(x, y, batch_size=32))
    u = torch.cat([(rec[2][n] - rec[1][n]).reshape(-1) for n in rec[2]]).double()
    clip = module.trainer.optimizers[0]
    raw = torch.cat([clip.last_update[id(p)].reshape(-1) for p in module.net.parameters()]).double()
    assert not torch.allclose(u, raw)
    assert int((u.abs() < raw.abs() - 1e-9).sum()) == round(0.2 * u.numel())  # the top 20% were clipped
    net = mlp((4, 6, 3))
    net.load_state_dict(rec[1])
    H_t = exact_hessian(Objective(net, F.cross_entropy, (x, y))).double()
    m = cb.last_metrics
    assert m["update_sharpness"] == pytest.approx(float(u @ H_t @ u / (u @ u)), rel=1e-4)
    assert m["update_sharpness_unclipped"] == pytest.approx(float(raw @ H_t @ raw / (raw @ raw)), rel=1e-4)


def test_eval_batches_give_full_batch_quantities_and_the_mean_batch_sharpness():
    x, y = classification_data(32, (4,))
    cb = Curvature(every_n_steps=4, num_matvecs=2, eigen_tol=1e-8, eigen_max_iter=200, eval_batches=4)
    module = _fit(mlp((4, 6, 3)), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), cb, 4, x, y, batch_size=8)
    H = exact_hessian(Objective(module.net, F.cross_entropy, (x, y))).double()  # the 4 batches of 8 = all 32
    m = cb.last_metrics
    assert m["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5)
    sharp = []
    for i in range(4):
        obj = Objective(module.net, F.cross_entropy, (x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]))
        Hb = exact_hessian(obj).double()
        g = torch.cat([v.reshape(-1) for v in obj.gradient().values()]).double()
        sharp.append(float(g @ Hb @ g / (g @ g)))
    assert m["batch_sharpness"] == pytest.approx(sum(sharp) / 4, rel=1e-5)
    assert m["batch_sharpness_ratio"] == pytest.approx(m["batch_sharpness"] * 0.1 / 2, rel=1e-12)


class Regressor(pl.LightningModule):
    def __init__(self, d, lr):
        super().__init__()
        self.net = nn.Linear(d, 1, bias=False)
        self.lr = lr
        self.criterion = nn.MSELoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = self.criterion(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_linear_stability_ratio_on_stable_runs_at_batch_1_and_32(batch_size):
    from test_stability import _mean_square_boundary
    from dynscope.stability import linear_stability_ratio

    g = torch.Generator().manual_seed(0)
    N, d = 64, 6
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=1, keepdim=True) * math.sqrt(d)
    Y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64)  # interpolating minimum
    boundary, H = _mean_square_boundary(X * math.sqrt(2.0), batch_size)  # MSE: H_i = 2 x_i x_i^T
    lr = 0.8 * boundary
    torch.manual_seed(0)
    module = Regressor(d, lr).double()
    steps = 3 * N // batch_size
    cb = Curvature(every_n_steps=steps, num_matvecs=2 * d, method="xtrace", eigen_tol=1e-10, eigen_max_iter=50,
                   sharpness=False, eval_batches=N // batch_size)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))
    trainer(max_steps=steps, callbacks=[cb]).fit(module, data)
    ev = torch.linalg.eigvalsh(H)
    m = cb.last_metrics
    assert m["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-6)  # the eval set is the whole data set
    expected = linear_stability_ratio(lr, float(ev[-1]), float(ev.sum()), batch_size, N)
    assert m["linear_stability_ratio"] == pytest.approx(expected, rel=1e-6)
    assert m["linear_stability_ratio"] < 1.0
    final = float(((X @ module.net.weight.detach().T - Y) ** 2).mean())
    assert final < 1e-2 * float((Y**2).mean())  # the run is stable and converges
    if batch_size == 32:
        assert m["trace_ratio"] > 1.0  # the single-sample bound would call this stable run unstable
    else:
        assert m["linear_stability_ratio"] == pytest.approx(m["trace_ratio"], rel=1e-6)


def test_eval_data_from_the_validation_loader():
    x, y = classification_data(48, (4,))
    xv, yv = classification_data(16, (4,), seed=5)
    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen_tol=1e-8, eigen_max_iter=200, sharpness=False,
                   eval_batches=2, eval_data="val")
    torch.manual_seed(0)
    module = Module(mlp((4, 6, 3)), lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    trainer(max_steps=2, callbacks=[cb], num_sanity_val_steps=0, limit_val_batches=1).fit(
        module, loader(x, y, batch_size=8), loader(xv, yv, batch_size=8))
    H = exact_hessian(Objective(module.net, F.cross_entropy, (xv, yv))).double()
    assert cb.last_metrics["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5)
    # without validation data: a warning, and the training batches instead
    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen_max_iter=5, sharpness=False, eval_batches=2, eval_data="val")
    with pytest.warns(RuntimeWarning, match="no validation data"):
        _fit(mlp((4, 6, 3)), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), cb, 2, x, y, batch_size=8)
    assert len(cb._eval) == 2 and "lambda_max" in cb.last_metrics


def test_inside_dynscope_the_evaluation_batches_are_collected_then_the_callback_idles():
    """DynScope skips diagnostics that are idle between measurements; Curvature is not idle until it has
    its evaluation batches (the first 4 training batches here: then it measures the Hessian of all 32)."""
    from dynscope.callbacks import DynScope

    x, y = classification_data(32, (4,))
    scope = DynScope(loss_fn=F.cross_entropy, budget=None, noise=False, collapse=False, regions=False,
                     curvature=dict(every_n_steps=8, method="hutchinson", num_matvecs=2, eigen_tol=1e-8,
                                    eigen_max_iter=200, sharpness=False, eval_batches=4, sub_batch=None))
    cb = scope.callbacks["curvature"]
    assert not cb.idle_between_measurements
    module = _fit(mlp((4, 6, 3)), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), scope, 8, x, y, batch_size=8)
    assert cb.idle_between_measurements and len(cb._eval) == 4
    H = exact_hessian(Objective(module.net, F.cross_entropy, (x, y))).double()
    assert cb.last_metrics["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-5)
