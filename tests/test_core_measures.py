"""The core's measurements that the callbacks used to hold (issue 17): collapse counting, the EMA
update and the EMA window statistics, and the metric declarations. References are per-sample loops
through torch's own cross-entropy, closed forms and recursions written out by hand."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from dynscope.amplification import EMAWindow, WarmupEMA, change_spread, ema_window, variance_amplification
from dynscope.collapse import CollapseCounts, NotClassLogitsError, collapse_counts, count_collapse
from dynscope.metrics import DECLARED, Metric, Metrics
from dynscope.objective import NonFiniteError

# -- collapse counting -------------------------------------------------------------------------------------


def _reference_counts(logits, targets, dtype, ignore_index=-100):
    """One row at a time: torch's cross-entropy of the row, in ``dtype``, against its label and its arg-max."""
    n = collapsed = zero = gaps = correct = 0.0
    for row, label in zip(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).tolist()):
        if label == ignore_index:
            continue
        z = row.to(dtype).unsqueeze(0)
        top = int(row.argmax())
        n += 1
        collapsed += float(F.cross_entropy(z, torch.tensor([top])) == 0)  # the top class's loss is exactly 0
        zero += float(F.cross_entropy(z, torch.tensor([label])) == 0)
        first, second = sorted(row.double().tolist(), reverse=True)[:2]
        gaps += first - second
        correct += float(top == label)
    return n, collapsed, zero, gaps, correct


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_count_collapse_matches_a_per_row_loop_through_cross_entropy(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 7, generator=g) * torch.tensor([1.0, 5.0, 10.0, 20.0, 40.0])[:, None, None].repeat(2, 1, 1)[:6]
    targets = torch.randint(0, 7, (6, 5), generator=g)
    targets[0, :2] = -100
    targets[3] = logits[3].argmax(-1)  # some rows collapse with the right label, so their loss is exactly 0
    counts = count_collapse(logits, targets, dtype)
    n, collapsed, zero, gaps, correct = _reference_counts(logits, targets, dtype)
    assert (counts.samples, counts.collapsed, counts.zero_loss, counts.correct) == (n, collapsed, zero, correct)
    assert counts.gap_sum == pytest.approx(gaps, rel=1e-12)
    assert counts.softmax_collapsed == counts.collapsed  # the softmax is the loss in use
    assert counts.value == collapsed / n
    if dtype != torch.float64:
        assert 0 < collapsed < n  # the test sees both kinds of rows


def test_collapse_counts_add_over_batches_and_fractions_divide():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 4, generator=g) * 30, torch.randn(5, 4, generator=g) * 30
    ya, yb = torch.randint(0, 4, (8,), generator=g), torch.randint(0, 4, (5,), generator=g)
    joined = count_collapse(torch.cat([a, b]), torch.cat([ya, yb]))
    summed = count_collapse(a, ya) + count_collapse(b, yb)
    assert summed.as_tensor().tolist() == pytest.approx(joined.as_tensor().tolist(), rel=1e-12)
    assert CollapseCounts.from_tensor(collapse_counts(a, ya)) == count_collapse(a, ya)
    n, collapsed, zero, gaps, correct = _reference_counts(a, ya, torch.float32)
    assert count_collapse(a, ya).fractions() == pytest.approx({
        "sc_fraction": collapsed / n, "zero_loss_fraction": zero / n, "softmax_sc_fraction": collapsed / n,
        "max_logit_gap": gaps / n, "train_accuracy": correct / n})
    assert CollapseCounts(0, 0, 0, 0, 0, 0).fractions() == {} and math.isnan(CollapseCounts(0, 0, 0, 0, 0, 0).value)


def test_stablemax_counts_keep_the_softmax_collapse_apart():
    logits, targets = torch.tensor([[40.0, 0.0, 0.0], [40.0, 0.0, 0.0]]), torch.tensor([0, 1])
    soft, stable = count_collapse(logits, targets), count_collapse(logits, targets, normalization="stablemax")
    assert (soft.collapsed, soft.zero_loss, soft.softmax_collapsed) == (2.0, 1.0, 2.0)
    # StableMax of [40, 0, 0]: s = [41, 1, 1], top probability 41/43 < 1, no loss is 0
    assert (stable.collapsed, stable.zero_loss, stable.softmax_collapsed) == (0.0, 0.0, 2.0)


