"""The calibration criteria on known distributions, and calibration's determinism."""
import numpy as np
import pytest

from minialex.calibration import BINS, PointStats, calibration_samples, threshold

from .conftest import calibrated


def _stats(values, levels=255):
    s = PointStats(levels)
    s.observe_peak(values)
    s.observe_histogram(values)
    return s


def test_max_is_the_peak_and_zeros_are_left_out():
    v = np.concatenate([np.zeros(1000), np.linspace(0.01, 3.0, 500)]).astype(np.float32)
    s = _stats(v)
    assert threshold(s, "max") == pytest.approx(3.0)
    assert s.hist.sum() == 500


def test_percentile_clips_a_rare_outlier():
    rng = np.random.default_rng(0)
    v = np.abs(rng.standard_normal(200_000)).astype(np.float32)
    v[0] = 100.0                                   # one value in 200,000: beyond the 99.99th percentile
    s = _stats(v)
    t = threshold(s, "percentile")
    exact = np.percentile(v, 99.99)
    assert abs(t - exact) <= 2 * s.peak / BINS and t < 10


@pytest.mark.parametrize("criterion", ["mse", "entropy"])
def test_error_criteria_clip_a_long_tail_but_not_a_uniform_range(criterion):
    """Laplace: the 8-bit MSE optimum clips near 11 b while 500,000 samples reach ~13 b; KL clips
    harder. A uniform range has no tail worth clipping."""
    rng = np.random.default_rng(1)
    s = _stats(np.abs(rng.laplace(size=500_000)).astype(np.float32))
    assert threshold(s, criterion) < 0.9 * threshold(s, "max")
    uniform = _stats(rng.uniform(0, 1, 500_000).astype(np.float32))
    assert threshold(uniform, criterion) >= 0.9


def test_mse_threshold_minimises_the_measured_error():
    """The histogram estimate picks a threshold whose real quantisation error is near the best
    of a fine sweep over thresholds, measured on the values themselves."""
    rng = np.random.default_rng(2)
    v = np.abs(rng.laplace(size=100_000))
    t = threshold(_stats(v.astype(np.float32)), "mse")

    def error(T):
        s = T / 255
        return np.mean((np.clip(np.rint(v / s), 0, 255) * s - v) ** 2)

    sweep = np.linspace(v.max() / 100, v.max(), 400)
    assert error(t) <= 1.05 * min(error(T) for T in sweep)


def test_only_zeros_give_threshold_zero():
    s = _stats(np.zeros(100, np.float32))
    for c in ("max", "percentile", "mse", "entropy"):
        assert threshold(s, c) == 0.0


def test_sample_is_drawn_from_the_seed(demo_lists):
    a = calibration_samples(demo_lists[0], 10, 20, seed=4)
    b = calibration_samples(demo_lists[0], 10, 20, seed=4)
    c = calibration_samples(demo_lists[0], 10, 20, seed=5)
    assert a == b and a != c and len(a) == 20
    assert [s.line for s in a] == sorted(s.line for s in a)     # list order kept
    assert len(calibration_samples(demo_lists[0], 10, 10_000, seed=4)) == 500


def test_calibration_is_deterministic(trained, demo_lists):
    """Same list, seed and image count: the same scales bit for bit, the same winner, the same
    scores; another seed draws other images and other scales."""
    runs = [calibrated(trained, demo_lists[0], images=24, seed=7)[2] for _ in range(2)]
    other = calibrated(trained, demo_lists[0], images=24, seed=8, criteria=("max",))[2]
    a, b = runs
    assert a.best.criterion == b.best.criterion
    for ca, cb in zip(a.candidates, b.candidates):
        assert ca.model.params.input_scale == cb.model.params.input_scale
        assert ca.model.params.activation_scales == cb.model.params.activation_scales
        assert (ca.agreement, ca.logit_mse) == (cb.agreement, cb.logit_mse)
        for key, layer in ca.model.params.layers.items():
            for x, y in zip(layer, cb.model.params.layers[key]):
                np.testing.assert_array_equal(x, y)
    assert other.best.model.params.activation_scales != a.candidates[0].model.params.activation_scales
