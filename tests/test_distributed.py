"""DynScope under Lightning's DDP with 2 CPU processes (gloo) against 1 process on the same global
batch; faults on one rank only (a NaN loss, an exception and an out-of-memory error inside the HVP, a
per-sample check that fails on one shard, AutoEMA's metric raising): each skipped or dropped on every
rank alike; the budget's decisions under DDP; sharded strategies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from dynscope.callbacks import Curvature, DynScope

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_run.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def run(tmp_path, name, devices, *args, timeout=300):
    """Run tests/ddp_run.py; returns the report of every rank. A hang fails the test (timeout)."""
    out = tmp_path / name
    env = dict(os.environ, PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1")
    # its own session, so that a hang is ended with every rank (Lightning starts rank 1 as a child)
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "--devices", str(devices), "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{name}: the ranks hung (no result after {timeout} s)")
    assert process.returncode == 0, stderr[-3000:]
    return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(devices)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return run(tmp, "single", 1)[0], run(tmp, "ddp", 2)


def test_two_processes_log_what_one_process_logs_on_the_same_global_batch(reference):
    single, (rank0, rank1) = reference
    assert rank0["world_size"] == 2
    assert rank0["weights_sum"] == pytest.approx(single["weights_sum"], rel=1e-6)
    logged, expected = rank0["scalars"], single["scalars"]
    assert set(logged) - set(expected) == {"dynscope/noise/noise_scale_two_batch"}
    compared = 0
    for tag, rows in expected.items():
        if tag.startswith("dynscope/overhead"):
            continue
        assert [s for s, _ in logged[tag]] == [s for s, _ in rows], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in rows], rel=1e-3, abs=1e-6), tag
        compared += len(rows)
    for tag in ("curvature/hessian_trace", "curvature/lambda_max", "noise/gsnr", "noise/noise_scale",
                "collapse/sc_fraction", "collapse/nlm_cos", "regions/lc_train", "gva/amplification"):
        assert f"dynscope/{tag}" in logged
    assert compared > 100
    # the mitigation switched on both ranks at the same step
    assert rank0["stablemax_step"] == rank1["stablemax_step"] == single["stablemax_step"] is not None
    assert rank0["criterion_mode"] == rank1["criterion_mode"] == "stablemax"
    assert rank0["ema_step"] == rank1["ema_step"] == single["ema_step"] is not None
    assert rank0["ema_weights_sum"] == rank1["ema_weights_sum"] == pytest.approx(single["ema_weights_sum"], rel=1e-6)
    assert rank0["measurements"] == rank1["measurements"] == single["measurements"]


def test_a_fault_on_one_rank_is_skipped_on_every_rank_and_training_goes_on(tmp_path, reference):
    _, (clean, _) = reference
    rank0, rank1 = run(tmp_path, "poisoned", 2, "--poison-step", "4")
    steps = {tag: [s for s, _ in rows] for tag, rows in rank0["scalars"].items()}
    assert 4 not in steps["dynscope/curvature/hessian_trace"] and 6 in steps["dynscope/curvature/hessian_trace"]
    assert 4 not in steps["dynscope/noise/gsnr"] and 6 in steps["dynscope/noise/gsnr"]
    assert 4 in steps["dynscope/collapse/sc_fraction"]  # the logits were fine
    # the training itself is unaffected (the EMA started at another step: the skipped check counted)
    assert rank0["online_weights_sum"] == rank1["online_weights_sum"] == clean["online_weights_sum"]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """One 2-process run with a failure on rank 1 only at each step of ddp_run.FAULTS (and in the per-sample
    check of the first noise measurement). Before the fix it aborted at the first one or hung."""
    return run(tmp_path_factory.mktemp("faults"), "faults", 2, "--faults", "--steps", "12", timeout=180)


def steps_of(report, tag):
    return [s for s, _ in report["scalars"].get(f"dynscope/{tag}", [])]


@pytest.mark.parametrize("case", ["hvp_error", "hvp_oom", "per_sample_check", "ema_metric"])
def test_a_failure_on_one_rank_is_skipped_or_dropped_on_every_rank_alike(faults, case):
    rank0, rank1 = faults
    assert rank0["global_step"] == rank1["global_step"] == 12  # training went on to the end
    assert rank0["measurements"] == rank1["measurements"]
    assert rank0["online_weights_sum"] == rank1["online_weights_sum"]
    curvature = steps_of(rank0, "curvature/hessian_trace")
    if case == "hvp_error":
        assert 2 not in curvature and {1, 6, 8, 10, 12} <= set(curvature)
    elif case == "hvp_oom":
        assert 4 not in curvature and {1, 6, 8, 10, 12} <= set(curvature)
    elif case == "per_sample_check":  # the class-weighted loss is no per-sample mean: dropped on both ranks
        assert "noise" not in rank0["measurements"] and "noise" not in rank1["measurements"]
        assert not steps_of(rank0, "noise/gsnr")
    else:
        assert rank0["ema_step"] == rank1["ema_step"] == 6
        # the shadow EMA is evaluated from the start; step 10 (the fault, EMA on) skipped on both ranks
        assert steps_of(rank0, "gva/metric_ema") == [2, 4, 6, 8, 12]
        assert steps_of(rank0, "gva/metric") == [2, 4, 6, 8, 12]


def test_under_a_budget_every_rank_measures_at_the_same_steps(tmp_path):
    rank0, rank1 = run(tmp_path, "budget", 2, "--budget", "0.05", "--steps", "40")
    assert rank0["measurements"] == rank1["measurements"]
    assert "dynscope/overhead" in rank0["scalars"]


def test_sharded_strategies_disable_dynscope_with_a_clear_warning():
    from pytorch_lightning.strategies import FSDPStrategy

    fake = SimpleNamespace(strategy=FSDPStrategy(), loggers=[], is_global_zero=True, world_size=2)
    callback = Curvature()
    with pytest.warns(RuntimeWarning, match="FSDPStrategy strategy shards the parameters"):
        callback.setup(fake, torch.nn.Linear(2, 2), "fit")
    assert callback.disabled and not callback.wants(1)
    with pytest.raises(RuntimeError, match="shards the parameters"):
        Curvature(strict=True).setup(fake, torch.nn.Linear(2, 2), "fit")
    scope = DynScope()
    with pytest.warns(RuntimeWarning, match="shards"):
        scope.setup(fake, torch.nn.Linear(2, 2), "fit")
    assert all(c.disabled for c in scope.callbacks.values())


class _DeviceStrategy:
    """A two-rank strategy on another device (``meta`` stands in for CUDA): its collective takes
    only tensors on its own device, as NCCL takes only CUDA tensors."""

    root_device = torch.device("meta")

    def __init__(self):
        self.seen = []

    def reduce(self, t, reduce_op):
        self.seen.append(t.device.type)
        assert t.device == self.root_device, f"a {t.device} tensor was given to the collective"
        return torch.zeros(t.shape, dtype=t.dtype)  # every rank succeeded; the values do not matter here


def test_collectives_run_on_the_strategys_device_whatever_the_tensor_was_made_on():
    from dynscope.callbacks.distributed import RankReduce, any_rank, on_every_rank

    strategy = _DeviceStrategy()
    trainer = SimpleNamespace(world_size=2, strategy=strategy)
    out = RankReduce(strategy, "mean")(torch.arange(3, dtype=torch.float64))  # the budget's CPU bookkeeping
    assert out.device.type == "cpu" and out.shape == (3,)
    assert any_rank(trainer, True) is False  # the fake collective sums to zero
    assert on_every_rank(trainer, lambda: 7) == 7
    assert strategy.seen == ["meta", "meta", "meta"]
