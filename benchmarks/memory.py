"""Peak resident memory of a few batch-64 training steps of torchvision's AlexNet.

Each library runs in a child process of its own that reads its own high-water mark (VmHWM) at
the end, so the figure is that run's alone. The RSS after the imports and after building the
model (with its optimiser) is reported beside it: the difference between those and the peak is
what training itself needs (activations, gradients, momentum, scratch buffers).
"""
import json

import numpy as np

from ._common import current_rss_mb, fmt_num, markdown_table, peak_rss_mb, run_worker, set_threads, worker_env

TITLE = "Peak memory of training (torchvision AlexNet, batch 64)"
BATCH = 64


def torch_alexnet():
    """torchvision's AlexNet from plain torch.nn, so the torch child never imports minialex (and Numba)."""
    from torch import nn
    convs = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
    features = []
    for i, (cin, cout, k, s, p) in enumerate(convs):
        features += [nn.Conv2d(cin, cout, k, s, p), nn.ReLU(inplace=True)]
        if i in (0, 1, 4):
            features.append(nn.MaxPool2d(3, 2))
    return nn.Sequential(*features, nn.AdaptiveAvgPool2d(6), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True),
                         nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 1000))


def train_steps(lib, steps, batch=BATCH):
    """Run `steps` training steps on `lib` in this process; returns RSS figures in MB."""
    if lib == "torch":
        import torch
    else:
        from minialex import _random, models, nn, optim
    after_import = current_rss_mb()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int64)
    if lib == "minialex":
        _random.manual_seed(0)
        model = models.alexnet(1000, "torchvision")
        loss_fn = nn.CrossEntropyLoss()
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model_ready = current_rss_mb()
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model(x), t)
            model.backward(loss_fn.backward())
            opt.step()
    else:
        torch.manual_seed(0)
        net = torch_alexnet().train()
        tx, tt = torch.from_numpy(x), torch.from_numpy(t)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        model_ready = current_rss_mb()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(tx), tt).backward()
            opt.step()
    return dict(lib=lib, steps=steps, after_import_mb=after_import, model_ready_mb=model_ready, peak_mb=peak_rss_mb())


def worker(payload):
    set_threads(payload["lib"], payload["threads"])
    return [train_steps(payload["lib"], payload["steps"])]


def run(opts, alternator):
    libs = ["minialex", "torch"] if opts.have_torch else ["minialex"]
    steps = 2 if opts.quick else 3
    notes = [] if opts.have_torch else ["torch is not importable: minialex only"]
    res = {}
    for lib in alternator.order(libs):
        payload = dict(section="memory", lib=lib, steps=steps, threads=opts.threads)
        res[lib] = run_worker("benchmarks.run", ["--worker", json.dumps(payload)], worker_env(lib, opts.threads))[0]
    rows = []
    for lib in libs:
        r = res[lib]
        r["training_mb"] = r["peak_mb"] - r["model_ready_mb"]
        rows.append([lib, steps, fmt_num(r["after_import_mb"], 0), fmt_num(r["model_ready_mb"], 0),
                     fmt_num(r["peak_mb"], 0), fmt_num(r["training_mb"], 0)])
    if "torch" in res:
        ratio = res["torch"]["peak_mb"] / res["minialex"]["peak_mb"]
        notes.append(f"peak RSS torch/ours: {ratio:.2f}x (above 1: we use less)")
    table = markdown_table(["library", "steps", "RSS after import MB", "RSS with model MB", "peak RSS MB",
                            "peak - model MB"], rows)
    return dict(records=[res[lib] for lib in libs], table=table, notes=notes, failed=False)
