"""Export an AlexNet (any variant, with or without batch norm) as an ONNX inference graph.

One ONNX node per layer, walked from the model itself, in eval mode: Conv (with its group),
BatchNormalization (running statistics), Relu, LRN, MaxPool (with ceil_mode), the adaptive
average pool resolved for the exported input size, Flatten and Gemm. Dropout is the identity at
inference and is left out. Weights become initializers named by their state_dict keys.

The input is "input", float32 (N, 3, S, S) with a free batch size N; the output is "logits"
(N, num_classes). Class names and normalisation go into the model's metadata_props as JSON.

An int8 model (models.quantized.QuantizedAlexNet) is written as ONNX QDQ (`onnx_model_int8`): the
float operators of the same graph with QuantizeLinear/DequantizeLinear pairs where minialex holds
uint8 activations (the input at zero point 128, every rectified conv/FC output, every LRN output,
and after each max-pool at its input's scale), and the stored int8 weights and int32 biases behind
per-channel DequantizeLinear nodes (bias scale s_x * s_w). BatchNorm is already folded into the
weights. A runtime's fused int8 kernels round at their own points, so its logits match minialex's
int8 ones to within a step of the activations' scales, not bit for bit.

Needs the optional `onnx` package (pip install onnx); nothing else in minialex does.
"""
import json
import os

import numpy as np

from minialex import nn
from minialex.files import write_atomically
from minialex.errors import MinialexError

OPSET = 17
# IR version 8 is what opset 17 shipped with; older runtimes refuse anything newer.
IR_VERSION = 8


def _require_onnx(path=None):
    try:
        import onnx
    except ImportError:
        where = f"{path}: " if path is not None else ""
        raise MinialexError(f"{where}writing ONNX needs the optional onnx package "
                            f"(pip install onnx, or pip install 'minialex[onnx]')") from None
    return onnx


