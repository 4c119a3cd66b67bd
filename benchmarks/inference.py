"""Inference of torchvision's AlexNet in eval mode: batch-1 latency and batch-64 throughput.

Two peers: torch under torch.no_grad(), as a deployment would, and onnxruntime (float32) running
our model as minialex's own ONNX exporter writes it (onnxruntime_peer.py; optional). All hold the
same weights and the check compares each peer's logits with ours. bf16 rows (--precision bf16):
ours at precision bf16, torch under bf16 autocast, onnxruntime still float32. int8 rows
(--precision int8): every engine quantises the same float model on the same calibration images
(int8_peers): ours with `minialex quantize`'s calibration, torch with static post-training
quantisation for its x86 backend, onnxruntime with quantize_static.
"""
from . import harness
from .ops import Bench
from .step import autocast, forward_flops, images_table, model_and_data

TITLE = "Inference, eval mode (torchvision AlexNet, 224×224)"
PHASE = "forward (eval)"
PEERS = ("torch", "onnxruntime")


def cases(opts):
    return harness.with_precision([dict(name="latency", variant="torchvision", batch=1, size=224, classes=1000),
                                   dict(name="throughput", variant="torchvision", batch=64, size=224,
                                        classes=1000)], opts, supported=("fp32", "bf16", "int8"))


def build(case, lib):
    int8 = case.get("precision") == "int8"
    model, x, _ = model_and_data(dict(case, precision="fp32") if int8 else case)
    model.eval()
    flops = forward_flops(model, x.shape)[0]
    if int8:
        engine = _int8_engine(model, case, lib)

        def forward():
            return engine(x)
    elif lib == "minialex":
        def forward():
            return model(x)
    elif lib == "onnxruntime":
        from . import onnxruntime_peer
        run_session = onnxruntime_peer.session(model, case["size"])
        del model

        def forward():
            return run_session(x)
    else:
        import torch
        from tests.torch_reference import torch_model_like
        net = torch_model_like(model).eval()
        tx = torch.from_numpy(x)

        def forward():
            with torch.no_grad(), autocast(case):
                return net(tx).float().numpy()

    def outputs():
        return {PHASE: [forward()]}
    return Bench([(PHASE, forward, flops)], outputs)


def _int8_engine(model, case, lib):
    """The int8 engine of `lib` made from the float `model`: a function from images to logits."""
    from . import int8_peers
    images = int8_peers.calibration_images(case["size"])
    if lib == "minialex":
        from minialex.calibration import calibrate
        from minialex.models import Arch
        batches = int8_peers.calibration_batches(images)
        arch = Arch(variant=case["variant"], num_classes=case["classes"])
        return calibrate(model, arch, lambda: iter(batches)).best.model.forward
    if lib == "onnxruntime":
        from . import onnxruntime_peer
        return onnxruntime_peer.int8_session(model, case["size"], images)
    from tests.torch_reference import torch_model_like
    return int8_peers.torch_int8(torch_model_like(model), images)


def run(opts, alternator=None):
    return images_table(harness.run_cases("inference", cases(opts), opts, alternator, PEERS), peers=PEERS)
