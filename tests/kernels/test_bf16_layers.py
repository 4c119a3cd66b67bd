"""Convolution and linear layers at precision bf16 against a NumPy model of the same arithmetic
(operands rounded to bfloat16 as the kernels round them, products summed in float64), on every
AlexNet layer shape, on the native path where the CPU has AVX512_BF16 and on the emulated one
everywhere. Random shapes of the bf16 convolution path run in test_conv_paths.py."""
import numba
import numpy as np
import pytest

from minialex.kernels.conv import conv2d_backward, conv2d_backward_ref, conv2d_forward, conv2d_forward_ref, plan
from minialex.kernels.conv.layout import geometry
from minialex.kernels.gemm_bf16 import bf16_operand_ref
from minialex.kernels.linear import linear_backward, linear_backward_ref, linear_forward, linear_forward_ref
from minialex.kernels.simd_bf16 import has_avx512_bf16


def _rounding(call, weights=False):
    """How the products of the path routed for `call` read their operands: rounded to bf16
    (bf16_operand_ref) on a bf16 path, as float64 copies on a float32 one. weights: of the path
    computing the weight gradient (beside an input-gradient-only path, the one routed without dx)."""
    path = plan.route(call)
    if weights and path in plan.INPUT_GRAD_ONLY:
        path = plan.route_unforced(plan.weight_grad_call(call))
    if path in plan.BF16_PATHS:
        return bf16_operand_ref
    return lambda a: a.astype(np.float64)

PATHS = [pytest.param("native", marks=pytest.mark.skipif(not has_avx512_bf16(), reason="no AVX512_BF16")),
         "emulated"]


@pytest.fixture(params=PATHS)
def bf16_path(request, monkeypatch):
    if request.param == "emulated":
        monkeypatch.setenv("MINIALEX_BF16", "emulate")
    else:
        monkeypatch.delenv("MINIALEX_BF16", raising=False)
    return request.param


def _closer_to_bf16(ours, bf16_model, fp32_model):
    """The worst-case bound grows with k faster than bf16's rounding does: also check that the
    result is the bf16 arithmetic's and not float32's (an ignored precision would pass the bound)."""
    assert np.abs(ours - bf16_model).max() < 0.05 * np.abs(fp32_model - bf16_model).max()


def _bound(k, *terms):
    """float32 summation of k exact products: |err| <= (k + 2) 2^-24 sum |a b| (per element)."""
    return (k + 2) * 2.0 ** -24 * sum(terms) + 1e-30


# (name, cin, cout, hw, k, stride, padding, groups): torchvision's AlexNet and the paper's groups
# (conv1, stride 4, keeps float32 products: tests/kernels/test_conv_paths.py routes it)
CONVS = [("conv2", 64, 192, 27, 5, 1, 2, 1), ("conv3", 192, 384, 13, 3, 1, 1, 1),
         ("conv4", 384, 256, 13, 3, 1, 1, 1), ("conv5", 256, 256, 13, 3, 1, 1, 1),
         ("conv2 grouped", 96, 256, 27, 5, 1, 2, 2)]