def adaptive_pool_matrix(in_size, out_size):
    """(out_size, in_size) matrix averaging PyTorch's adaptive windows along one axis:
    row i averages [floor(i*in/out), ceil((i+1)*in/out))."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


class _GraphBuilder:
    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []
        self.initializers = []

    def constant(self, name, array):
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, name, **attrs):
        out = f"{name}:{op}"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def model(self, x, graph_name, input_size, num_classes, class_names, normalization):
        """The checked ModelProto of the graph built so far, `x` its logits: float32 input
        (N, 3, S, S), output "logits" (N, num_classes), class names and normalisation as metadata."""
        onnx, helper = self.onnx, self.onnx.helper
        self.nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, input_size, input_size])],
            [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", num_classes])],
            initializer=self.initializers)
        proto = helper.make_model(graph, producer_name="minialex", ir_version=IR_VERSION,
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        meta = {"class_names": class_names, "normalization": normalization}
        helper.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items() if v is not None})
        onnx.checker.check_model(proto)
        return proto

    def layer(self, m, name, x, shape):
        """Emit `m` applied to tensor `x` of `shape`; returns (output name, output shape)."""
        if m._modules:   # a container (Sequential, the model): its children run in declared order
            for child_name, child in m._modules.items():
                x, shape = self.layer(child, f"{name}.{child_name}" if name else child_name, x, shape)
            return x, shape
        out_shape = tuple(m.output_shape(shape))
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x, out_shape
        if isinstance(m, nn.Conv2d):
            ph, pw = m.padding
            inputs = [x, self.constant(f"{name}.weight", m.weight.data)]
            if m.bias is not None:
                inputs.append(self.constant(f"{name}.bias", m.bias.data))
            return self.node("Conv", inputs, name, kernel_shape=list(m.kernel_size),
                             strides=list(m.stride), pads=[ph, pw, ph, pw], group=m.groups,
                             dilations=[1, 1]), out_shape
        if isinstance(m, nn.BatchNorm2d):
            inputs = [x] + [self.constant(f"{name}.{k}", getattr(m, k).data if k in ("weight", "bias")
                                          else getattr(m, k))
                            for k in ("weight", "bias", "running_mean", "running_var")]
            return self.node("BatchNormalization", inputs, name, epsilon=m.eps), out_shape
        if isinstance(m, nn.ReLU):
            return self.node("Relu", [x], name), out_shape
        if isinstance(m, nn.LocalResponseNorm):
            # ONNX and PyTorch both scale by alpha/size; their windows agree only for odd sizes
            # (for even ones PyTorch puts the extra channel before c, ONNX after).
            if m.size % 2 == 0:
                raise ValueError(f"{name}: LRN of even size {m.size} has no exact ONNX equivalent")
            return self.node("LRN", [x], name, size=m.size, alpha=m.alpha, beta=m.beta,
                             bias=m.k), out_shape
        if isinstance(m, nn.MaxPool2d):
            ph, pw = m.padding
            return self.node("MaxPool", [x], name, kernel_shape=list(m.kernel_size),
                             strides=list(m.stride), pads=[ph, pw, ph, pw],
                             ceil_mode=int(m.ceil_mode)), out_shape
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive_avg_pool(name, x, shape, m.output_size), out_shape
        if isinstance(m, nn.Flatten):
            return self.node("Flatten", [x], name, axis=1), out_shape
        if isinstance(m, nn.Linear):
            inputs = [x, self.constant(f"{name}.weight", m.weight.data)]
            if m.bias is not None:
                inputs.append(self.constant(f"{name}.bias", m.bias.data))
            return self.node("Gemm", inputs, name, transB=1), out_shape
        raise ValueError(f"{name}: no ONNX export for {type(m).__name__}")

    def adaptive_avg_pool(self, name, x, shape, output_size):
        (h, w), (oh, ow) = shape[2:], output_size
        if (h, w) == (oh, ow):          # torchvision's 6x6 -> 6x6 at 224 input
            return x
        if (oh, ow) == (1, 1):
            return self.node("GlobalAveragePool", [x], name)
        if h % oh == 0 and w % ow == 0:  # equal windows: a plain average pool
            return self.node("AveragePool", [x], name, kernel_shape=[h // oh, w // ow],
                             strides=[h // oh, w // ow])
        # Unequal (overlapping or repeated) windows: average rows, then columns, as matrix products;
        # MatMul broadcasts over N and C. Exact for this input size, as the graph is fixed anyway.
        rows = self.constant(f"{name}.rows", adaptive_pool_matrix(h, oh))          # (oh, h)
        cols = self.constant(f"{name}.cols", adaptive_pool_matrix(w, ow).T.copy())  # (w, ow)
        x = self.node("MatMul", [x, cols], f"{name}.cols")
        return self.node("MatMul", [rows, x], f"{name}.rows")


def onnx_model(model, input_size, *, class_names=None, normalization=None):
    """The onnx.ModelProto of `model` (a minialex AlexNet) for (N, 3, input_size, input_size)."""
    onnx = _require_onnx()
    was_training = model.training
    model.eval()
    try:
        g = _GraphBuilder(onnx)
        shape = (1, 3, int(input_size), int(input_size))
        x, shape = g.layer(model, "", "input", shape)
    finally:
        model.train(was_training)
    return g.model(x, f"minialex_alexnet_{getattr(model, 'variant', 'custom')}", input_size, shape[1],
                   class_names, normalization)


def _qdq(g, name, x, scale, zero_point):
    """x -> QuantizeLinear -> DequantizeLinear at (scale, uint8 zero_point): where minialex rounds
    an activation to uint8."""
    s = g.constant(f"{name}.scale", np.float32(scale))
    z = g.constant(f"{name}.zero_point", np.uint8(zero_point))
    q = g.node("QuantizeLinear", [x, s, z], f"{name}.quantize")
    return g.node("DequantizeLinear", [q, s, z], f"{name}.dequantize")


def _int8_weights(g, key, layer, input_scale):
    """Per-channel DequantizeLinear of a layer's int8 weight and int32 bias: (weight, bias) names."""
    cout = len(layer.weight)
    w = g.node("DequantizeLinear", [g.constant(f"{key}.weight", layer.weight),
                                    g.constant(f"{key}.weight_scale", layer.weight_scale),
                                    g.constant(f"{key}.weight_zero_point", np.zeros(cout, np.int8))],
               f"{key}.weight", axis=0)
    bias_scale = (float(input_scale) * layer.weight_scale.astype(np.float64)).astype(np.float32)
    b = g.node("DequantizeLinear", [g.constant(f"{key}.bias", layer.bias),
                                    g.constant(f"{key}.bias_scale", bias_scale),
                                    g.constant(f"{key}.bias_zero_point", np.zeros(cout, np.int32))],
               f"{key}.bias", axis=0)
    return w, b


