"""AlexNet in int8 for inference: `QuantizedAlexNet`, built from a float AlexNet and calibrated
activation scales (`quantize_alexnet`) or from a checkpoint's int8 section (`QuantizedAlexNet(arch,
params)`); both paths end in the same constructor, so a saved and reloaded model computes the same
bits.

The arithmetic (the kernels' contract is in kernels/quant.py and kernels/gemm_int8.py):
- the normalised input image: per-tensor scale s0, zero point 128 (conv1 pads with 128, the
  image's 0.0, and its int32 bias carries the correction -128 * sum_k wq[n, k]);
- weights: BatchNorm folded into the convolution before it (eval statistics, float64), then per
  output channel symmetric: s_w[n] = max|W[n]| / 127 (1 for an all-zero row), wq = clip(rint(W /
  s_w), -127, 127);
- bias: int32 rint(b / (s_x * s_w[n])), clipped so that |acc + bias| < 2**31 whatever the uint8
  inputs (|acc| <= K * 255 * 127);
- every convolution and hidden FC writes uint8 (zero point 0: the clamp at 0 is the ReLU), scale
  s_y calibrated on its rectified output, epilogue float32(s_x * s_w[n] / s_y); the last FC writes
  float32 logits with epilogue float32(s_x * s_w[n]);
- max-pool on the bytes; LRN in float32 (dequantise, the float LRN, quantise at the LRN output's
  calibrated scale); dropout is the identity, and so is the avgpool at the variant's input size;
- activations are channels-last, so the first FC's weight columns are permuted once, at build
  time, from torch's (C, H, W) flatten order to (H, W, C).
Weights are packed for the kernels once, in the constructor.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..kernels import gemm_int8, quant
from ..kernels.lrn import lrn_forward
from ..shapes import conv_output_size
from .alexnet import PAPER_LRN, plan
from .registry import Arch

INPUT_ZERO_POINT = 128
WEIGHT_MAX = 127
# Bounds on the scales an int8 model may hold. Calibrated scales of real networks are near 1e-3..1e2
# (activations) and 1e-6..1 (weights); the bounds keep every derived float32 epilogue scale finite
# (2**32 * 2**24 / 2**-32 = 2**88, times |acc + bias| < 2**31 stays below float32's 2**128).
ACTIVATION_SCALE_RANGE = (2.0 ** -32, 2.0 ** 32)
WEIGHT_SCALE_RANGE = (2.0 ** -126, 2.0 ** 24)
# Quantisation levels of the threshold T a calibration criterion picks: the input is symmetric
# around its zero point (s0 = T / 127), a rectified output uses all of uint8 (s = T / 255).
INPUT_LEVELS = 127
RELU_LEVELS = 255
# How calibration may pick an activation's threshold (minialex.calibration), in tie-breaking order.
CRITERIA = ("max", "percentile", "mse", "entropy")


class QuantLayer(NamedTuple):
    """One convolution or FC layer's quantised parameters, as the checkpoint stores them."""
    weight: np.ndarray        # int8 in -127..127, torch layout: (Cout, Cin/g, kh, kw) or (out, in)
    weight_scale: np.ndarray  # float32 (Cout,): s_w
    bias: np.ndarray          # int32 (Cout,): rint(b / (s_x * s_w)), without the input's zero-point correction


@dataclass
class Int8Params:
    """What an int8 model is made of: the input's scale, every quantisation point's scale (keys:
    `quantisation_points(arch)`) and every conv/FC layer (keys: their torchvision prefixes)."""
    input_scale: float
    activation_scales: dict
    layers: OrderedDict = field(default_factory=OrderedDict)


# -- the structure, read off the float model's plan ----------------------------------------------

class Step(NamedTuple):
    kind: str          # conv | lrn | pool | avgpool | linear
    key: str           # torchvision prefix of the layer ("features.0"), "" for pools
    args: tuple = ()   # conv: (cin, cout, k, stride, pad, groups, bn key or None);
                       # linear: (in, out, relu); avgpool: (output size or None,)


