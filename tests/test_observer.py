"""Measuring must never change training: identical weights with and without diagnostics."""

import pytest
from observer import assert_same_weights, trained_weights

from dynscope.callbacks import Curvature


@pytest.fixture(scope="module")
def baseline():
    return trained_weights([])


def test_curvature_every_step_leaves_training_bit_identical(baseline):
    # 30 steps, every diagnostic of the callback at every step (trace, Lanczos, both sharpnesses)
    measured = trained_weights([Curvature(every_n_steps=1, num_matvecs=2, eigen_max_iter=3)])
    assert_same_weights(baseline, measured)


def test_curvature_in_train_mode_leaves_batchnorm_stats_and_rng_alone(baseline):
    measured = trained_weights([Curvature(every_n_steps=3, num_matvecs=2, eigen_max_iter=3, mode="train")])
    assert_same_weights(baseline, measured)