def test_what_collapse_counting_refuses():
    with pytest.raises(NotClassLogitsError):
        count_collapse(torch.randn(4, 3), torch.rand(4))  # soft targets
    with pytest.raises(NotClassLogitsError):
        count_collapse(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))  # one class
    with pytest.raises(NonFiniteError):
        count_collapse(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    masked = count_collapse(torch.tensor([[2.0, 0.0, -math.inf]]), torch.tensor([0]))  # a masked class is fine
    assert masked.samples == 1 and masked.gap_sum == 2.0


def test_the_callback_turns_logits_that_do_not_fit_into_a_protocol_error():
    from dynscope.callbacks.collapse import collapse_counts as callback_counts
    from dynscope.callbacks.protocol import LossProtocolError

    with pytest.raises(LossProtocolError):
        callback_counts(torch.randn(4, 3), torch.rand(4), "float32", -100)


# -- the EMA and its window statistics ----------------------------------------------------------------------


@pytest.mark.parametrize("warmup", ["inverse", "polynomial", "none"])
def test_warmup_ema_follows_the_recursion_written_out(warmup):
    decay, power = 0.9, 0.5
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = AveragedModel(net, multi_avg_fn=WarmupEMA(decay, warmup, power), use_buffers=True)
    g = torch.Generator().manual_seed(0)
    expected = None
    for t in range(12):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        net[1].num_batches_tracked.fill_(t)
        current = [p.detach().double().clone() for p in net.parameters()]
        if expected is None:
            expected = current  # the first update copies
        else:
            d = {"inverse": min(decay, (1 + t) / (10 + t)), "polynomial": min(decay, 1 - (1 + t) ** -power),
                 "none": decay}[warmup]
            expected = [d * e + (1 - d) * c for e, c in zip(expected, current)]
        ema.update_parameters(net)
    for got, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == 11  # integer buffers are copied, not averaged


def test_change_spread_is_the_population_std_of_the_differences():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    d = [b - a for a, b in zip(values, values[1:])]
    mean = sum(d) / len(d)
    assert change_spread(values) == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / len(d)), rel=1e-12)
    assert math.isnan(change_spread([1.0, 2.0]))  # one difference has no spread


def test_ema_window_closed_forms():
    s, c, n = 0.5, 4.0, 6
    online = [c + s * (-1) ** i for i in range(n)]  # changes alternate +-2s
    averaged = [c + 0.1 * s * (-1) ** i for i in range(n)]
    losses = [1.0 + 0.01 * i * i for i in range(n)]
    w = ema_window(online, averaged, losses)
    d = [2 * s * (-1) ** (i + 1) for i in range(n - 1)]
    mean_d = sum(d) / len(d)
    std_d = math.sqrt(sum((x - mean_d) ** 2 for x in d) / len(d))
    assert w.swing == pytest.approx(std_d / c, rel=1e-12)
    assert w.swing_ema == pytest.approx(0.1 * std_d / c, rel=1e-12)
    assert w.ema_swing_ratio == pytest.approx(10.0, rel=1e-12) and w.value == w.ema_swing_ratio
    assert w.amplification_ema == pytest.approx(variance_amplification(averaged, losses), rel=1e-12)
    assert (w.mean, w.mean_ema) == (pytest.approx(c), pytest.approx(c))
    assert set(w.metrics()) == {"swing", "swing_ema", "ema_swing_ratio", "amplification_ema"}
    # a steady linear trend has no swing: the EMA of a swinging metric that is a straight line is infinitely steadier
    trend = [c + 0.25 * i for i in range(n)]  # exact in binary: every change is exactly 0.25
    assert math.isinf(ema_window(online, trend, losses).ema_swing_ratio)
    assert math.isnan(ema_window(trend, trend, losses).ema_swing_ratio)


def test_ema_window_steadier_rules():
    w = EMAWindow(swing=0.1, swing_ema=0.01, ema_swing_ratio=5.0, amplification_ema=1.0, mean=10.0, mean_ema=10.1)
    assert w.steadier(3.0, 0.05, 0.02)  # 10.1 <= 10 + 0.2
    assert not w.steadier(6.0, 0.05, 0.02)  # not steadier enough
    assert not w.steadier(3.0, 0.2, 0.02)  # the online metric barely swings
    assert not w.steadier(3.0, 0.05, 0.005)  # a cost: the EMA's mean is worse by more than the tolerance
    assert w.steadier(3.0, 0.05, 0.0, higher_is_better=True)  # a reward: 10.1 is better
    assert not EMAWindow(0.1, 0.1, math.nan, 1.0, 1.0, 1.0).steadier()


# -- the declarations ------------------------------------------------------------------------------------------


def test_metric_declarations_are_checked():
    with pytest.raises(ValueError):
        Metric("a/b", "a tag component has no slash")
    with pytest.raises(ValueError):
        Metric("x", "layer-only without per-layer series", layer_only=True)
    with pytest.raises(ValueError):
        Metrics("g", Metric("x", "one"), Metric("x", "twice"))
    declared = Metrics("g", Metric("x", "drawn", chart="c"), Metric("y", "table"), Metric("z", "layers", per_layer=True,
                                                                                         layer_only=True))
    assert declared.on_chart("c") == ("x",) and declared["y"].table_only and not declared["z"].table_only
    with pytest.raises(KeyError):
        declared.on_chart("nothing")
    with pytest.raises(ValueError):
        declared.per_layer("x")