@pytest.mark.parametrize("layer", CONVS, ids=[c[0] for c in CONVS])
def test_alexnet_convolutions_match_the_bf16_model(layer, bf16_path):
    name, cin, cout, hw, k, s, p, g = layer
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, cin, hw, hw)).astype(np.float32)
    w = (rng.standard_normal((cout, cin // g, k, k)) / np.sqrt(cin // g * k * k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    geo = geometry(x.shape, w.shape, s, p, g)
    threads = numba.get_num_threads()
    r = _rounding(plan.describe("forward", geo, np.float32, threads, precision="bf16"))
    y = conv2d_forward(x, w, b, s, p, g, relu=True, precision="bf16")
    ref = conv2d_forward_ref(r(x), r(w), b.astype(np.float64), s, p, g, relu=True)
    kk = cin // g * k * k
    absref = conv2d_forward_ref(np.abs(r(x)), np.abs(r(w)), None, s, p, g)
    assert np.all(np.abs(y - ref) <= _bound(kk, absref) + 2.0 ** -24 * np.abs(b).max())
    _closer_to_bf16(y, ref, conv2d_forward_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                               s, p, g, relu=True))
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dw = np.zeros_like(w)
    db = np.zeros_like(b)
    call = plan.describe("backward", geo, np.float32, threads, precision="bf16")
    r, rw = _rounding(call), _rounding(call, weights=True)
    dx = conv2d_backward(dy, x, w, dw, db, s, p, g, relu_out=y, precision="bf16")
    dym = np.where(y <= 0, 0, dy).astype(np.float32)
    dx_r = conv2d_backward_ref(r(dym), r(x), r(w), np.zeros(w.shape), None, s, p, g)
    dx_abs = conv2d_backward_ref(np.abs(r(dym)), np.abs(r(x)), np.abs(r(w)), np.zeros(w.shape), None, s, p, g)
    np.testing.assert_allclose(db, dym.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-3)
    dw64 = np.zeros(w.shape)
    conv2d_backward_ref(dym.astype(np.float64), x.astype(np.float64), w.astype(np.float64), dw64, None, s, p, g,
                        need_dx=False)
    if rw is bf16_operand_ref:
        dw_r, dw_abs = np.zeros(w.shape), np.zeros(w.shape)
        conv2d_backward_ref(rw(dym), rw(x), rw(w), dw_r, None, s, p, g, need_dx=False)
        conv2d_backward_ref(np.abs(rw(dym)), np.abs(rw(x)), np.abs(rw(w)), dw_abs, None, s, p, g, need_dx=False)
        assert np.all(np.abs(dw - dw_r) <= _bound(2 * y.shape[2] * y.shape[3], dw_abs))
        _closer_to_bf16(dw, dw_r, dw64)
    else:   # a float32 path (Winograd's too): within the plan's 1e-5 of the largest gradient
        assert np.abs(dw - dw64).max() <= 1e-5 * np.abs(dw64).max()
    assert np.all(np.abs(dx - dx_r) <= _bound(cout // g * k * k, dx_abs))


@pytest.mark.parametrize("n", [1, 8])
def test_linear_layers_at_small_batch_keep_float32_products(n, bf16_path):
    # at most SMALL_BATCH rows: bound by reading the weights, the float32 kernels are faster
    rng = np.random.default_rng(n)
    x, w = rng.standard_normal((n, 512)).astype(np.float32), rng.standard_normal((64, 512)).astype(np.float32)
    dy, b = rng.standard_normal((n, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    assert np.array_equal(linear_forward(x, w, b, precision="bf16"), linear_forward(x, w, b))
    grads = {}
    for precision in ("fp32", "bf16"):
        dw, db = np.zeros_like(w), np.zeros_like(b)
        grads[precision] = (linear_backward(dy, x, w, dw, db, precision=precision), dw, db)
    assert all(np.array_equal(a, c) for a, c in zip(grads["fp32"], grads["bf16"]))


@pytest.mark.parametrize("n", [9, 64])
@pytest.mark.parametrize("fin,fout", [(9216, 4096), (4096, 4096), (4096, 1000)], ids=["fc6", "fc7", "fc8"])
def test_alexnet_linear_layers_match_the_bf16_model(n, fin, fout, bf16_path):
    r = bf16_operand_ref     # more than 8 rows: every product on the bf16 GEMM
    rng = np.random.default_rng(n)
    if fin == 9216 and n == 64:
        fin = 4608   # half of fc6's inputs: the same kernels, half the reference's time
    x = rng.standard_normal((n, fin)).astype(np.float32)
    w = (rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(np.float32)
    b = rng.standard_normal(fout).astype(np.float32)
    y = linear_forward(x, w, b, precision="bf16")
    ref = linear_forward_ref(r(x), r(w), b.astype(np.float64))
    assert np.all(np.abs(y - ref) <= _bound(fin, np.abs(r(x)) @ np.abs(r(w)).T) + 2.0 ** -24 * np.abs(b).max())
    _closer_to_bf16(y, ref, linear_forward_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)))
    dy = rng.standard_normal((n, fout)).astype(np.float32)
    dw0 = rng.standard_normal(w.shape).astype(np.float32)   # grads accumulate onto what is there
    dw = dw0.copy()
    db = np.zeros_like(b)
    dx = linear_backward(dy, x, w, dw, db, precision="bf16")
    dw_r = dw0.astype(np.float64)
    dx_r = linear_backward_ref(r(dy), r(x), r(w), dw_r, None)
    assert np.all(np.abs(dx - dx_r) <= _bound(fout, np.abs(r(dy)) @ np.abs(r(w))))
    _closer_to_bf16(dx, dx_r, dy.astype(np.float64) @ w.astype(np.float64))
    assert np.all(np.abs(dw - dw_r) <= _bound(n, np.abs(r(dy)).T @ np.abs(r(x)), np.abs(dw0)))
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-4)