def program(arch):
    """The int8 model's steps for `arch` (an Arch or its dict), in forward order. ReLUs are fused
    into the layer before them, BatchNorm into its convolution, dropout dropped."""
    arch = arch if isinstance(arch, Arch) else Arch.from_dict(arch)
    layers = plan(arch.variant, arch.num_classes, arch.batch_norm)
    steps = []
    feats = layers["features"]
    for i, layer in enumerate(feats):
        kind = layer[0]
        if kind == "conv":
            bn = f"features.{i + 1}" if i + 1 < len(feats) and feats[i + 1][0] == "bn" else None
            relu_at = i + 2 if bn else i + 1
            if relu_at >= len(feats) or feats[relu_at][0] != "relu":
                raise ValueError(f"features.{i}: a convolution without a ReLU after it cannot be quantised")
            steps.append(Step("conv", f"features.{i}", tuple(layer[1:]) + (bn,)))
        elif kind in ("lrn", "pool"):
            steps.append(Step(kind, f"features.{i}" if kind == "lrn" else ""))
        elif kind not in ("bn", "relu"):
            raise ValueError(f"features.{i}: no int8 version of {kind}")
    steps.append(Step("avgpool", "", (layers["avgpool"][1] if layers["avgpool"][0] == "avgpool" else None,)))
    cls = layers["classifier"]
    for i, layer in enumerate(cls):
        if layer[0] == "linear":
            relu = i + 1 < len(cls) and cls[i + 1][0] == "relu"
            steps.append(Step("linear", f"classifier.{i}", (layer[1], layer[2], relu)))
        elif layer[0] not in ("relu", "dropout"):
            raise ValueError(f"classifier.{i}: no int8 version of {layer[0]}")
    if steps[-1].kind != "linear" or steps[-1].args[2]:
        raise ValueError("the classifier must end with a linear layer without a ReLU")
    return steps


def quantisation_points(arch):
    """Keys of the activation scales an int8 model of `arch` needs besides the input's: every
    convolution and hidden FC (its rectified output) and every LRN (its output), in forward order."""
    return [s.key for s in program(arch)
            if s.kind in ("conv", "lrn") or (s.kind == "linear" and s.args[2])]


