"""onnxruntime as a second inference peer: our model, exported by minialex's own ONNX exporter,
run in an onnxruntime.InferenceSession on the CPU.

The session gets the benchmark's thread count inside one operator and one thread between
operators (a chain of layers has nothing to run side by side), graph optimisations at their
default; set_threads plays the part torch.set_num_threads plays for torch, once per child.
Needs the optional onnx and onnxruntime packages (pip install onnx onnxruntime).
"""
import os

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


def session(model, input_size):
    """An InferenceSession running `model` (a minialex AlexNet) on (N, 3, input_size, input_size);
    returns a function from a float32 NCHW array to its logits."""
    import onnxruntime

    from minialex.interop.onnx_export import onnx_model
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = _threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    options.inter_op_num_threads = 1
    sess = onnxruntime.InferenceSession(onnx_model(model, input_size).SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])

    def run(x):
        return sess.run(["logits"], {"input": x})[0]
    return run
