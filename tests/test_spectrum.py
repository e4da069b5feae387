"""Spectral density (stochastic Lanczos quadrature), lambda_min and block eigenvalues against eigvalsh."""


import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dynscope import Objective, lambda_min, spectral_density
from dynscope.callbacks import Curvature
from dynscope.spectrum import BlockOperator
from dynscope.trace import RademacherProbes
from models import Classifier, classification_data, loader, mlp, trainer
from reference import exact_hessian


def _objective(sizes=(4, 6, 3), n=32):
    torch.manual_seed(0)
    x, y = classification_data(n, (sizes[0],))
    return Objective(mlp(sizes).double(), F.cross_entropy, (x.double(), y))


def test_slq_is_exact_per_probe_and_estimates_the_normalised_moments():
    obj = _objective()
    H = exact_hessian(obj).double()
    ev, U = torch.linalg.eigh(H)
    n = H.shape[0]
    # with m = n steps each probe's quadrature is exact: moments equal v^T H^p v / |v|^2 for every p
    dens = spectral_density(obj, num_probes=6, num_steps=n, seed=3)
    v = RademacherProbes(6, n, 3).rows(0, 6).double()
    for p in (0, 1, 2, 3, 4):
        exact = float(((v @ U) ** 2 * ev**p).sum(1).mean() / n)
        assert dens.moment(p) == pytest.approx(exact, rel=1e-8, abs=1e-12), p
    assert dens.mass() == pytest.approx(1.0, abs=1e-12)
    # with few steps the quadrature is still exact for degrees <= 2m - 1
    short = spectral_density(obj, num_probes=6, num_steps=3, seed=3)
    for p in range(6):
        assert short.moment(p) == pytest.approx(dens.moment(p), rel=1e-8, abs=1e-12), p
    assert short.moment(8) != pytest.approx(dens.moment(8), rel=1e-3)
    # many probes: the moments estimate tr(H^p) / n, the mass in an interval the fraction of eigenvalues
    many = spectral_density(H, num_probes=400, num_steps=n, seed=0)  # the dense matrix: same estimator, fast
    for p in (1, 2):
        assert many.moment(p) == pytest.approx(float((ev**p).sum() / n), rel=0.1)
    cut = float(ev[n // 2])
    frac = float((ev <= cut).double().mean())
    assert many.mass(high=cut + 1e-12) == pytest.approx(frac, abs=0.08)
    counts = many.histogram([float(ev[0]) - 1, cut + 1e-12, float(ev[-1]) + 1])
    assert float(counts.sum()) == pytest.approx(n, rel=1e-9)
    grid = torch.linspace(float(ev[0]) - 1, float(ev[-1]) + 1, 2001, dtype=torch.float64)
    smooth = many.density(grid, sigma=0.05)
    assert float(torch.trapezoid(smooth, grid)) == pytest.approx(1.0, abs=1e-3)


def test_lambda_min_and_block_eigenvalues():
    obj = _objective()
    H = exact_hessian(obj).double()
    assert lambda_min(obj, tol=1e-8, max_iter=200).value == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), rel=1e-5,
                                                                        abs=1e-8)
    from dynscope import HessianOperator, top_eigenvalues

    op = HessianOperator(obj)
    for name, sl in obj.layout.slices().items():
        got = top_eigenvalues(BlockOperator(op, sl), which="LA", tol=1e-8, max_iter=200).value
        assert got == pytest.approx(float(torch.linalg.eigvalsh(H[sl, sl])[-1]), rel=1e-5, abs=1e-9), name


def test_density_histogram_lands_in_tensorboard(tmp_path):
    x, y = classification_data(32, (4,))
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    torch.manual_seed(0)
    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen_max_iter=5, density=True, density_probes=2, density_steps=8)
    trainer(max_steps=2, callbacks=[cb], logger=logger).fit(Classifier(mlp((4, 6, 3)), lr=0.1), loader(x, y))
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert "dynscope/curvature/spectral_density" in acc.Tags()["histograms"]
    hist = acc.Histograms("dynscope/curvature/spectral_density")
    assert [h.step for h in hist] == [1, 2]
    assert sum(hist[-1].histogram_value.bucket) == pytest.approx(51, rel=1e-6)  # counts: n eigenvalues


def test_density_histogram_in_the_html_report(tmp_path):
    from dynscope.dashboards.report import write_report

    x, y = classification_data(32, (4,))
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    torch.manual_seed(0)
    cb = Curvature(every_n_steps=2, num_matvecs=2, eigen_max_iter=5, density=True, density_probes=2, density_steps=8)
    trainer(max_steps=4, callbacks=[cb], logger=logger).fit(Classifier(mlp((4, 6, 3)), lr=0.1), loader(x, y))
    page = open(write_report(str(tmp_path), str(tmp_path / "r.html"))).read()
    curvature = page[page.index('id="curvature"'):]
    assert "dynscope/curvature/spectral_density: eigenvalue counts at steps 1, 4" in curvature
    assert "<code>density_moment2</code>" in curvature