def int8_arrays(arch):
    """OrderedDict name -> (shape, dtype) of the arrays an int8 model of `arch` is stored as:
    `<key>.weight` int8, `<key>.weight_scale` float32, `<key>.bias` int32 per conv/FC layer."""
    out = OrderedDict()
    for s in program(arch):
        if s.kind == "conv":
            cin, cout, k, _, _, groups, _ = s.args
            wshape = (cout, cin // groups, k, k)
        elif s.kind == "linear":
            fin, cout, _ = s.args
            wshape = (cout, fin)
        else:
            continue
        out[f"{s.key}.weight"] = (wshape, np.dtype(np.int8))
        out[f"{s.key}.weight_scale"] = ((cout,), np.dtype(np.float32))
        out[f"{s.key}.bias"] = ((cout,), np.dtype(np.int32))
    return out


def bias_limit(k):
    """Largest |bias| an int32 sum of k uint8 x int8 (|w| <= 127) products can take without overflow."""
    return 2 ** 31 - 1 - int(k) * 255 * WEIGHT_MAX


# -- the arithmetic rules, one function each ---------------------------------------------------------

def fold_batchnorm(weight, bias, gamma, beta, mean, var, eps):
    """(W', b') in float64 with conv(x, W') + b' == bn(conv(x, W) + b) in eval mode:
    W' = W * g, b' = (b - mean) * g + beta, g = gamma / sqrt(var + eps) per output channel."""
    g = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    w = np.asarray(weight, np.float64) * g.reshape((-1,) + (1,) * (np.ndim(weight) - 1))
    b = (np.asarray(bias, np.float64) - np.asarray(mean, np.float64)) * g + np.asarray(beta, np.float64)
    return w, b


def quantize_weights(weight):
    """(wq int8, s_w float32): per output channel (first axis) symmetric, s_w = max|W[n]| / 127
    (1 where the row is all zero, or so small that its scale is below WEIGHT_SCALE_RANGE),
    wq = clip(rint(W / s_w), -127, 127) with the float32 s_w that is stored."""
    w = np.asarray(weight, np.float64)
    peak = np.abs(w.reshape(len(w), -1)).max(axis=1) if w.size else np.zeros(len(w))
    scale = (peak / WEIGHT_MAX).astype(np.float32)
    scale[~(scale >= WEIGHT_SCALE_RANGE[0])] = 1.0
    if (scale > WEIGHT_SCALE_RANGE[1]).any():
        raise ValueError(f"weights up to {peak.max():.3g} in magnitude are too large to quantise "
                         f"(per-channel scale above {WEIGHT_SCALE_RANGE[1]:g})")
    shaped = scale.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
    wq = np.clip(np.rint(w / shaped), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return wq, scale


def quantize_bias(bias, input_scale, weight_scale, k):
    """int32 rint(b / (s_x * s_w[n])) in float64, clipped to +-bias_limit(k)."""
    step = float(input_scale) * np.asarray(weight_scale, np.float64)
    limit = bias_limit(k)
    return np.clip(np.rint(np.asarray(bias, np.float64) / step), -limit, limit).astype(np.int32)


def zero_point_correction(wq, zero_point=INPUT_ZERO_POINT):
    """int64 (Cout,): -zero_point * sum_k wq[n, k], what the bias adds so that an input stored as
    q = x / s + zero_point sums like x / s."""
    return -int(zero_point) * wq.reshape(len(wq), -1).astype(np.int64).sum(axis=1)


def requant_scale(input_scale, weight_scale, output_scale=None):
    """float32 epilogue scale s_x * s_w[n] / s_y (s_x * s_w[n] for float32 output), in float64 first."""
    v = float(input_scale) * np.asarray(weight_scale, np.float64)
    if output_scale is not None:
        v = v / float(output_scale)
    return v.astype(np.float32)


def permute_flatten_columns(weight, channels, height, width):
    """(out, C*H*W) columns in torch's (c, h, w) order -> (h, w, c), channels-last's flatten order."""
    out = weight.shape[0]
    return np.ascontiguousarray(weight.reshape(out, channels, height, width).transpose(0, 2, 3, 1)
                                .reshape(out, -1))


def scale_from_threshold(threshold, levels):
    """The scale mapping `threshold` to the top level, within ACTIVATION_SCALE_RANGE; 1.0 when the
    calibration saw nothing but zeros (any scale represents them exactly)."""
    t = float(threshold)
    if not math.isfinite(t) or t <= 0:
        return 1.0
    lo, hi = ACTIVATION_SCALE_RANGE
    return float(min(max(t / levels, lo), hi))


def check_scale(name, value, bounds=ACTIVATION_SCALE_RANGE):
    """ValueError naming `name` unless value is a number within bounds."""
    ok = (isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
          and math.isfinite(value) and bounds[0] <= value <= bounds[1])
    if not ok:
        raise ValueError(f"{name} is {value!r}, expected a scale in [{bounds[0]:g}, {bounds[1]:g}]")
    return float(value)


def check_params(arch, params):
    """ValueError naming the first field of `params` that an int8 model of `arch` cannot use."""
    check_scale("input.scale", params.input_scale)
    points = quantisation_points(arch)
    scales = params.activation_scales
    if not isinstance(scales, dict) or set(scales) != set(points):
        got = sorted(scales) if isinstance(scales, dict) else scales
        raise ValueError(f"activations has the keys {str(got)[:120]}, expected {points}")
    for key in points:
        check_scale(f"activations.{key}", scales[key])
    expected = int8_arrays(arch)
    for name, (shape, dtype) in expected.items():
        key, part = name.rsplit(".", 1)
        layer = params.layers.get(key)
        a = getattr(layer, part, None) if layer is not None else None
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
            got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else "missing"
            raise ValueError(f"{name} is {got}, expected {dtype} {shape}")
    for key, layer in params.layers.items():
        if f"{key}.weight" not in expected:
            raise ValueError(f"{key}: not a layer of this architecture")
        if layer.weight.size and int(np.abs(layer.weight.astype(np.int16)).max()) > WEIGHT_MAX:
            raise ValueError(f"{key}.weight holds -128, expected int8 values in -127..127")
        s = layer.weight_scale
        lo, hi = WEIGHT_SCALE_RANGE
        if not (np.isfinite(s).all() and (s >= lo).all() and (s <= hi).all()):
            raise ValueError(f"{key}.weight_scale holds values outside [{lo:g}, {hi:g}] (or NaN/inf)")
        limit = bias_limit(layer.weight[0].size if len(layer.weight) else 0)
        if layer.bias.size and int(np.abs(layer.bias.astype(np.int64)).max()) > limit:
            raise ValueError(f"{key}.bias holds values beyond +-{limit}, where the int32 sums could overflow")


# -- building from a float model ------------------------------------------------------------------

def _module_at(model, key):
    part, index = key.split(".")
    return getattr(model, part)[int(index)]


def quantize_alexnet(model, arch, input_scale, activation_scales, **info):
    """The QuantizedAlexNet of float AlexNet `model` (of `arch`) at the given scales: BatchNorm
    folded, weights and biases quantised as the module docstring says. `info` (criterion,
    calibration) is kept on the model for the checkpoint."""
    layers = OrderedDict()
    s_x = float(input_scale)
    for step in program(arch):
        if step.kind == "lrn":
            s_x = float(activation_scales[step.key])
        if step.kind not in ("conv", "linear"):
            continue
        m = _module_at(model, step.key)
        w, b = m.weight.data, m.bias.data if m.bias is not None else np.zeros(len(m.weight.data))
        if step.kind == "conv" and step.args[-1] is not None:
            bn = _module_at(model, step.args[-1])
            w, b = fold_batchnorm(w, b, bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var, bn.eps)
        wq, s_w = quantize_weights(w)
        layers[step.key] = QuantLayer(wq, s_w, quantize_bias(b, s_x, s_w, wq[0].size))
        if step.key in activation_scales:
            s_x = float(activation_scales[step.key])
    params = Int8Params(float(input_scale), {k: float(v) for k, v in activation_scales.items()}, layers)
    return QuantizedAlexNet(arch, params, **info)


# -- the model ------------------------------------------------------------------------------------

class QuantizedAlexNet:
    """(N, 3, S, S) float32 normalised images -> (N, classes) float32 logits, in int8.

    Inference only: `eval()` and `train(False)` are accepted (evaluation calls them), training is
    refused. `params` keeps the stored form (for checkpoints); the packed runtime form is built here.
    """

    def __init__(self, arch, params, criterion=None, calibration=None):
        self.arch = arch if isinstance(arch, Arch) else Arch.from_dict(arch)
        check_params(self.arch, params)
        self.params = params
        self.criterion, self.calibration = criterion, calibration
        self.input_size = self.arch.input_size
        self._plans = {}   # batch size -> one prepared function per step (forward)
        self._inv_input_scale = np.float32(1.0 / params.input_scale)
        self._steps = []
        scales = params.activation_scales
        s_x, size, channels, first_fc = params.input_scale, self.input_size, 3, True
        for step in program(self.arch):
            if step.kind == "conv":
                cin, cout, k, stride, pad, groups, _ = step.args
                layer = params.layers[step.key]
                first = not self._steps
                bias = layer.bias.astype(np.int64)
                if first:
                    bias = bias + zero_point_correction(layer.weight)
                limit = bias_limit(layer.weight[0].size)
                s_y = scales[step.key]
                # without groups the GEMM reads the windows in place (no im2col matrix)
                packed = (quant.pack_conv_weights_implicit(layer.weight) if groups == 1
                          else quant.pack_conv_weights(layer.weight, groups))
                self._steps.append(("conv", packed,
                                    np.clip(bias, -limit, limit).astype(np.int32),
                                    requant_scale(s_x, layer.weight_scale, s_y), k, stride, pad,
                                    INPUT_ZERO_POINT if first else 0))
                size = conv_output_size(size, size, k, k, (stride, stride), (pad, pad))[0]
                s_x, channels = s_y, cout
            elif step.kind == "lrn":
                self._steps.append(("lrn", s_x, np.float32(1.0 / scales[step.key])))
                s_x = scales[step.key]
            elif step.kind == "pool":
                self._steps.append(("pool",))
                size = (size - 3) // 2 + 1
            elif step.kind == "avgpool":
                out = step.args[0]
                if out is not None and out != size:
                    raise ValueError(f"the avgpool maps {size}x{size} to {out}x{out}; the int8 model "
                                     f"supports it only as the identity, at the variant's input size")
            else:
                fin, fout, relu = step.args
                layer = params.layers[step.key]
                w = layer.weight
                if first_fc:
                    if fin != channels * size * size:
                        raise ValueError(f"{step.key}: takes {fin} features, the convolutions give "
                                         f"{channels}x{size}x{size}")
                    w = permute_flatten_columns(w, channels, size, size)
                    first_fc = False
                s_y = scales[step.key] if relu else None
                self._steps.append(("linear", gemm_int8.pack_weights(w), layer.bias.copy(),
                                    requant_scale(s_x, layer.weight_scale, s_y),
                                    np.uint8 if relu else np.float32))
                s_x = s_y
        self.num_classes = self.arch.num_classes

    # evaluation.evaluate and the CLI treat this model like the float one
    def eval(self):
        return self

    def train(self, mode=True):
        if mode:
            raise ValueError("an int8 model is for inference only; train the float model")
        return self

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        x = np.asarray(x)
        s = self.input_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"the int8 {self.arch.variant} AlexNet takes (N, 3, {s}, {s}) images, "
                             f"got {x.shape}")
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, self.num_classes), np.float32)
        q = quant.quantize(x.astype(np.float32, copy=False), self._inv_input_scale, INPUT_ZERO_POINT)
        runs = self._plans.pop(n, None)
        if runs is None:   # the first batch of this size: each step prepared on its input
            runs = []
            for step in self._steps:
                runs.append(_prepared(step, q.shape))
                q = runs[-1](q)
        else:
            for run in runs:
                q = run(q)
        self._plans[n] = runs   # most recent last; two sizes kept (full batches and the last one)
        while len(self._plans) > 2:
            del self._plans[next(iter(self._plans))]
        return q.copy()   # the last layer writes into the plan's buffer


