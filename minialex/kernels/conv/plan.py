"""Which path computes a convolution: the routing table, the one place that decides.

A path is named by what it is (see each module's docstring):
    direct        float32 micro-kernel on channels-last copies (stride 1)        direct.py
    direct_split  the same micro-kernel on a phase-split copy (any stride)        direct.py
    blocked       float32 im2col block -> GEMM -> bias/ReLU per cache block       blocked.py
    batched       im2col + GEMM over chunks of the batch, any dtype               batched.py
    winograd      F(2x2, 3x3) minimal filtering: forward, input and weight gradient winograd.py
    winograd4     the same with F(4x4, 3x3): 4x fewer multiplications than direct,  winograd.py
                  against 2.25x, for 2.2x the transformed weights
    direct_bf16   the direct micro-kernel on bf16 pairs (vdpbf16ps): forward and   direct.py
                  input gradient (its weight gradient takes the path routed without dx)
    bf16          im2col + bf16 GEMM (float32 sums) over chunks of the batch       batched.py

RULES is read top to bottom for the call's phase; the first rule whose requirements all hold
is taken. A bf16 call (precision "bf16": products of bf16-rounded operands) takes a bf16 path
where one serves it and pays (docs/performance.md); others compute in float32: a first layer's
3 input channels, a backward with an input gradient that direct_bf16 cannot take, and the
weight gradient beside direct_bf16's input gradient wherever Winograd or direct_split serve it
(both measured faster than im2col + the bf16 GEMM, so the bf16 backward rule comes after
them). `needs` is what a path can compute at all (a forced path must meet it); `prefer` adds
when it is also the faster choice. The reasons and measurements behind each rule are in
docs/performance.md.
"""
import contextlib
import contextvars
import os
from typing import NamedTuple

import numpy as np

PATHS = ("direct_bf16", "bf16", "winograd4", "winograd", "direct", "direct_split", "blocked", "batched")
PRECISIONS = ("fp32", "bf16")
# paths whose backward computes only the input gradient; the weight and bias gradients come from
# the path the table gives the same call without dx (weight_grad_call)
INPUT_GRAD_ONLY = ("direct_bf16",)
BF16_PATHS = ("direct_bf16", "bf16")  # the paths whose products take bf16-rounded operands
PHASES = ("forward", "backward")
ENV = "MINIALEX_CONV_PATH"

# Stride-1 forwards with at least this many output pixels per image take direct_split (NCHW
# tiles) instead of direct (channels-last): conv2's 729 is faster that way, conv3-5's 169 not.
SPLIT_MIN_PLANE = 400
# Winograd is taken where it measured faster than direct (docs/performance.md): with at least
# this many input and output channels (AlexNet's conv3-5, the cifar model's 3x3 layers).
WINOGRAD_MIN_CHANNELS = 128
# F(4x4) pays for transforming 36 points of weights (twice F(2x2)'s 16 per call) from this many
# output pixels per call on (batch x plane: AlexNet's 3x3 layers from batch 49 on), on planes
# of at least WINOGRAD_MIN_PLANE (its 4x4 tiles cover a 6x6 plane as 8x8: F(2x2) there)
WINOGRAD_MIN_PLANE = 100
WINOGRAD4_MIN_PIXELS = 8192
PANEL = 32  # output (and, for the direct backward, input) channels per micro-tile


class Call(NamedTuple):
    """What the plan looks at in one convolution call."""
    phase: str          # "forward" or "backward"
    dtype: str          # of x and w: "float32", "float64"
    batch: int
    cin: int
    cout: int
    groups: int
    kernel: tuple       # (kh, kw)
    stride: tuple       # (sh, sw)
    padding: tuple      # (ph, pw)
    plane: int          # output pixels per image, OH*OW
    threads: int
    need_dx: bool = True
    grads_float32: bool = True   # backward: dw C-contiguous float32, db float32 or None
    precision: str = "fp32"      # products of "bf16": operands rounded to bfloat16, float32 sums


