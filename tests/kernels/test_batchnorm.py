import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import check_grads, to_torch
from minialex.kernels.batchnorm import (batchnorm2d_backward, batchnorm2d_backward_eval,
                                        batchnorm2d_backward_eval_ref, batchnorm2d_backward_ref,
                                        batchnorm2d_forward_eval, batchnorm2d_forward_eval_ref,
                                        batchnorm2d_forward_train, batchnorm2d_forward_train_ref)

cases = st.tuples(st.integers(2, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5),
                  st.booleans(), st.sampled_from([1e-5, 1e-3]))


def _make(c, dtype, seed):
    n, ch, h, w, affine, eps = c
    rng = np.random.default_rng(seed)
    # an offset per channel: the statistics must not cancel catastrophically
    x = (rng.standard_normal((n, ch, h, w)) * 2 + rng.uniform(-5, 5, (1, ch, 1, 1))).astype(dtype)
    g = rng.uniform(0.5, 1.5, ch).astype(dtype) if affine else None
    b = rng.standard_normal(ch).astype(dtype) if affine else None
    rm = rng.standard_normal(ch).astype(dtype)
    rv = rng.uniform(0.5, 2, ch).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    return x, g, b, rm, rv, eps, dy


def _zeros(g):
    return (np.zeros_like(g), np.zeros_like(g)) if g is not None else (None, None)


@settings(max_examples=25, deadline=None)
@given(cases, st.sampled_from([np.float64, np.float32]), st.integers(0, 2**31))
def test_matches_reference(c, dtype, seed):
    x, g, b, rm, rv, eps, dy = _make(c, dtype, seed)
    r, a = (1e-10, 1e-10) if dtype == np.float64 else (1e-4, 1e-4)
    outs = batchnorm2d_forward_train(x, g, b, eps)
    refs = batchnorm2d_forward_train_ref(x.astype(np.float64), g, b, eps)
    assert outs[0].dtype == dtype
    for o, e in zip(outs, refs):
        np.testing.assert_allclose(o, e, rtol=r, atol=a)
    y, mean, var, invstd = outs
    dg, db = _zeros(g)
    dg_r, db_r = _zeros(g)
    dx = batchnorm2d_backward(dy, x, g, mean, invstd, dg, db)
    dx_r = batchnorm2d_backward_ref(dy, x, g, mean, invstd, dg_r, db_r)
    np.testing.assert_allclose(dx, dx_r, rtol=r, atol=a)
    if g is not None:
        np.testing.assert_allclose(dg, dg_r, rtol=r, atol=a)
        np.testing.assert_allclose(db, db_r, rtol=r, atol=a)
    np.testing.assert_allclose(batchnorm2d_forward_eval(x, g, b, rm, rv, eps),
                               batchnorm2d_forward_eval_ref(x, g, b, rm, rv, eps), rtol=r, atol=a)
    dg, db = _zeros(g)
    dg_r, db_r = _zeros(g)
    np.testing.assert_allclose(batchnorm2d_backward_eval(dy, g, rv, eps, dg, db, x, rm),
                               batchnorm2d_backward_eval_ref(dy, g, rv, eps, dg_r, db_r, x, rm), rtol=r, atol=a)
    if g is not None:
        np.testing.assert_allclose(dg, dg_r, rtol=r, atol=a)
        np.testing.assert_allclose(db, db_r, rtol=r, atol=a)