def onnx_model_int8(qmodel, *, class_names=None, normalization=None):
    """The onnx.ModelProto (QDQ) of `qmodel` (a models.quantized.QuantizedAlexNet)."""
    from minialex.models.alexnet import PAPER_LRN
    from minialex.models.quantized import INPUT_ZERO_POINT, program
    g = _GraphBuilder(_require_onnx())
    params, size = qmodel.params, qmodel.input_size
    s_x = params.input_scale
    x = _qdq(g, "input", "input", s_x, INPUT_ZERO_POINT)
    flat = False
    for step in program(qmodel.arch):
        if step.kind == "conv":
            _, _, k, stride, pad, groups, _ = step.args
            w, b = _int8_weights(g, step.key, params.layers[step.key], s_x)
            y = g.node("Conv", [x, w, b], step.key, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, group=groups, dilations=[1, 1])
            s_x = params.activation_scales[step.key]
            x = _qdq(g, f"{step.key}.output", g.node("Relu", [y], f"{step.key}.relu"), s_x, 0)
        elif step.kind == "lrn":
            y = g.node("LRN", [x], step.key, size=PAPER_LRN["size"], alpha=PAPER_LRN["alpha"],
                       beta=PAPER_LRN["beta"], bias=PAPER_LRN["k"])
            s_x = params.activation_scales[step.key]
            x = _qdq(g, f"{step.key}.output", y, s_x, 0)
        elif step.kind == "pool":
            name = f"pool{len(g.nodes)}"
            y = g.node("MaxPool", [x], name, kernel_shape=[3, 3], strides=[2, 2], pads=[0] * 4)
            x = _qdq(g, f"{name}.output", y, s_x, 0)
        elif step.kind == "linear":
            if not flat:
                x, flat = g.node("Flatten", [x], "flatten", axis=1), True
            _, fout, relu = step.args
            w, b = _int8_weights(g, step.key, params.layers[step.key], s_x)
            y = g.node("Gemm", [x, w, b], step.key, transB=1)
            if relu:
                s_x = params.activation_scales[step.key]
                x = _qdq(g, f"{step.key}.output", g.node("Relu", [y], f"{step.key}.relu"), s_x, 0)
            else:
                x = y
        # avgpool: the identity at the variant's input size (QuantizedAlexNet checks it)
    return g.model(x, f"minialex_alexnet_{qmodel.arch.variant}_int8", size, qmodel.num_classes,
                   class_names, normalization)


def export_onnx(model, path, input_size, *, class_names=None, normalization=None):
    """Write `model` (a float AlexNet, or a QuantizedAlexNet as QDQ) as an ONNX file at `path`
    (atomically: a failed export leaves no file)."""
    path = os.fspath(path)
    _require_onnx(path)
    if hasattr(model, "params"):   # models.quantized.QuantizedAlexNet
        proto = onnx_model_int8(model, class_names=class_names, normalization=normalization)
    else:
        proto = onnx_model(model, input_size, class_names=class_names, normalization=normalization)
    data = proto.SerializeToString()
    write_atomically(path, lambda f: f.write(data), what="ONNX model")
