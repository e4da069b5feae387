"""Every code block of the README runs as written, with a tiny model and data filled in.

The Python blocks are executed in order in one namespace that holds what the README leaves to the
reader: ``model`` (an ordinary LightningModule that calls ``F.cross_entropy``, nothing
dynscope-specific), ``datamodule`` (8x8 "digits"-shaped data, 10 classes) and ``x, y`` (a batch).
The LightningCLI YAML block is given to ``LightningCLI`` as a config file and fitted.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def blocks(language):
    text = open(README, encoding="utf-8").read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


class Digits(pl.LightningDataModule):
    """64 samples of 8x8 inputs, 10 classes, two batches per epoch."""

    def __init__(self, n: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=32)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x[:32], self.y[:32]), batch_size=32)


class Ordinary(pl.LightningModule):
    """What a user has before dynscope: F.cross_entropy in training_step, nothing else."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 3 and len(blocks("yaml")) == 1


def test_every_python_block_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks log to ./runs
    torch.manual_seed(0)
    datamodule = Digits()
    x, y = datamodule.x[:16], datamodule.y[:16]
    namespace = {"model": Ordinary(), "datamodule": datamodule, "x": x, "y": y, "__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and log intervals
        for number, source in enumerate(blocks("python")):
            code = compile(source, f"README.md python block {number + 1}", "exec")
            exec(code, namespace)  # noqa: S102 - the README is this repository's own text
    # the Quickstart trained the ordinary module for 10 epochs, with dynscope watching
    assert namespace["trainer"].current_epoch == 10
    assert os.path.isdir(tmp_path / "runs")
    # the last block (the core without Lightning) computed a trace on the filled-in model and batch
    from dynscope import Objective, hessian_trace

    reference = hessian_trace(Objective(namespace["model"], F.cross_entropy, (x, y)), num_matvecs=32, method="hutch++")
    assert torch.isfinite(torch.tensor(reference.value))


def test_the_yaml_block_configures_lightning_cli(tmp_path):
    pytest.importorskip("jsonargparse")
    from pytorch_lightning.cli import LightningCLI

    from dynscope.callbacks import DynScope

    (yaml,) = blocks("yaml")
    config = tmp_path / "config.yaml"
    config.write_text(yaml + "  max_steps: 4\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n")
    cli = LightningCLI(Switchable, Digits, args=["--config", str(config)], run=False, save_config_callback=None)
    scope = next(c for c in cli.trainer.callbacks if isinstance(c, DynScope))
    assert scope.loss_fn is F.cross_entropy and scope.budget == 0.05 and scope.mitigate == ("stablemax",)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4


class Switchable(Ordinary):
    """The YAML asks for StableMax: the module keeps its loss in a dynscope.nn.CrossEntropy, as the README says."""

    def __init__(self, hidden: int = 32):
        super().__init__(hidden)
        from dynscope.nn import CrossEntropy

        self.criterion = CrossEntropy()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.criterion(self(x), y)
