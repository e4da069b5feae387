"""Measuring must never change training: identical weights with and without diagnostics."""

from observer import assert_same_weights, trained_weights

from dynscope.callbacks import Curvature


def test_curvature_every_step_leaves_training_bit_identical():
    baseline = trained_weights([])
    measured = trained_weights([Curvature(every_n_steps=1, num_matvecs=4, eigen_max_iter=8)])
    assert_same_weights(baseline, measured)


def test_curvature_in_train_mode_leaves_batchnorm_stats_and_rng_alone():
    baseline = trained_weights([])
    measured = trained_weights([Curvature(every_n_steps=3, num_matvecs=4, eigen_max_iter=8, mode="train")])
    assert_same_weights(baseline, measured)
