"""Pre-batched map-style data: ``DataLoader(batch_size=None)`` over a dataset whose items are batches."""

import torch
from models import Classifier, Recorder, classification_data, mlp, trainer

from dynscope import local_complexity
from dynscope.callbacks import DynScope, LinearRegions
from dynscope.callbacks.regions import sample_inputs


class Batches(torch.utils.data.Dataset):
    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return len(self.x) // self.size

    def __getitem__(self, i):
        return self.x[i * self.size : (i + 1) * self.size], self.y[i * self.size : (i + 1) * self.size]


def test_linear_regions_reads_pre_batched_items_as_batches():
    torch.manual_seed(0)
    x, y = classification_data(64, (4,))
    loader = torch.utils.data.DataLoader(Batches(x, y, 8), batch_size=None)
    module = Classifier(mlp((4, 8, 3)))
    points = sample_inputs(loader, module, 12, seed=0)
    assert points.shape == (12, 4)
    assert all(any(torch.equal(p, row) for row in x) for p in points)  # real samples, not stacked batches

    recorder = Recorder()
    callback = LinearRegions(every_n_steps=2, num_points=12, num_test_points=0, num_random_points=4, strict=True)
    trainer(max_steps=4, callbacks=[callback], logger=recorder).fit(module, loader)
    logged = recorder.scalars["dynscope/regions/lc_train"]
    assert len(logged) >= 2
    assert callback.train_points.shape == (12, 4)
    expected = local_complexity(module, callback.train_points, callback.radii[0], 4, seed=callback.seed)
    assert logged[-1][1] == expected.total


def test_dynscope_keeps_linear_regions_on_pre_batched_data():
    torch.manual_seed(0)
    x, y = classification_data(64, (4,))
    loader = torch.utils.data.DataLoader(Batches(x, y, 8), batch_size=None)
    recorder = Recorder()
    scope = DynScope(budget=None, strict=True, curvature=False, noise=False, collapse=False,
                     regions={"every_n_steps": 2, "num_points": 12, "num_test_points": 0})
    trainer(max_steps=4, callbacks=[scope], logger=recorder).fit(Classifier(mlp((4, 8, 3))), loader)
    assert "dynscope/regions/lc_train" in recorder.scalars