@settings(max_examples=10, deadline=None)
@given(cases, st.integers(0, 2**31))
def test_gradients_match_finite_differences(c, seed):
    x, g, b, rm, rv, eps, gy = _make(c, np.float64, seed)
    if g is None:
        g, b = np.ones(x.shape[1]), np.zeros(x.shape[1])
    for fwd, bwd in ((batchnorm2d_forward_train, batchnorm2d_backward),
                     (batchnorm2d_forward_train_ref, batchnorm2d_backward_ref)):
        _, mean, _, invstd = fwd(x, g, b, eps)
        dg, db = np.zeros_like(g), np.zeros_like(b)
        dx = bwd(gy, x, g, mean, invstd, dg, db)
        check_grads(lambda x_, g_, b_: float(np.sum(fwd(x_, g_, b_, eps)[0] * gy)), [x, g, b], [dx, dg, db],
                    rtol=1e-5, atol=1e-7)
    for fwd, bwd in ((batchnorm2d_forward_eval, batchnorm2d_backward_eval),
                     (batchnorm2d_forward_eval_ref, batchnorm2d_backward_eval_ref)):
        dg, db = np.zeros_like(g), np.zeros_like(b)
        dx = bwd(gy, g, rv, eps, dg, db, x, rm)
        check_grads(lambda x_, g_, b_: float(np.sum(fwd(x_, g_, b_, rm, rv, eps) * gy)), [x, g, b],
                    [dx, dg, db], rtol=1e-5, atol=1e-7)


def test_backward_accumulates_and_training_needs_two_values():
    x, g, b, rm, rv, eps, dy = _make((2, 3, 2, 2, True, 1e-5), np.float64, 0)
    _, mean, _, invstd = batchnorm2d_forward_train(x, g, b, eps)
    dg, db = np.zeros_like(g), np.zeros_like(b)
    batchnorm2d_backward(dy, x, g, mean, invstd, dg, db)
    dg1, db1 = dg.copy(), db.copy()
    batchnorm2d_backward(dy, x, g, mean, invstd, dg, db)
    np.testing.assert_allclose(dg, 2 * dg1, rtol=1e-12)
    np.testing.assert_allclose(db, 2 * db1, rtol=1e-12)
    with pytest.raises(ValueError):
        batchnorm2d_forward_train(np.ones((1, 3, 1, 1)), None, None, 1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vectorised_sums_match_reference_and_keep_nan(dtype):
    # planes of 117 values: the reassociated sums run their vector body and a remainder
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 4, 9, 13)) * 3 + 40).astype(dtype)
    g = rng.uniform(0.5, 1.5, 4).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    r = 1e-12 if dtype == np.float64 else 2e-5
    outs = batchnorm2d_forward_train(x, g, b)
    refs = batchnorm2d_forward_train_ref(x.astype(np.float64), g, b)
    for o, e in zip(outs, refs):
        np.testing.assert_allclose(o, e, rtol=r, atol=r)
    _, mean, _, invstd = outs
    dg, db = np.zeros_like(g), np.zeros_like(b)
    dg_r, db_r = np.zeros(4), np.zeros(4)
    dx = batchnorm2d_backward(dy, x, g, mean, invstd, dg, db)
    dx_r = batchnorm2d_backward_ref(dy.astype(np.float64), x.astype(np.float64), g, mean.astype(np.float64),
                                    invstd.astype(np.float64), dg_r, db_r)
    np.testing.assert_allclose(dx, dx_r, rtol=r, atol=r)
    np.testing.assert_allclose(dg, dg_r, rtol=r, atol=r * 100)
    np.testing.assert_allclose(db, db_r, rtol=r, atol=r * 100)
    # one NaN poisons its channel's statistics and gradients, and only those
    x[1, 2, 4, 7] = np.nan
    y, mean, var, invstd = batchnorm2d_forward_train(x, g, b)
    assert np.isnan(mean[2]) and np.isnan(var[2]) and np.isnan(y[:, 2]).all()
    assert np.isfinite(np.delete(mean, 2)).all() and np.isfinite(np.delete(y, 2, axis=1)).all()
    dg, db = np.zeros_like(g), np.zeros_like(b)
    dx = batchnorm2d_backward(dy, x, g, mean, invstd, dg, db)
    assert np.isnan(dx[:, 2]).all() and np.isnan(dg[2])
    assert np.isfinite(np.delete(dx, 2, axis=1)).all()