# name -> (holds(call), what the call has instead, for the refusal message)
REQUIREMENTS = {
    "bf16": (lambda c: c.precision == "bf16" and c.dtype == "float32",
             lambda c: f"precision {c.precision}, dtype {c.dtype}"),
    "float32": (lambda c: c.dtype == "float32", lambda c: f"dtype {c.dtype}"),
    "Cin even": (lambda c: c.cin % 2 == 0, lambda c: f"Cin {c.cin}"),
    "groups 1": (lambda c: c.groups == 1, lambda c: f"groups {c.groups}"),
    "Cout in 32s": (lambda c: c.cout % PANEL == 0, lambda c: f"Cout {c.cout}"),
    "Cin in 32s": (lambda c: c.cin % PANEL == 0, lambda c: f"Cin {c.cin}"),
    "stride 1": (lambda c: tuple(c.stride) == (1, 1), lambda c: f"stride {tuple(c.stride)}"),
    "padding < kernel": (lambda c: c.padding[0] < c.kernel[0] and c.padding[1] < c.kernel[1],
                         lambda c: f"padding {tuple(c.padding)}, kernel {tuple(c.kernel)}"),
    "no dx": (lambda c: not c.need_dx, lambda c: "the input gradient is wanted"),
    "dx wanted": (lambda c: c.need_dx, lambda c: "no input gradient is wanted"),
    "3x3": (lambda c: tuple(c.kernel) == (3, 3), lambda c: f"kernel {tuple(c.kernel)}"),
    "padding 1": (lambda c: tuple(c.padding) == (1, 1), lambda c: f"padding {tuple(c.padding)}"),
    f"channels >= {WINOGRAD_MIN_CHANNELS}": (lambda c: min(c.cin, c.cout) >= WINOGRAD_MIN_CHANNELS,
                                             lambda c: f"Cin {c.cin}, Cout {c.cout}"),
    f"plane >= {WINOGRAD_MIN_PLANE}": (lambda c: c.plane >= WINOGRAD_MIN_PLANE, lambda c: f"plane {c.plane}"),
    f"batch x plane >= {WINOGRAD4_MIN_PIXELS}": (lambda c: c.batch * c.plane >= WINOGRAD4_MIN_PIXELS,
                                                 lambda c: f"batch x plane {c.batch * c.plane}"),
    "float32 grads": (lambda c: c.grads_float32, lambda c: "dw/db not C-contiguous float32"),
    "batch >= threads": (lambda c: c.batch >= c.threads, lambda c: f"batch {c.batch} < {c.threads} threads"),
    f"plane < {SPLIT_MIN_PLANE}": (lambda c: c.plane < SPLIT_MIN_PLANE, lambda c: f"plane {c.plane}"),
}


WINOGRAD = ("float32", "groups 1", "3x3", "stride 1", "padding 1")
WINOGRAD4_PREFER = (f"channels >= {WINOGRAD_MIN_CHANNELS}", f"plane >= {WINOGRAD_MIN_PLANE}",
                    f"batch x plane >= {WINOGRAD4_MIN_PIXELS}")


class Rule(NamedTuple):
    phase: str
    path: str
    needs: tuple        # what the path can compute
    prefer: tuple = ()  # when routing also takes it


RULES = (
    # phase       path            needs                                                   prefer
    Rule("forward", "direct_bf16", ("bf16", "groups 1", "Cout in 32s", "Cin even", "stride 1", "padding < kernel")),
    Rule("forward", "bf16", ("bf16",), ("stride 1", "Cin in 32s")),
    Rule("forward", "winograd4", WINOGRAD, WINOGRAD4_PREFER),
    Rule("forward", "winograd", WINOGRAD, (f"channels >= {WINOGRAD_MIN_CHANNELS}",)),
    Rule("forward", "direct", ("float32", "groups 1", "Cout in 32s", "stride 1", "padding < kernel"),
         (f"plane < {SPLIT_MIN_PLANE}",)),
    Rule("forward", "direct_split", ("float32", "groups 1", "Cout in 32s", "padding < kernel")),
    Rule("forward", "blocked", ("float32",)),
    Rule("forward", "batched", ()),
    Rule("backward", "direct_bf16", ("bf16", "groups 1", "Cout in 32s", "Cin in 32s", "stride 1",
                                     "padding < kernel", "dx wanted", "float32 grads")),
    Rule("backward", "winograd4", WINOGRAD + ("float32 grads",), WINOGRAD4_PREFER),
    Rule("backward", "winograd", WINOGRAD + ("float32 grads",), (f"channels >= {WINOGRAD_MIN_CHANNELS}",)),
    Rule("backward", "direct", ("float32", "groups 1", "Cout in 32s", "Cin in 32s", "stride 1",
                                "padding < kernel", "float32 grads"), ("dx wanted",)),
    Rule("backward", "direct_split", ("float32", "groups 1", "Cout in 32s", "no dx", "float32 grads")),
    Rule("backward", "bf16", ("bf16",), ("stride 1", "Cin in 32s", "no dx")),
    Rule("backward", "blocked", ("float32", "batch >= threads")),
    Rule("backward", "batched", ()),
)

