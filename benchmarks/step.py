"""A whole training step: forward, softmax cross-entropy, backward, SGD with momentum 0.9.

torchvision's AlexNet at 224×224 for each batch size (default 8, 32, 64) and the cifar variant
at batch 128 on 32×32. torch runs the same network with the same weights, built from plain
torch.nn (tests/torch_reference.py). The check compares logits, loss and every parameter
gradient of one step with the dropout layers switched off (torch cannot share our masks);
the timed steps keep dropout on. Logits and loss must agree to --rtol of their largest value,
the gradients norm-wise to ten times that (why: _common.LOOSE_FACTOR). With --precision bf16 the
bf16 rows run minialex at precision bf16 and torch under bf16 autocast (harness.BF16_RTOL).
"""
import numpy as np

from . import harness
from ._common import fmt_ms, fmt_num, fmt_ratio, markdown_table
from .ops import Bench

TITLE = "Training step (forward, cross-entropy, backward, SGD momentum)"
DEFAULT_BATCHES = (8, 32, 64)
PHASE = "train step"


def cases(opts):
    out = [dict(name="torchvision 224", variant="torchvision", batch=n, size=224, classes=1000)
           for n in (opts.batches or DEFAULT_BATCHES)]
    out.append(dict(name="cifar 32", variant="cifar", batch=128, size=32, classes=10))
    return harness.with_precision(out, opts)


def autocast(case):
    """torch's counterpart of the case's precision: bf16 autocast for "bf16", nothing for fp32."""
    import contextlib

    import torch
    if case.get("precision", "fp32") == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_and_data(case, dropout=0.5):
    """Our model (seeded), a batch of inputs and targets, all drawn the same way in every process."""
    from minialex import _random, models
    _random.manual_seed(0)
    model = models.alexnet(case["classes"], case["variant"], dropout=dropout)
    model.to_precision(case.get("precision", "fp32"))
    rng = np.random.default_rng(case["batch"])
    x = rng.standard_normal((case["batch"], 3, case["size"], case["size"]), dtype=np.float32)
    t = rng.integers(0, case["classes"], case["batch"]).astype(np.int64)
    return model, x, t


def forward_flops(model, x_shape):
    """FLOPs of one forward (2 per multiply-accumulate) and of the first convolution alone."""
    feats = model.features.output_shape(x_shape)
    flat = model.avgpool.output_shape(feats)
    flat = (flat[0], int(np.prod(flat[1:])))
    macs = model.features.macs(x_shape) + model.classifier.macs(flat)
    return 2.0 * macs, 2.0 * model.features[0].macs(x_shape)


def step_flops(model, x_shape):
    """Forward, backward-weight and backward-data of every conv and FC layer; the first conv
    computes no input gradient."""
    fwd, first = forward_flops(model, x_shape)
    return 3 * fwd - first


def _dropouts(layers, cls):
    return [m for m in layers if isinstance(m, cls)]


def build(case, lib):
    model, x, t = model_and_data(case)
    flops = step_flops(model, x.shape)
    names = sorted(k for k, _ in model.named_parameters())
    labels = {PHASE: ["logits", "loss"] + [f"gradient of {n}" for n in names]}
    loose = {PHASE: set(range(2, 2 + len(names)))}  # the gradients: see _common.LOOSE_FACTOR
    if lib == "minialex":
        from minialex import nn, optim
        loss_fn = nn.CrossEntropyLoss()
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.train()

        def step():
            opt.zero_grad()
            loss = loss_fn(model(x), t)
            model.backward(loss_fn.backward())
            opt.step()
            return loss

        def outputs():
            for m in _dropouts(model.classifier, nn.Dropout):
                m.eval()
            opt.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, t)
            model.backward(loss_fn.backward())
            grads = [p.grad.copy() for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]
            return {PHASE: [logits, np.float32(loss)] + grads}
        return Bench([(PHASE, step, flops)], outputs, labels, loose)

    import torch
    from tests.torch_reference import torch_model_like
    net = torch_model_like(model)
    del model
    tx, tt = torch.from_numpy(x), torch.from_numpy(t)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()

    def step():
        opt.zero_grad()
        with autocast(case):
            loss = torch.nn.functional.cross_entropy(net(tx), tt)
        loss.backward()
        opt.step()
        return loss

    def outputs():
        for m in _dropouts(net.classifier, torch.nn.Dropout):
            m.eval()
        opt.zero_grad()
        with autocast(case):
            logits = net(tx)
            loss = torch.nn.functional.cross_entropy(logits, tt)
        loss.backward()
        logits = logits.float()
        grads = [p.grad.numpy().copy() for _, p in sorted(net.named_parameters(), key=lambda kv: kv[0])]
        return {PHASE: [logits.detach().numpy(), loss.detach().numpy()] + grads}
    return Bench([(PHASE, step, flops)], outputs, labels, loose)


def images_table(result, header_first=("case", "batch"), peers=("torch",)):
    """Replace the harness's table by one with images per second, for whole-model sections;
    a peer beyond torch (inference's onnxruntime) adds its ms, img/s and ratio columns."""
    extra = [p for p in peers if p != "torch"]
    rows = []
    for r in result["records"]:
        if r["status"] == "FAILED":
            rows.append([r["case"], r["batch"], *["–"] * (6 + 3 * len(extra)), f"FAILED: {r['detail']}"])
            continue
        ips = r["batch"] / r["ours_s"]
        tips = r["batch"] / r["torch_s"] if r["torch_s"] else None
        r["ours_images_s"], r["torch_images_s"] = ips, tips
        for p in extra:
            r[f"{p}_images_s"] = r["batch"] / r[f"{p}_s"] if r[f"{p}_s"] else None
        rows.append([r["case"], r["batch"], fmt_ms(r["ours_s"]), fmt_ms(r["torch_s"]),
                     *[fmt_ms(r[f"{p}_s"]) for p in extra], fmt_num(ips), fmt_num(tips),
                     *[fmt_num(r[f"{p}_images_s"]) for p in extra], fmt_num(r["ours_gflops"]),
                     fmt_ratio(r["torch_s"], r["ours_s"]), *[fmt_ratio(r[f"{p}_s"], r["ours_s"]) for p in extra],
                     harness.check_cell(r, peers)])
    header = [*header_first, "ours ms", "torch ms", *[f"{p} ms" for p in extra], "ours img/s", "torch img/s",
              *[f"{p} img/s" for p in extra], "ours GFLOP/s", "torch/ours", *[f"{p}/ours" for p in extra],
              "check"]
    result["table"] = markdown_table(header, rows)
    return result


def run(opts, alternator=None):
    return images_table(harness.run_cases("step", cases(opts), opts, alternator))
