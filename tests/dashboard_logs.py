"""Logs of a short real dynscope run for the dashboard, report and browser tests.

A Lightning run with the real ``Curvature`` callback plus stand-in callbacks (``DiagnosticCallback``
subclasses returning synthetic values) for the other groups, so every group travels the real
path: ``setup`` writes the layout, values go through the trainer's TensorBoard logger, and a
stand-in mitigation switches on through ``log_mitigation_event``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import pytest
import torch.nn.functional as F

import pytorch_lightning as pl
from dynscope.callbacks import Curvature, DiagnosticCallback
from dynscope.callbacks.dashboard import log_mitigation_event
from dynscope.callbacks.logging import log_scalars
from models import Classifier, classification_data, loader, mlp, trainer

LAYERS = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")


class Synthetic(DiagnosticCallback):
    """A diagnostic of ``group`` whose values are ``values(step)`` (stands in for other callbacks)."""

    def __init__(self, group: str, values, **kwargs):
        super().__init__(every_n_steps=1, **kwargs)
        self.group = group
        self.values = values

    @property
    def state_key(self) -> str:
        return f"Synthetic[{self.group}]"

    def measure(self, trainer, pl_module, batch):
        return self.values(trainer.global_step)


class SyntheticMitigation(DiagnosticCallback):
    """Switches StableMax on when the synthetic collapse fraction crosses 0.3; logs the overhead."""

    group = "collapse"
    dashboard_groups = ("mitigation", "overhead")

    def __init__(self, switch_step: int):
        super().__init__(every_n_steps=1)
        self.switch_step = switch_step
        self.active = False

    def measure(self, trainer, pl_module, batch):
        step = trainer.global_step
        if step >= self.switch_step and not self.active:
            self.active = True
            log_mitigation_event(trainer, "stablemax", True, "softmax collapse 0.31 > 0.30", {"sc_fraction": 0.31})
        log_scalars(trainer, {"dynscope/mitigation/stablemax": float(self.active), "dynscope/overhead": 0.05}, step)
        return {}


def noise(step):
    out = {"gsnr": 0.6 * math.exp(-step / 6) + 0.05, "noise_scale": 8.0 + 3.0 * step, "grad_norm": 1.0 / (1 + step)}
    out["noise_scale_over_batch"] = out["noise_scale"] / 16.0
    out.update({f"gsnr/{name}": (i + 1) * 0.1 * out["gsnr"] for i, name in enumerate(LAYERS)})
    out.update({f"block_gsnr/{name}": 2.0 + i + math.sin(step) for i, name in enumerate(LAYERS)})
    return out


def collapse(step):
    sc = 1.0 / (1.0 + math.exp(-(step - 8)))
    out = {"sc_fraction": sc, "zero_loss_fraction": 0.8 * sc, "nlm_cos": 0.1 * step - 0.4,
           "max_logit_gap": 2.0 + step, "train_accuracy": min(1.0, 0.4 + 0.08 * step)}
    out.update({f"nlm_cos/{name}": 0.1 * step - 0.1 * i for i, name in enumerate(LAYERS)})
    return out


def regions(step):
    base = 30.0 - 10 * math.sin(step / 3)
    out = {"lc_train": base, "lc_test": base + 4, "lc_random": base / 2}
    out.update({f"lc_train/{name}": base / (i + 1) for i, name in enumerate(("net.1", "net.3"))})
    return out


def gva(step):
    return {"amplification": 1.0 + 0.5 * step, "metric": math.sin(step) + step * 0.1, "metric_ema": step * 0.1,
            "loss": 1.1 / (1 + step)}


class Watched(Classifier):
    """The user's module logs its own loss and accuracy (the dashboards' "Training" group)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("train_acc", (self(x).argmax(-1) == y).float().mean())
        return super().training_step(batch, batch_idx)


def attention(step):
    out = {"max_logit": 2.0 + 0.5 * step, "entropy_min": 1.0 / (1 + step), "entropy_mean": 2.0 - 0.05 * step}
    out.update({f"max_logit/blocks.{i}.attn": (1.0 + i) * (1.0 + 0.3 * step) for i in range(2)})
    return out


def output_logits(step):
    return {"log_z_mean": 4.0 + step, "log_z_max": 6.0 + step, "log_z_min": 3.0 + step, "log_z_drift": float(step),
            "max_logit": 5.0 + step, "z_loss": (4.0 + step) ** 2}


def spikes(step):
    out = {"loss_zscore": -1.0 + 0.1 * step}
    if step == 7:
        out.update(detected=1.0, zscore=9.0, loss=3.0, lambda_max=12.0, opposition=0.8, grad_projection=0.1,
                   top_positive=2.0, top_negative=-1.5, projection_std=0.7)
    return out


@dataclass
class RunLogs:
    root: str  # what ``tensorboard --logdir`` / ``dynscope report`` get
    log_dir: str  # the run's own directory (root/run/version_0)
    callbacks: List[object]
    max_steps: int


def write_run_logs(root, max_steps: int = 14, name: str = "run") -> RunLogs:
    """Train a tiny MLP with dynscope for ``max_steps``."""
    pl.seed_everything(0, verbose=False)
    x, y = classification_data(64)
    callbacks = [
        Curvature(every_n_steps=2, loss_fn=F.cross_entropy, num_matvecs=8, eigen_max_iter=12),
        Synthetic("noise", noise),
        Synthetic("collapse", collapse),
        Synthetic("regions", regions),
        Synthetic("gva", gva),
        Synthetic("attention", attention),
        Synthetic("logits", output_logits),
        Synthetic("spikes", spikes),
        SyntheticMitigation(switch_step=9),
    ]
    logger = pl.loggers.TensorBoardLogger(str(root), name=name, default_hp_metric=False)
    run = trainer(max_steps=max_steps, logger=logger, callbacks=callbacks, log_every_n_steps=1)
    run.fit(Watched(mlp(), lr=0.3), loader(x, y, batch_size=16))
    logger.experiment.flush()
    return RunLogs(str(root), logger.log_dir, callbacks, max_steps)


@pytest.fixture(scope="session")
def run_logs(tmp_path_factory) -> RunLogs:
    """One short dynscope run shared by the dashboard, report and browser tests."""
    return write_run_logs(tmp_path_factory.mktemp("dynscope-run"))
