import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import check_grads
from minialex.kernels.dropout import (dropout_backward, dropout_backward_ref, dropout_forward,
                                      dropout_forward_ref)

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
probs = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])


@settings(max_examples=25, deadline=None)
@given(shapes, probs, st.sampled_from([np.float64, np.float32]), st.booleans(), st.integers(0, 2**31))
def test_matches_reference(shape, p, dtype, as_bool, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    mask = rng.random(shape) >= p
    if not as_bool:
        mask = mask.astype(np.uint8)
    y = dropout_forward(x, mask, p)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, dropout_forward_ref(x, mask, p))
    np.testing.assert_array_equal(y[mask == 0], 0)
    dy = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_array_equal(dropout_backward(dy, mask, p), dropout_backward_ref(dy, mask, p))


@settings(max_examples=10, deadline=None)
@given(shapes, st.sampled_from([0.0, 0.3, 0.5]), st.integers(0, 2**31))
def test_gradient_matches_finite_differences(shape, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    mask = (rng.random(shape) >= p).astype(np.uint8)
    gy = rng.standard_normal(shape)
    for fwd, bwd in ((dropout_forward, dropout_backward), (dropout_forward_ref, dropout_backward_ref)):
        check_grads(lambda a: float(np.sum(fwd(a, mask, p) * gy)), [x], [bwd(gy, mask, p)])


def test_rejects_bad_probability_and_mask_shape():
    with pytest.raises(ValueError):
        dropout_forward(np.ones(3), np.ones(3, np.uint8), 1.5)
    with pytest.raises(ValueError):
        dropout_forward(np.ones(3), np.ones(4, np.uint8), 0.5)


def test_matches_torch_dropout_given_its_mask(torch):
    # torch draws its own mask; recover it from the output (x has no zeros) and feed it to ours
    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(0.5, 1.5, (4, 64)).astype(np.float32)
    p = 0.5
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.nn.functional.dropout(xt, p=p, training=True)
    mask = (yt.detach().numpy() != 0).astype(np.uint8)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_allclose(dropout_forward(x, mask, p), yt.detach().numpy(), rtol=1e-6)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(dropout_backward(dy, mask, p), xt.grad.numpy(), rtol=1e-6)
