"""Inference of torchvision's AlexNet in eval mode: batch-1 latency and batch-64 throughput.

Two peers: torch under torch.no_grad(), as a deployment would, and onnxruntime (float32) running
our model as minialex's own ONNX exporter writes it (onnxruntime_peer.py; optional). All hold the
same weights and the check compares each peer's logits with ours. bf16 rows (--precision bf16):
ours at precision bf16, torch under bf16 autocast, onnxruntime still float32.
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
                                        classes=1000)], opts)


def build(case, lib):
    model, x, _ = model_and_data(case)
    model.eval()
    flops = forward_flops(model, x.shape)[0]
    if lib == "minialex":
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


def run(opts, alternator=None):
    return images_table(harness.run_cases("inference", cases(opts), opts, alternator, PEERS), peers=PEERS)
