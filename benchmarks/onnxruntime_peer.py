"""onnxruntime as a second inference peer: our model, exported by minialex's own ONNX exporter,
run in an onnxruntime.InferenceSession on the CPU.

The session gets the benchmark's thread count inside one operator and one thread between
operators (a chain of layers has nothing to run side by side), graph optimisations at their
default; set_threads plays the part torch.set_num_threads plays for torch, once per child.
Needs the optional onnx and onnxruntime packages (pip install onnx onnxruntime).
"""
import logging
import os
import tempfile

_threads = None


def available():
    """True when both onnx (for the exporter) and onnxruntime import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def version():
    import onnxruntime
    return onnxruntime.__version__


def set_threads(threads):
    """The intra-op thread count of every session made afterwards in this process."""
    global _threads
    _threads = int(threads)


def _options():
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    options.inter_op_num_threads = 1
    return options


def session(model, input_size):
    """An InferenceSession running `model` (a minialex AlexNet) on (N, 3, input_size, input_size);
    returns a function from a float32 NCHW array to its logits."""
    import onnxruntime

    from minialex.interop.onnx_export import onnx_model
    sess = onnxruntime.InferenceSession(onnx_model(model, input_size).SerializeToString(), _options(),
                                        providers=["CPUExecutionProvider"])

    def run(x):
        return sess.run(["logits"], {"input": x})[0]
    return run


def int8_session(model, input_size, images):
    """`model` exported as session() does, quantised by onnxruntime.quantization.quantize_static
    on `images` (QDQ format, per-channel int8 weights, uint8 activations, its default MinMax
    calibration), in a session like session()'s; returns a function like session()'s."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from minialex.interop.onnx_export import onnx_model

    from .int8_peers import calibration_batches
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process the model, on every call

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": b} for b in calibration_batches(images)])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as folder:
        src, dst = os.path.join(folder, "float.onnx"), os.path.join(folder, "int8.onnx")
        with open(src, "wb") as f:
            f.write(onnx_model(model, input_size).SerializeToString())
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        sess = onnxruntime.InferenceSession(dst, _options(), providers=["CPUExecutionProvider"])

    def run(x):
        return sess.run(["logits"], {"input": x})[0]
    return run
