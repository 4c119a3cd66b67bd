"""The op scenes of the C AlexNet's README (Dynmi/AlexNet), forward and backward, at batch 4.

Two convolutions and two fully connected layers, the shapes that project published its timings
for, so our numbers can be set beside those directly. Every backward computes all gradients
(input, weight, bias).
"""
from . import harness
from .ops import build  # noqa: F401  (the harness's workers look it up here)

TITLE = "Op scenes of the C AlexNet README (batch 4)"


def cases(opts):
    return [
        dict(name="conv 3→64 k11 s4 p2 @224", kind="conv", batch=4, x=[4, 3, 224, 224], w=[64, 3, 11, 11],
             stride=4, padding=2),
        dict(name="conv 128→256 k3 s1 p1 @57", kind="conv", batch=4, x=[4, 128, 57, 57], w=[256, 128, 3, 3],
             stride=1, padding=1),
        dict(name="fc 2048→1024", kind="linear", batch=4, x=[4, 2048], out=1024),
        dict(name="fc 4096→4096", kind="linear", batch=4, x=[4, 4096], out=4096),
    ]


def run(opts, alternator=None):
    return harness.run_cases("scenes", cases(opts), opts, alternator)