@settings(max_examples=15, deadline=None)
@given(cases, st.booleans(), st.integers(0, 2**31))
def test_matches_torch_batch_norm(torch, c, training, seed):
    x, g, b, rm, rv, eps, dy = _make(c, np.float32, seed)
    F = torch.nn.functional
    xt = to_torch(torch, x, True)
    gt = to_torch(torch, g, True) if g is not None else None
    bt = to_torch(torch, b, True) if b is not None else None
    rmt, rvt = to_torch(torch, rm), to_torch(torch, rv)
    yt = F.batch_norm(xt, rmt, rvt, gt, bt, training=training, momentum=0.1, eps=eps)
    yt.backward(torch.from_numpy(dy))
    dg, db = _zeros(g)
    if training:
        y, mean, var, invstd = batchnorm2d_forward_train(x, g, b, eps)
        dx = batchnorm2d_backward(dy, x, g, mean, invstd, dg, db)
        # torch's running stats use the unbiased variance; ours are left to the caller
        m = x.size // x.shape[1]
        np.testing.assert_allclose(0.9 * rm + 0.1 * mean, rmt.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(0.9 * rv + 0.1 * var * m / (m - 1), rvt.numpy(), rtol=1e-4, atol=1e-5)
    else:
        y = batchnorm2d_forward_eval(x, g, b, rm, rv, eps)
        dx = batchnorm2d_backward_eval(dy, g, rv, eps, dg, db, x, rm)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    if g is not None:
        np.testing.assert_allclose(dg, gt.grad.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_allreduce_over_one_process_is_bit_identical_to_none(dtype):
    # the synchronised path (sums, count, allreduce, squared deviations around the reduced
    # mean) gives the default path's bits when the allreduce has only this process to sum
    x, g, b, rm, rv, eps, dy = _make((3, 4, 9, 13, True, 1e-5), dtype, 9)
    x[0, 1, 2, 3] = np.nan
    calls = []

    def one_process(a):
        calls.append(a.size)
        return a

    plain = batchnorm2d_forward_train(x, g, b, eps, return_count=True)
    synced = batchnorm2d_forward_train(x, g, b, eps, allreduce=one_process, return_count=True)
    assert calls == [4 + 1, 4]                      # [sums, count], then the squared deviations
    assert plain[4] == synced[4] == 3 * 9 * 13
    for p, s in zip(plain[:4], synced[:4]):
        assert p.dtype == s.dtype == dtype and p.tobytes() == s.tobytes()
    assert len(batchnorm2d_forward_train(x, g, b, eps)) == 4
    grads = []
    for reduce in (None, one_process):
        dg, db = np.zeros_like(g), np.zeros_like(b)
        grads.append((batchnorm2d_backward(dy, x, g, plain[1], plain[3], dg, db, allreduce=reduce), dg, db))
    assert calls[2:] == [2 * 4 + 1]                 # [sum(dy), sum(dy*xhat), count]
    for p, s in zip(*grads):
        assert p.tobytes() == s.tobytes()


def test_allreduce_applies_the_one_value_rule_to_the_global_count():
    for x in (np.ones((1, 3, 1, 1)), np.ones((0, 3, 4, 4))):
        with pytest.raises(ValueError, match="over all processes"):
            batchnorm2d_forward_train(x, None, None, 1e-5, allreduce=lambda a: a)
    # an empty batch joins both reductions with zeros; here another process adds 4 values per
    # channel (sum 8, squared deviations 12)
    other = iter([np.array([8.0, 8.0, 4.0]), np.array([12.0, 12.0])])

    def with_other(a):
        a += next(other)
        return a

    y, mean, var, invstd, m = batchnorm2d_forward_train(np.ones((0, 2, 5, 5)), None, None, 0.0,
                                                        allreduce=with_other, return_count=True)
    assert y.shape == (0, 2, 5, 5) and m == 4
    np.testing.assert_array_equal(mean, [2.0, 2.0])
    np.testing.assert_array_equal(var, [3.0, 3.0])