def _prepared(step, shape):
    """run(q) computing `step` on channels-last uint8 inputs of `shape`: convolutions without
    groups and FC layers with their checks and buffers made once (at batch 1 the per-call checks
    were a tenth of the forward), the other steps as plain calls."""
    kind = step[0]
    if kind == "conv":
        _, packed, bias, scale, k, stride, pad, pad_value = step
        if isinstance(packed, quant.ImplicitConvWeights):
            return quant.prepare_conv2d_int8(shape, packed, bias, scale, stride, pad, pad_value, np.uint8)
        return lambda q: quant.conv2d_int8(q, packed, bias, scale, k, stride, pad, pad_value, np.uint8)
    if kind == "lrn":
        _, s_in, inv_out = step
        return lambda q: quant.quantize(lrn_forward(quant.dequantize(q, s_in, 0), **PAPER_LRN)[0], inv_out, 0)
    if kind == "pool":
        return lambda q: quant.maxpool_u8(q, 3, 2)
    _, packed, bias, scale, out_dtype = step
    n, k = shape[0], int(np.prod(shape[1:]))
    if k != gemm_int8.padded_k(k):
        return lambda q: _linear(q.reshape(n, k), packed, bias, scale, out_dtype)
    out = np.empty((n, packed.n), dtype=out_dtype)
    gemm = gemm_int8.prepare_rows(n * k, gemm_int8.Rows(1, 1, k, 0, 0, 1, k // 4, 0), n, packed, bias,
                                  scale, out)
    return lambda q: gemm(np.ascontiguousarray(q).reshape(-1))


def _linear(a, packed, bias, scale, out_dtype):
    """(M, K) uint8 -> (M, N) through the int8 GEMM, K padded to the kernel's groups of 4."""
    kp = gemm_int8.padded_k(packed.k)
    if a.shape[1] != kp or not a.flags.c_contiguous:
        padded = np.zeros((a.shape[0], kp), np.uint8)
        padded[:, :a.shape[1]] = a
        a = padded
    out = np.empty((a.shape[0], packed.n), dtype=out_dtype)
    return gemm_int8.gemm_u8s8(a, packed, bias, scale, out)


__all__ = ["QuantizedAlexNet", "Int8Params", "QuantLayer", "quantize_alexnet", "program",
           "quantisation_points", "int8_arrays", "fold_batchnorm", "quantize_weights", "quantize_bias",
           "zero_point_correction", "requant_scale", "permute_flatten_columns", "scale_from_threshold",
           "check_params", "check_scale", "bias_limit", "CRITERIA", "INPUT_ZERO_POINT", "INPUT_LEVELS", "RELU_LEVELS",
           "ACTIVATION_SCALE_RANGE", "WEIGHT_SCALE_RANGE"]
