"""The int8 model against the float model it was quantised from, on demo images it was not
calibrated on.

Tolerance, derived: each of the cifar model's 9 quantisation points (the input, 4 convolutions,
2 LRN outputs, 2 hidden FCs; the input's steps are T/127, the others' T/255) adds a rounding error of rms
step/sqrt(12), about 0.1% of that tensor's calibrated range; per-channel weights round to steps of
max|W|/127, about 0.2% rms of each row's range. Some 16 such independent sources in quadrature give
~0.4% of the range a tensor covers, and the logits' range R is the largest (max - min) of the float
logits over the images. Allowed: rms(int8 - float) <= 0.5% of R and max |int8 - float| <= 2.5% of
R (5 sigma). Measured with the kept criterion: about 0.1% and 0.4%. Top-1: at least 95% of images
agree, and every disagreement is a near-tie (the two classes' float logits within 2.5% of R).
"""
import numpy as np
import pytest

from minialex.data import read_list

from .conftest import calibrated, image_batches

RMS_TOLERANCE, MAX_TOLERANCE = 0.005, 0.025


@pytest.mark.parametrize("which", ["trained", "trained_bn"])
def test_int8_logits_match_float_on_demo_data(which, request, demo_lists):
    path = request.getfixturevalue(which)
    ckpt, model, result = calibrated(path, demo_lists[0], images=64)
    x = np.concatenate(image_batches(read_list(demo_lists[1]), ckpt))
    f = model(x).astype(np.float64)
    q = result.best.model(x).astype(np.float64)
    assert q.shape == f.shape and result.best.model.num_classes == f.shape[1]
    r = (f.max(axis=1) - f.min(axis=1)).max()
    rms, worst = np.sqrt(np.mean((q - f) ** 2)) / r, np.abs(q - f).max() / r
    assert rms <= RMS_TOLERANCE and worst <= MAX_TOLERANCE, (rms, worst)
    agree = q.argmax(axis=1) == f.argmax(axis=1)
    assert agree.mean() >= 0.95, agree.mean()
    rows = np.flatnonzero(~agree)
    gap = f[rows, f.argmax(axis=1)[rows]] - f[rows, q.argmax(axis=1)[rows]]
    assert (gap <= MAX_TOLERANCE * r).all(), gap


def test_every_criterion_gives_a_usable_model(trained, demo_lists):
    """Every candidate is reported with its scores; the kept one has the best agreement."""
    _, _, result = calibrated(trained, demo_lists[0], images=32)
    assert [c.criterion for c in result.candidates] == ["max", "percentile", "mse", "entropy"]
    assert result.best.agreement == max(c.agreement for c in result.candidates)
    ties = [c for c in result.candidates if c.agreement == result.best.agreement]
    assert result.best.logit_mse == min(c.logit_mse for c in ties)
    for c in result.candidates:
        assert 0.8 <= c.agreement <= 1 and np.isfinite(c.logit_mse)
    # the criteria do pick different thresholds: max clips nothing, the others clip the tail
    s_max = result.candidates[0].model.params.activation_scales
    s_pct = result.candidates[1].model.params.activation_scales
    assert all(s_pct[k] <= s_max[k] for k in s_max) and any(s_pct[k] < s_max[k] for k in s_max)


def test_prepared_batch_sizes_give_the_same_logits_and_fresh_arrays(trained, demo_lists):
    """forward keeps each layer's checks and buffers per batch size (two sizes at a time): batches of
    changing size, revisited, give exactly the logits of one image at a time, and a result is never
    overwritten by a later call."""
    ckpt, _, result = calibrated(trained, demo_lists[0], images=16, criteria=("max",))
    qmodel = result.best.model
    x = np.concatenate(image_batches(read_list(demo_lists[1])[:12], ckpt))
    single = np.concatenate([qmodel(x[i:i + 1]) for i in range(len(x))])
    first = qmodel(x[:4])
    kept = first.copy()
    for n in (4, 1, 4, 3, 5, 4, 12):
        for start in range(0, len(x) - n + 1, n):
            assert (qmodel(x[start:start + n]) == single[start:start + n]).all(), n
    assert (first == kept).all()
    assert len(qmodel._plans) == 2
