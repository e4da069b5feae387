"""The smoothed noise scale: unbiased per batch, numerator and denominator averaged separately."""

import math
import statistics

import pytest
import torch

from dynscope.noise import SmoothedNoiseScale, gradient_noise_scale
from dynscope.persample import GradientMoments


def _batches(ratio, batch=32, dim=1000, count=120, seed=0):
    """Per-sample gradients g_i = G + sigma z_i with B_simple = dim sigma^2 / |G|^2 = ratio * batch."""
    g = torch.Generator().manual_seed(seed)
    G = torch.zeros(dim, dtype=torch.float64)
    G[0] = 1.0
    sigma = math.sqrt(ratio * batch / dim)
    for _ in range(count):
        yield G + sigma * torch.randn(batch, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("ratio", [0.25, 1.0, 4.0, 16.0])
def test_smoothed_noise_scale_recovers_b_simple_over_b_where_one_batch_saturates(ratio):
    smoothed, raw, logged = SmoothedNoiseScale(ema=0.95), [], []
    for samples in _batches(ratio):
        est = gradient_noise_scale(GradientMoments.from_samples({"w": samples}))
        raw.append(est.value / 32)
        logged.append(smoothed.update(est.trace_sigma, est.grad_sq_norm, 32) / 32)
    late = logged[40:]
    assert statistics.median(late) == pytest.approx(ratio, rel=0.2)
    # one batch's ratio is biased towards b / (1 + b): it can never say "a larger batch helps" by much
    assert statistics.median(raw) == pytest.approx(ratio / (1 + ratio), rel=0.2)


def test_smoothing_matches_the_ratio_of_bias_corrected_averages():
    smoothed = SmoothedNoiseScale(ema=0.8)
    traces, grads = [], []
    for k, samples in enumerate(_batches(2.0, count=5, seed=1)):
        est = gradient_noise_scale(GradientMoments.from_samples({"w": samples}))
        traces.append(est.trace_sigma)
        grads.append(est.grad_sq_norm - est.trace_sigma / 32)
        got = smoothed.update(est.trace_sigma, est.grad_sq_norm, 32)
        w = [0.2 * 0.8 ** (k - i) for i in range(k + 1)]
        assert got == pytest.approx(sum(a * b for a, b in zip(w, traces)) / sum(a * b for a, b in zip(w, grads)),
                                    rel=1e-12)
    state = smoothed.state_dict()
    restored = SmoothedNoiseScale()
    restored.load_state_dict(state)
    assert restored.value == smoothed.value
    assert math.isnan(SmoothedNoiseScale().value)


if __name__ == "__main__":  # the numbers for the report: median over measurements 40..120
    for ratio in (0.25, 1.0, 4.0, 16.0):
        s, raw, out = SmoothedNoiseScale(ema=0.95), [], []
        for samples in _batches(ratio):
            est = gradient_noise_scale(GradientMoments.from_samples({"w": samples}))
            raw.append(est.value / 32)
            out.append(s.update(est.trace_sigma, est.grad_sq_norm, 32) / 32)
        print(ratio, round(statistics.median(raw[40:]), 3), round(statistics.median(out[40:]), 3))
