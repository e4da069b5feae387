"""Acceptance: AutoStableMax() at its defaults rescues generalisation on the main demo's task.

Modular addition mod 71 with the demo's model (bias-free ReLU MLP, full-batch AdamW, float32, no
weight decay). Seeded; each run stops once the question is answered.
"""

from __future__ import annotations

import pytest
import torch
import pytorch_lightning as pl

from dynscope.callbacks import AutoStableMax, SoftmaxCollapse
from dynscope.callbacks._lightning import CallbackBase
from dynscope.cli.demo_grokking import RepeatedBatch, make_module, modular_addition

P, WIDTH, LR, EVERY = 71, 128, 1e-2, 10
WITHIN = 300  # steps after the trigger


class TestAccuracy(CallbackBase):
    """Test accuracy every EVERY steps; stops once it reaches 95% after the trigger, or WITHIN steps after it."""

    def __init__(self, watcher, stop_at: int):
        self.watcher, self.stop_at, self.history, self.recovered = watcher, stop_at, [], None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % EVERY:
            return
        with torch.no_grad():
            self.history.append((step, float((module(module.test_x).argmax(1) == module.test_y).float().mean())))
        fired = getattr(self.watcher, "triggered_step", None)
        if fired is not None and self.recovered is None and self.history[-1][1] >= 0.95:
            self.recovered = step
            trainer.should_stop = True
        if step >= self.stop_at or (fired is not None and step >= fired + WITHIN):
            trainer.should_stop = True


def grok(seed: int, watcher, steps: int = 1000):
    torch.set_num_threads(1)
    train, test = modular_addition(P, 0.4, seed)
    torch.manual_seed(seed)
    module = make_module(P, WIDTH, LR, test, None, eval_every=EVERY)
    accuracy = TestAccuracy(watcher, steps)
    trainer = pl.Trainer(max_steps=steps, max_epochs=1, callbacks=[watcher, accuracy], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(module, torch.utils.data.DataLoader(RepeatedBatch(*train, steps), batch_size=None))
    return accuracy


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_autostablemax_defaults_reach_95_percent_within_300_steps_of_the_trigger(seed):
    watcher = AutoStableMax()
    accuracy = grok(seed, watcher)
    assert watcher.triggered_step is not None, "AutoStableMax() never fired"
    assert "fitted and aligned" in watcher.reason and watcher.trigger_values["nlm_cos"] >= 0.5
    assert watcher.applied == ["stablemax", "orthograd", "rescale", "reset_optimizer"]
    assert accuracy.recovered is not None and accuracy.recovered - watcher.triggered_step <= WITHIN, accuracy.history


def test_the_control_run_stays_at_chance():
    accuracy = grok(0, SoftmaxCollapse(every_n_steps=EVERY), steps=450)
    chance = 1 / P
    assert len(accuracy.history) == 45 and max(acc for _, acc in accuracy.history[5:]) < 2 * chance


def test_the_demo_command_runs_and_prints_its_verdicts(tmp_path, capsys):
    from dynscope.cli.main import main

    assert main(["demo", "--p", "11", "--width", "16", "--steps", "30", "--every", "10", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "verdict" in out and "AutoStableMax()" in out and "Honest note" not in out
