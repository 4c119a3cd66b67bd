"""Every convolution path, forced, on shapes it accepts (drawn by Hypothesis, plus AlexNet's
conv1-conv5 and the grouped originals): forward, input gradient and weight and bias gradients
against the float64 reference; and forcing a path on a shape it refuses raises, naming the
path and the rule. plan.accepts says which shapes a path accepts."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minialex.kernels.conv import (conv2d_backward, conv2d_backward_ref, conv2d_forward, conv2d_forward_ref,
                                   force_path, plan)
from minialex.kernels.conv.layout import geometry
from minialex.kernels.gemm_bf16 import bf16_operand_ref

MAX_THREADS = numba.config.NUMBA_NUM_THREADS

# (name, n, cin, cout, hw, k, stride, padding, groups): torchvision's AlexNet and the grouped
# original (conv2, conv4, conv5 in two groups)
ALEXNET = [
    ("conv1", 3, 64, 224, 11, 4, 2, 1),
    ("conv2", 64, 192, 27, 5, 1, 2, 1),
    ("conv3", 192, 384, 13, 3, 1, 1, 1),
    ("conv4", 384, 256, 13, 3, 1, 1, 1),
    ("conv5", 256, 256, 13, 3, 1, 1, 1),
    ("conv2 grouped", 96, 256, 27, 5, 1, 2, 2),
    ("conv4 grouped", 384, 384, 13, 3, 1, 1, 2),
]


class Case:
    """A convolution call with random data; `call(phase)` is what the plan sees."""

    def __init__(self, n, cin, cout, h, w, k, stride, padding, groups, dtype, bias, relu, need_dx,
                 accumulate, threads, seed, precision="fp32"):
        rng = np.random.default_rng(seed)
        self.x = rng.standard_normal((n, cin, h, w)).astype(dtype)
        fan_in = cin // groups * k[0] * k[1]
        self.w = (rng.standard_normal((cout, cin // groups, *k)) / np.sqrt(fan_in)).astype(dtype)
        self.b = rng.standard_normal(cout).astype(dtype) if bias else None
        self.stride, self.padding, self.groups, self.relu = stride, padding, groups, relu
        self.need_dx, self.accumulate = need_dx, accumulate
        self.threads = min(threads, MAX_THREADS)
        self.rng = rng
        self.geo = geometry(self.x.shape, self.w.shape, stride, padding, groups)
        self.precision = precision

    def call(self, phase):
        return plan.describe(phase, self.geo, self.x.dtype, self.threads, self.need_dx, precision=self.precision)

    def operand(self, a, path):
        """a as the products of `path` see it, in float64: rounded to bf16 on a bf16 path at
        precision bf16 (a float32 path computes a bf16 call in float32)."""
        if self.precision == "bf16" and path in plan.BF16_PATHS:
            return bf16_operand_ref(a)
        return a.astype(np.float64)

    def args(self):
        return self.stride, self.padding, self.groups


def _run(threads, fn):
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        return fn()
    finally:
        numba.set_num_threads(before)


def _close(a, ref, dtype):
    scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    if dtype == np.float64:
        np.testing.assert_allclose(a, ref, rtol=1e-10, atol=1e-12 * scale)
    else:
        np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5 * scale)


def check_forward(path, c):
    with force_path(path):
        y = _run(c.threads, lambda: conv2d_forward(c.x, c.w, c.b, *c.args(), relu=c.relu, precision=c.precision))
    b64 = None if c.b is None else c.b.astype(np.float64)
    ref = conv2d_forward_ref(c.operand(c.x, path), c.operand(c.w, path), b64, *c.args(), relu=c.relu)
    assert y.dtype == c.x.dtype and y.shape == ref.shape
    _close(y, ref, c.x.dtype)
    return ref


def check_backward(path, c, y_ref=None):
    if y_ref is None:
        y_ref = conv2d_forward_ref(c.operand(c.x, path), c.operand(c.w, path), None, *c.args(), relu=c.relu)
    dtype = c.x.dtype
    dy = c.rng.standard_normal(y_ref.shape).astype(dtype)
    relu_out = y_ref.astype(dtype) if c.relu else None
    start = c.rng.standard_normal(c.w.shape).astype(dtype)
    dw, db = start.copy(), (np.ones(c.w.shape[0], dtype) if c.b is not None else None)
    with force_path(path):
        dx = _run(c.threads, lambda: conv2d_backward(dy, c.x, c.w, dw, db, *c.args(), need_dx=c.need_dx,
                                                     accumulate=c.accumulate, relu_out=relu_out,
                                                     precision=c.precision))
    dw_r, db_r = start.astype(np.float64), (np.ones(c.w.shape[0]) if c.b is not None else None)
    # dy masked by the ReLU first (exact), then rounded as the products see it; db sums it unrounded
    dym = dy if relu_out is None else np.where(relu_out <= 0, 0, dy).astype(dtype)
    dx_r = conv2d_backward_ref(c.operand(dym, path), c.operand(c.x, path), c.operand(c.w, path),
                               np.zeros(c.w.shape), None, *c.args(), need_dx=c.need_dx)
    # the weight gradient in the arithmetic of the path that computes it (an input-gradient-only
    # path's comes from the path routed without dx, which may compute a bf16 call in float32)
    wpath = plan.route_unforced(plan.weight_grad_call(c.call("backward"))) if path in plan.INPUT_GRAD_ONLY else path
    conv2d_backward_ref(c.operand(dym, wpath), c.operand(c.x, wpath), c.operand(c.w, wpath), dw_r, None,
                        *c.args(), need_dx=False, accumulate=c.accumulate)
    if db_r is not None:
        total = dym.astype(np.float64).sum(axis=(0, 2, 3))
        db_r = db_r + total if c.accumulate else total
    if c.need_dx:
        assert dx.dtype == dtype and dx.shape == c.x.shape
        _close(dx, dx_r, dtype)
    else:
        assert dx is None
    _close(dw, dw_r, dtype)
    if db is not None:
        _close(db, db_r, dtype)


@st.composite
def cases(draw, path, phase):
    """A Case that `path` accepts in `phase`, small enough to run in milliseconds."""
    if path == "bf16":          # float32 at precision bf16; any groups, kernel, stride, padding
        groups = draw(st.integers(1, 3))
        k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
        case = Case(draw(st.integers(1, 3)), groups * draw(st.integers(1, 12)), groups * draw(st.integers(1, 12)),
                    max(draw(st.integers(1, 12)), k[0] - 2 * padding[0]),
                    max(draw(st.integers(1, 12)), k[1] - 2 * padding[1]), k,
                    (draw(st.integers(1, 4)), draw(st.integers(1, 4))), padding, groups, np.float32,
                    draw(st.booleans()), draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
                    draw(st.sampled_from([1, 2])), draw(st.integers(0, 2**31)), precision="bf16")
        assert plan.accepts(path, case.call(phase)), plan.broken(path, case.call(phase))
        return case
    if path == "direct_bf16":   # the direct family's rules at precision bf16
        cout = draw(st.sampled_from([32, 64]))
        cin = draw(st.sampled_from([32, 64])) if phase == "backward" else 2 * draw(st.integers(1, 20))
        k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
        padding = (draw(st.integers(0, 4)) % k[0], draw(st.integers(0, 4)) % k[1])
        case = Case(draw(st.integers(1, 3)), cin, cout, max(draw(st.integers(1, 12)), k[0]),
                    max(draw(st.integers(1, 12)), k[1]), k, (1, 1), padding, 1, np.float32, draw(st.booleans()),
                    draw(st.booleans()), True, draw(st.booleans()), draw(st.sampled_from([1, 2])),
                    draw(st.integers(0, 2**31)), precision="bf16")
        assert plan.accepts(path, case.call(phase)), plan.broken(path, case.call(phase))
        return case
    if path in ("winograd", "winograd4"):   # float32, groups 1, 3x3, stride 1, padding 1; any channels, plane
        n, cin, cout = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
        case = Case(n, cin, cout, draw(st.integers(1, 12)), draw(st.integers(1, 12)), (3, 3), (1, 1), (1, 1), 1,
                    np.float32, draw(st.booleans()), draw(st.booleans()), True, draw(st.booleans()),
                    draw(st.sampled_from([1, 2])), draw(st.integers(0, 2**31)))
        assert plan.accepts(path, case.call(phase)), plan.broken(path, case.call(phase))
        return case
    direct = path in ("direct", "direct_split")
    groups = 1 if direct else draw(st.integers(1, 3))
    cout = draw(st.sampled_from([32, 64])) if direct else groups * draw(st.integers(1, 6))
    if path == "direct" and phase == "backward":
        cin = draw(st.sampled_from([32, 64]))          # the input gradient's panels
    else:
        cin = groups * draw(st.integers(1, 12 if direct else 6))
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    stride = (1, 1) if path == "direct" else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    if direct and not (path == "direct_split" and phase == "backward"):
        padding = (padding[0] % k[0], padding[1] % k[1])  # "padding < kernel"
    # at least one output pixel, by construction
    h = max(draw(st.integers(1, 12)), k[0] - 2 * padding[0])
    w = max(draw(st.integers(1, 12)), k[1] - 2 * padding[1])
    threads = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 3))
    if path == "blocked" and phase == "backward":
        n = max(n, min(threads, MAX_THREADS))          # "batch >= threads"
    dtype = draw(st.sampled_from([np.float32, np.float64])) if path == "batched" else np.float32
    need_dx = False if (path == "direct_split" and phase == "backward") else draw(st.booleans())
    case = Case(n, cin, cout, h, w, k, stride, padding, groups, dtype, draw(st.booleans()), draw(st.booleans()),
                need_dx, draw(st.booleans()), threads, draw(st.integers(0, 2**31)))
    assert plan.accepts(path, case.call(phase)), plan.broken(path, case.call(phase))
    return case


@pytest.mark.parametrize("path", plan.PATHS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_forward_of_every_path_matches_reference(path, data):
    check_forward(path, data.draw(cases(path, "forward")))


@pytest.mark.parametrize("path", plan.PATHS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_backward_of_every_path_matches_reference(path, data):
    check_backward(path, data.draw(cases(path, "backward")))


@pytest.mark.parametrize("layer", ALEXNET, ids=[a[0] for a in ALEXNET])
def test_alexnet_layers_on_every_path_that_accepts_them(layer):
    # batch 2 so the blocked backward (at least one image per thread) takes part at 2 threads;
    # conv1's input gradient is never wanted in training, but every path that can is checked
    name, cin, cout, hw, k, s, p, g = layer
    threads = min(2, MAX_THREADS)
    c = Case(2, cin, cout, hw, hw, (k, k), (s, s), (p, p), g, np.float32, True, True, True, False, threads, 5)
    y_ref = None
    ran = []
    for path in plan.PATHS:
        if plan.accepts(path, c.call("forward")):
            y_ref = check_forward(path, c)
            ran.append(("forward", path))
    for need_dx in (True, False):
        c.need_dx = need_dx
        for path in plan.PATHS:
            if plan.accepts(path, c.call("backward")):
                check_backward(path, c, y_ref)
                ran.append(("backward", path, need_dx))
    # the float32 paths AlexNet routes to in training are among those checked
    assert ("forward", "direct_split" if name in ("conv1", "conv2") else "direct") in ran or g == 2
    assert ("backward", "blocked", True) in ran


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2), cin=st.sampled_from([3, 16, 32]), cout=st.sampled_from([8, 32]),
       groups=st.sampled_from([1, 2]), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 4),
       dtype=st.sampled_from([np.float32, np.float64]), need_dx=st.booleans(), threads=st.sampled_from([1, 2]),
       path=st.sampled_from(plan.PATHS), phase=st.sampled_from(plan.PHASES),
       precision=st.sampled_from(plan.PRECISIONS))
def test_forcing_a_path_raises_exactly_on_the_shapes_it_refuses(n, cin, cout, groups, k, s, p, dtype, need_dx,
                                                                  threads, path, phase, precision):
    if cin % groups:
        cin = 32
    c = Case(n, cin, cout, 6 + k, 6 + k, (k, k), (s, s), (p, p), groups, dtype, True, False, need_dx, True,
             threads, 0, precision)
    broken = plan.broken(path, c.call(phase))
    run = check_forward if phase == "forward" else check_backward
    if not broken:
        run(path, c)
        return
    with pytest.raises(ValueError) as err:
        run(path, c)
    message = str(err.value)
    assert repr(path) in message and phase in message
    assert all(rule.split(" (")[0] in message for rule in broken), (message, broken)


def _alexnet_call(layer, phase, batch, threads, need_dx=True, dtype="float32", precision="fp32"):
    name, cin, cout, hw, k, s, p, g = layer
    geo = geometry((batch, cin, hw, hw), (cout, cin // g, k, k), s, p, g)
    return plan.describe(phase, geo, dtype, threads, need_dx, precision=precision)


def test_route_of_alexnet_layers():
    conv = {a[0]: a for a in ALEXNET}
    # training at batch 8 on 2 threads: conv1 without its input gradient
    assert plan.route(_alexnet_call(conv["conv1"], "forward", 8, 2)) == "direct_split"
    assert plan.route(_alexnet_call(conv["conv1"], "backward", 8, 2, need_dx=False)) == "direct_split"
    assert plan.route(_alexnet_call(conv["conv2"], "forward", 8, 2)) == "direct_split"   # plane 729
    assert plan.route(_alexnet_call(conv["conv2"], "backward", 8, 2)) == "direct"
    for name in ("conv3", "conv4", "conv5"):
        for phase in plan.PHASES:   # the 3x3 layers, plane 169: winograd; from batch x plane 8192 F(4x4)
            assert plan.route(_alexnet_call(conv[name], phase, 8, 2)) == "winograd"
            assert plan.route(_alexnet_call(conv[name], phase, 48, 2)) == "winograd"
            assert plan.route(_alexnet_call(conv[name], phase, 64, 2)) == "winograd4"
        assert plan.label(_alexnet_call(conv[name], "backward", 8, 2)) == "winograd"
    # the cifar model's 3x3 layers (6x6 plane): F(2x2) whatever the batch
    cifar = ("cifar conv4", 128, 192, 6, 3, 1, 1, 1)
    for phase in plan.PHASES:
        assert plan.route(_alexnet_call(cifar, phase, 128, 2)) == "winograd"
        assert plan.route(_alexnet_call(cifar, phase, 512, 2)) == "winograd"
    # grouped layers: blocked with an image per thread, batched below that; float64: batched
    assert plan.route(_alexnet_call(conv["conv4 grouped"], "forward", 1, 2)) == "blocked"
    assert plan.route(_alexnet_call(conv["conv4 grouped"], "backward", 2, 2)) == "blocked"
    assert plan.route(_alexnet_call(conv["conv4 grouped"], "backward", 1, 2)) == "batched"
    assert plan.route(_alexnet_call(conv["conv3"], "forward", 8, 2, dtype="float64")) == "batched"
    # conv1 with its input gradient (3 input channels, stride 4)
    assert plan.route(_alexnet_call(conv["conv1"], "backward", 8, 2)) == "blocked"


@pytest.mark.parametrize("emulate", [False, True])
def test_route_of_alexnet_layers_in_bf16(monkeypatch, emulate):
    # the same routes whether the CPU has the instruction or the arithmetic is emulated
    if emulate:
        monkeypatch.setenv("MINIALEX_BF16", "emulate")
    else:
        monkeypatch.delenv("MINIALEX_BF16", raising=False)
    conv = {a[0]: a for a in ALEXNET}
    for name in ("conv2", "conv3", "conv4", "conv5"):
        for phase in plan.PHASES:
            assert plan.route(_alexnet_call(conv[name], phase, 8, 2, precision="bf16")) == "direct_bf16"
    # their weight gradients: float32 on Winograd (conv3-5) and direct_split (conv2), both measured
    # faster than im2col + the bf16 GEMM
    labels = [plan.label(_alexnet_call(conv[name], "backward", 8, 2, precision="bf16"))
              for name in ("conv2", "conv3", "conv4", "conv5")]
    assert labels == ["direct_bf16+direct_split"] + ["direct_bf16+winograd"] * 3
    assert plan.label(_alexnet_call(conv["conv4"], "backward", 64, 2, precision="bf16")) == "direct_bf16+winograd4"
    # the grouped layers: forward im2col + bf16 GEMM, backward with dx float32 (blocked);
    # conv1 (stride 4, 3 channels): float32, as at precision fp32
    assert plan.route(_alexnet_call(conv["conv4 grouped"], "forward", 8, 2, precision="bf16")) == "bf16"
    assert plan.route(_alexnet_call(conv["conv4 grouped"], "backward", 8, 2, precision="bf16")) == "blocked"
    for phase, need_dx in (("forward", True), ("backward", False)):
        assert plan.route(_alexnet_call(conv["conv1"], phase, 8, 2, need_dx, precision="bf16")) == "direct_split"


def test_forced_path_by_environment_and_unknown_names(monkeypatch):
    call = _alexnet_call(ALEXNET[2], "forward", 8, 2)
    monkeypatch.setenv(plan.ENV, "batched")
    assert plan.route(call) == "batched"
    with force_path("blocked"):          # the context manager wins over the environment
        assert plan.route(call) == "blocked"
    monkeypatch.setenv(plan.ENV, "fft")
    with pytest.raises(ValueError, match="fft"):
        plan.route(call)
    monkeypatch.delenv(plan.ENV)
    with pytest.raises(ValueError, match="nope"):
        with force_path("nope"):
            pass
    assert plan.route(call) == "winograd"


def test_an_input_grad_only_path_forced_without_dx_refuses_it_and_its_weight_gradient_is_routed():
    call = _alexnet_call(ALEXNET[3], "backward", 8, 2, need_dx=False, precision="bf16")
    assert "dx wanted" in " ".join(plan.broken("direct_bf16", call))
    with force_path("direct_bf16"):
        with pytest.raises(ValueError, match="dx wanted"):
            plan.route(call)
        # the weight gradient beside a forced direct_bf16 input gradient is routed, not forced
        assert plan.route_unforced(plan.weight_grad_call(call._replace(need_dx=True))) == "winograd"
    # the Winograd paths compute the whole backward, with or without dx
    assert plan.route(_alexnet_call(ALEXNET[3], "backward", 8, 2, need_dx=False)) == "winograd"


def test_the_table_has_a_catch_all_last_rule_per_phase_and_bf16_rules_where_they_pay():
    for phase in plan.PHASES:
        rules = [r for r in plan.RULES if r.phase == phase]
        assert {r.path for r in rules} == set(plan.PATHS)
        assert rules[-1].needs == () and rules[-1].prefer == ()
        assert {r.path for r in rules if "bf16" in r.needs} == {"direct_bf16", "bf16"}
        assert rules[0].path == "direct_bf16"
    forward = [r.path for r in plan.RULES if r.phase == "forward"]
    backward = [r.path for r in plan.RULES if r.phase == "backward"]
    assert forward.index("bf16") == 1
    # a weight gradient (no dx) takes Winograd or direct_split before im2col + the bf16 GEMM
    assert max(backward.index(p) for p in ("winograd4", "winograd", "direct_split")) < backward.index("bf16")
    assert all(name in plan.REQUIREMENTS for r in plan.RULES for name in r.needs + r.prefer)


def test_summary_shows_the_path_of_each_convolution(tmp_path):
    from helpers import run_cli
    from minialex import models
    rows = models.summary(models.alexnet(variant="paper"), (1, 3, 227, 227), print_table=False, threads=2)
    convs = [r for r in rows if r["layer"] == "Conv2d"]
    # batch 1 on 2 threads: the grouped layers' backward has fewer images than threads
    assert [r["paths"] for r in convs] == [("direct_split", "direct_split"), ("blocked", "batched"),
                                           ("winograd", "winograd"), ("blocked", "batched"),
                                           ("blocked", "batched")]
    assert all(r["paths"] is None for r in rows if r["layer"] != "Conv2d")
    r = run_cli(["summary", "-batch", "8", "-threads", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "Conv2d" in line]
    assert [line.split()[-3:] for line in lines] == [["direct_split", "/", "direct_split"],
                                                      ["direct_split", "/", "direct"]] + [["winograd", "/", "winograd"]] * 3
    assert "(8, 64, 55, 55)" in lines[0]


@pytest.mark.parametrize("doc", ["docs/architecture.md", "README.md"])
def test_the_docs_show_the_routing_table_as_it_is(doc):
    import os
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", doc), encoding="utf-8").read()
    for line in plan.table():
        assert "    " + line in text, line
