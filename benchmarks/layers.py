"""Every layer of torchvision's AlexNet, forward and backward, at each batch size (224×224 input).

Plus the layers the other variants add: LRN as in the paper variant (on conv1's [N, 96, 55, 55]
output) and batch norm on a conv-sized input. ReLU is timed on the largest activation (conv1's),
and conv1 skips the input gradient, as in training, where nothing needs the image's gradient.
"""
from . import harness
from .ops import build  # noqa: F401  (the harness's workers look it up here)

TITLE = "AlexNet layers, forward and backward"
DEFAULT_BATCHES = (8, 64)


def layer_cases(n):
    """The cases of one batch size n."""
    def conv(name, cin, h, cout, k, s, p, need_dx=True):
        return dict(name=name, kind="conv", batch=n, x=[n, cin, h, h], w=[cout, cin, k, k], stride=s, padding=p,
                    need_dx=need_dx)

    return [
        conv("conv1", 3, 224, 64, 11, 4, 2, need_dx=False),
        dict(name="relu1", kind="relu", batch=n, x=[n, 64, 55, 55]),
        dict(name="lrn (paper)", kind="lrn", batch=n, x=[n, 96, 55, 55], size=5, alpha=5e-4, beta=0.75, k=2.0),
        dict(name="batchnorm", kind="batchnorm", batch=n, x=[n, 64, 55, 55]),
        dict(name="pool1", kind="maxpool", batch=n, x=[n, 64, 55, 55], kernel=3, stride=2),
        conv("conv2", 64, 27, 192, 5, 1, 2),
        dict(name="pool2", kind="maxpool", batch=n, x=[n, 192, 27, 27], kernel=3, stride=2),
        conv("conv3", 192, 13, 384, 3, 1, 1),
        conv("conv4", 384, 13, 256, 3, 1, 1),
        conv("conv5", 256, 13, 256, 3, 1, 1),
        dict(name="pool5", kind="maxpool", batch=n, x=[n, 256, 13, 13], kernel=3, stride=2),
        dict(name="avgpool", kind="avgpool", batch=n, x=[n, 256, 6, 6], output=6),
        dict(name="dropout", kind="dropout", batch=n, x=[n, 9216], p=0.5),
        dict(name="fc6", kind="linear", batch=n, x=[n, 9216], out=4096),
        dict(name="fc7", kind="linear", batch=n, x=[n, 4096], out=4096),
        dict(name="fc8", kind="linear", batch=n, x=[n, 4096], out=1000),
        dict(name="cross-entropy", kind="cross_entropy", batch=n, x=[n, 1000]),
    ]


def cases(opts):
    """Every layer at every batch; with --precision bf16, bf16 rows of the conv and linear layers."""
    all_cases = [c for n in (opts.batches or DEFAULT_BATCHES) for c in layer_cases(n)]
    return [c for c in harness.with_precision(all_cases, opts)
            if c["precision"] == "fp32" or c["kind"] in ("conv", "linear")]


def run(opts, alternator=None):
    return harness.run_cases("layers", cases(opts), opts, alternator)