def test_each_diagnostic_module_binds_its_declarations():
    import dynscope.amplification
    import dynscope.attention
    import dynscope.collapse
    import dynscope.logits
    import dynscope.regions
    import dynscope.spikes

    for module, group in [(dynscope.collapse, "collapse"), (dynscope.amplification, "gva"),
                          (dynscope.attention, "attention"), (dynscope.logits, "logits"), (dynscope.regions, "regions"),
                          (dynscope.spikes, "spikes")]:
        assert module.METRICS is DECLARED[group]
    assert set(count_collapse(torch.randn(3, 4), torch.zeros(3, dtype=torch.long)).fractions()) <= set(DECLARED["collapse"].names)
    assert set(ema_window([1.0, 2.0, 1.5], [1.0, 1.2, 1.1], [1.0, 0.9, 0.8]).metrics()) <= set(DECLARED["gva"].names)
    from dynscope.attention import logit_stats, summarize
    from dynscope.logits import output_logit_stats

    assert set(output_logit_stats(torch.randn(2, 3, 5)).metrics()) | {"log_z_drift"} == set(DECLARED["logits"].names)
    found = {"block": logit_stats(torch.randn(1, 2, 3, 3))}
    logged = {(key.split("/")[0], "/" in key) for key in summarize(found, per_head=True)}
    attention = DECLARED["attention"]
    assert {name for name, _ in logged} == set(attention.names)
    for name, layered in logged:
        assert attention[name].per_layer if layered else not attention[name].layer_only, (name, layered)


def test_the_core_imports_no_lightning_and_the_vocabulary_no_torch():
    code = ("import sys\nimport dynscope.metrics, dynscope.dashboards.groups\nprint('TORCH', 'torch' in sys.modules)\n"
            "import dynscope.collapse, dynscope.amplification, dynscope.attention, dynscope.logits, dynscope.regions, "
            "dynscope.spikes, dynscope.noise\n"
            "print('LIGHTNING', sorted(m for m in ('pytorch_lightning', 'lightning') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TORCH False" in out and "LIGHTNING []" in out, out


# -- attention statistics across ranks -------------------------------------------------------------------------


def test_combining_packed_attention_statistics_is_merging_them():
    from collections import OrderedDict

    from dynscope.attention import combine_attention, logit_stats, pack_attention

    g = torch.Generator().manual_seed(0)
    ranks = [OrderedDict((name, logit_stats(torch.randn(2, heads, 5, 5, generator=g) * scale))
                         for name, heads, scale in (("a", 2, 1.0), ("b", 3, 4.0))) for _ in range(3)]
    combined = combine_attention(ranks[0], torch.stack([pack_attention(r) for r in ranks]))
    for name in ("a", "b"):
        want = ranks[0][name].merge(ranks[1][name]).merge(ranks[2][name])
        got = combined[name]
        for field in ("max_logit", "entropy_min", "entropy_sum", "rows"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field).double(), rtol=1e-12, atol=0)


def test_nlm_alignment_metrics_are_the_cosines_written_out():
    from dynscope.collapse import nlm_alignment

    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net.bias.zero_()  # a zero-norm tensor: its cosine is undefined and is not logged
    net.weight.grad = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    net.bias.grad = torch.tensor([1.0, 1.0])
    theta, minus_g = [1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 1.0]
    cos_w = sum(a * b for a, b in zip(theta, minus_g)) / math.sqrt(sum(a * a for a in theta) * sum(b * b for b in minus_g))
    # global: theta = (w, 0, 0), -g = (-grad w, -1, -1)
    cos_all = 5.0 / math.sqrt(30.0 * 4.0)
    metrics = nlm_alignment(net).metrics()
    assert metrics == pytest.approx({"nlm_cos": cos_all, "nlm_cos/weight": cos_w})
    assert nlm_alignment(net).metrics(per_layer=False) == pytest.approx({"nlm_cos": cos_all})


def test_amplification_window_keeps_the_last_evaluations_and_their_statistics():
    from dynscope.amplification import AmplificationWindow, relative_swing

    g = torch.Generator().manual_seed(0)
    js, losses, emas = (torch.rand(9, generator=g).add(1).tolist() for _ in range(3))
    window = AmplificationWindow(4)
    for i, (j, loss, ema) in enumerate(zip(js, losses, emas)):
        out = window.add(j, loss, step=10 * i)
        assert ("amplification" in out) == (i >= 3)
        out.update(window.add_ema(ema))
    last = slice(-4, None)
    assert list(window.steps) == [50, 60, 70, 80]
    assert out["amplification"] == pytest.approx(variance_amplification(js[last], losses[last]), rel=1e-12)
    assert out["swing"] == pytest.approx(relative_swing(js[last]), rel=1e-12)
    assert out["ema_swing_ratio"] == pytest.approx(change_spread(js[last]) / change_spread(emas[last]), rel=1e-12)
    assert window.last_ema.metrics() == {k: out[k] for k in window.last_ema.metrics()}
    restored = AmplificationWindow(4)
    restored.load_state_dict(window.state_dict())
    assert restored.state_dict() == window.state_dict() and restored.full
    window.clear()
    assert not window.full and window.state_dict() == {"metrics": [], "losses": [], "steps": [], "metrics_ema": []}
    with pytest.raises(ValueError):
        AmplificationWindow(2)