_forced = contextvars.ContextVar("minialex_conv_path", default=None)


def _rule(phase, path):
    if phase not in PHASES:
        raise ValueError(f"conv phase must be one of {PHASES}, got {phase!r}")
    if path not in PATHS:
        raise ValueError(f"conv path must be one of {PATHS}, got {path!r}")
    return next(r for r in RULES if r.phase == phase and r.path == path)


def broken(path, call):
    """The requirements of `path` that `call` breaks, each with what the call has instead."""
    rule = _rule(call.phase, path)
    return [f"{name} ({REQUIREMENTS[name][1](call)})" for name in rule.needs
            if not REQUIREMENTS[name][0](call)]


def accepts(path, call):
    """Whether `path` can compute `call` (forced, whether or not routing would choose it)."""
    return not broken(path, call)


def forced():
    """The path forced by force_path(), else by the MINIALEX_CONV_PATH environment variable, else None."""
    return _forced.get() or os.environ.get(ENV) or None


@contextlib.contextmanager
def force_path(path):
    """Every convolution in the block takes `path`; one it does not accept raises ValueError."""
    _rule("forward", path)
    token = _forced.set(path)
    try:
        yield
    finally:
        _forced.reset(token)


def route(call):
    """The path `call` takes: the forced one (ValueError if it refuses the call), else the first
    rule of the table for the call's phase whose needs and preferences all hold."""
    path = forced()
    if path is not None:
        why = broken(path, call)
        if why:
            raise ValueError(f"conv path {path!r} forced, but the {call.phase} of this call breaks "
                             f"its rule: {', '.join(why)}")
        return path
    return route_unforced(call)


def weight_grad_call(call):
    """The call whose route computes the weight gradient beside an INPUT_GRAD_ONLY path's input
    gradient: the same backward without dx (which those paths refuse, whatever is forced)."""
    return call._replace(need_dx=False)


def route_unforced(call):
    """The path the table gives `call`, ignoring any forced path."""
    for rule in RULES:
        if rule.phase == call.phase and all(REQUIREMENTS[n][0](call) for n in rule.needs + rule.prefer):
            return rule.path
    raise ValueError(f"no convolution path for precision {call.precision!r} and dtype {call.dtype}")


def label(call):
    """The route of `call` as shown to users: an INPUT_GRAD_ONLY backward names its weight gradient's path."""
    path = route(call)
    if path in INPUT_GRAD_ONLY and call.phase == "backward":
        return f"{path}+{route_unforced(weight_grad_call(call))}"
    return path


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def describe(phase, g, dtype, threads, need_dx=True, grads_float32=True, precision="fp32"):
    """The Call of a convolution with layout.Geometry g."""
    check_precision(precision)
    return Call(phase, np.dtype(dtype).name, g.n, g.cin, g.cout, g.groups, (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw),
                g.oh * g.ow, int(threads), bool(need_dx), bool(grads_float32), precision)


def table():
    """The routing table as text lines (for docs and `python -m minialex summary`)."""
    lines = [f"{'phase':<9}{'path':<14}needs (and, to be chosen, prefers)"]
    for r in RULES:
        text = ", ".join(r.needs) or "anything"
        if r.prefer:
            text += " (prefers " + ", ".join(r.prefer) + ")"
        lines.append(f"{r.phase:<9}{r.path:<14}{text}")
    return lines
