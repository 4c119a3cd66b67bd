"""The int8 engines a user would pick instead of minialex's, on the same model and the same
calibration images: PyTorch's static post-training quantisation with the x86 backend (FX mode,
torch.ao.quantization's default x86 qconfig: per-channel int8 weights, uint8 activations,
histogram observers), and onnxruntime's `quantize_static` (onnxruntime_peer.int8_session).

Both are built once per benchmark child; quantising takes seconds and is not timed.
"""
import numpy as np

CALIBRATION_IMAGES = 16
CALIBRATION_BATCH = 8


def calibration_images(size, seed=1):
    """The images every engine calibrates on: (16, 3, size, size) standard normal, like the
    benchmark's inputs (the weights are random too, so these are the activations it will see)."""
    return np.random.default_rng(seed).standard_normal((CALIBRATION_IMAGES, 3, size, size), dtype=np.float32)


def calibration_batches(images):
    """The calibration images in the batches every engine runs them in."""
    return [images[i:i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)]


def torch_int8(net, images):
    """net (a float torch.nn.Module in eval mode) statically quantised for the x86 backend and
    calibrated on `images`; returns a function from a float32 NCHW array to its logits."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(net.eval(), get_default_qconfig_mapping("x86"), (torch.from_numpy(images[:1]),))
    with torch.no_grad():
        for batch in calibration_batches(images):
            prepared(torch.from_numpy(batch))
    quantised = convert_fx(prepared)

    def run(x):
        with torch.no_grad():
            return quantised(torch.from_numpy(x)).numpy()
    return run
