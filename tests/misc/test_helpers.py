"""The test helpers themselves: a gradient check that cannot fail checks nothing."""
import numpy as np
import pytest

from helpers import check_grads


def _square_sum(a):
    return float(np.sum(a * a))


@pytest.mark.parametrize("n", [5, 1000])  # full central differences, then random directions
def test_check_grads_accepts_the_gradient_and_rejects_a_wrong_one(n):
    x = np.random.default_rng(0).standard_normal(n)
    check_grads(_square_sum, [x], [2 * x])
    wrong = 2 * x
    wrong[n // 2] += 1.0
    with pytest.raises(AssertionError):
        check_grads(_square_sum, [x], [wrong])


def test_check_grads_refuses_float32_inputs():
    # Central differences of step 1e-6 on float32 values would be rounding noise.
    x = np.ones(4, np.float32)
    with pytest.raises(AssertionError, match="float64"):
        check_grads(_square_sum, [x], [2 * x])


def test_check_grads_leaves_the_callers_arrays_alone():
    x = np.arange(4.0)
    before = x.copy()
    check_grads(_square_sum, [x], [2 * x])
    assert np.array_equal(x, before)
