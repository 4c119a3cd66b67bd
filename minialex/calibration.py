"""Post-training quantisation: calibrate a float AlexNet's activation scales on sample images, keep
the best of several criteria, and write an int8 checkpoint (`run_quantize`, the `quantize` command).

Statistics are collected per quantisation point -- the input image, each convolution and hidden FC
layer's output after its ReLU, each LRN's output (models.quantized.quantisation_points) -- from the
float model in two passes over the calibration images: the largest |value|, then a histogram of the
non-zero |values| over [0, that maximum] in BINS bins (exact zeros are left out: they quantise
exactly whatever the scale, and after a ReLU they are half the values). A criterion turns a
histogram into a threshold T, and T into a scale (T / 127 for the input, whose zero point is 128;
T / 255 after a ReLU):

- max: T = the largest |value| (nothing clipped, coarsest steps);
- percentile: T = the PERCENTILE-th percentile of the non-zero |values| (histogram resolution);
- mse: T minimising the expected squared error, step**2 / 12 for every value below T (rounding)
  plus (v - T)**2 for every value above (clipping), bins taken at their centres;
- entropy: T minimising the KL divergence between the histogram clipped at T and its quantised
  version, TensorRT's calibration (candidate T from `levels` bins up, the outliers added to the last
  bin kept, each run of merged bins spread over its non-empty bins).

Each criterion's int8 model then runs over the same images; the one whose top-1 prediction agrees
with the float model's on most images wins, ties broken by the smaller mean squared logit
difference, then by the order of CRITERIA. Everything is deterministic for a given list, sample
seed and image count: the sample is drawn from the seed, the images are visited in list order, and
no statistic depends on threads or timing.
"""
import os
from dataclasses import dataclass

import numpy as np

from .models.quantized import (CRITERIA, INPUT_LEVELS, RELU_LEVELS, program, quantisation_points,
                               quantize_alexnet, scale_from_threshold)

BINS = 2048
PERCENTILE = 99.99
DEFAULT_IMAGES = 256


# -- the float model's activations at the quantisation points ---------------------------------------

def _record_at(arch):
    """{(part, module index): point key}: after which float module each point's value is read."""
    at = {}
    for step in program(arch):
        part, index = step.key.split(".") if step.key else ("", "0")
        index = int(index)
        if step.kind == "conv":
            at[(part, index + (2 if step.args[-1] else 1))] = step.key   # after its ReLU
        elif step.kind == "lrn":
            at[(part, index)] = step.key
        elif step.kind == "linear" and step.args[2]:
            at[(part, index + 1)] = step.key
    return at


def float_activations(model, arch, x):
    """({point: float32 array}, logits) of float AlexNet `model` on the batch x; "input" is x."""
    at = _record_at(arch)
    seen = {"input": x}
    for i, m in enumerate(model.features):
        x = m(x)
        if ("features", i) in at:
            seen[at[("features", i)]] = x
    x = model.flatten(model.avgpool(x))
    for i, m in enumerate(model.classifier):
        x = m(x)
        if ("classifier", i) in at:
            seen[at[("classifier", i)]] = x
    return seen, x


class PointStats:
    """One quantisation point's statistics: the peak |value| (pass 1), then the histogram of its
    non-zero |values| over [0, peak] (pass 2). Non-finite values are left out."""

    def __init__(self, levels):
        self.levels = levels
        self.peak = 0.0
        self.hist = np.zeros(BINS, np.int64)

    def observe_peak(self, a):
        a = np.abs(a[np.isfinite(a)])
        if a.size:
            self.peak = max(self.peak, float(a.max()))

    def observe_histogram(self, a):
        if self.peak <= 0:
            return
        a = np.abs(a[np.isfinite(a)])
        a = a[a != 0]
        self.hist += np.histogram(a, bins=BINS, range=(0.0, self.peak))[0]


def threshold(stats, criterion):
    """The clipping threshold `criterion` picks from `stats` (0 when only zeros were seen)."""
    total = int(stats.hist.sum())
    if criterion == "max" or stats.peak <= 0 or total == 0:
        return stats.peak
    hist = stats.hist.astype(np.float64)
    width = stats.peak / BINS
    if criterion == "percentile":
        i = int(np.searchsorted(np.cumsum(hist), PERCENTILE / 100.0 * total))
        return min((i + 1) * width, stats.peak)
    if criterion == "mse":
        return _mse_threshold(hist, width, stats.levels)
    if criterion == "entropy":
        return _entropy_threshold(hist, width, stats.levels)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def _mse_threshold(hist, width, levels):
    """argmin over T = i * width (i = 1..BINS) of sum(count * error), from prefix and suffix sums."""
    centres = (np.arange(BINS) + 0.5) * width
    t = np.arange(1, BINS + 1) * width
    below = np.cumsum(hist)                                   # values in bins < i
    s0 = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0.0]])   # bins >= i, for i = 1..BINS
    s1 = np.concatenate([np.cumsum((hist * centres)[::-1])[::-1][1:], [0.0]])
    s2 = np.concatenate([np.cumsum((hist * centres ** 2)[::-1])[::-1][1:], [0.0]])
    step = t / levels
    error = below * step ** 2 / 12 + s2 - 2 * t * s1 + t ** 2 * s0
    return float(t[int(np.argmin(error))])


def _entropy_threshold(hist, width, levels):
    """TensorRT's KL-divergence calibration over candidate thresholds i * width, i = levels..BINS."""
    best_i, best_kl = BINS, np.inf
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])   # tail[i] = sum(hist[i:])
    for i in range(levels, BINS + 1):
        p = hist[:i].copy()
        p[-1] += tail[i]
        nonzero = p != 0
        merged = i // levels
        starts = np.arange(levels) * merged
        sums = np.add.reduceat(hist[:i], starts)
        counts = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(sums, counts, out=np.zeros(levels), where=counts > 0)
        q = np.where(nonzero, per_bin[np.minimum(np.arange(i) // merged, levels - 1)], 0.0)
        if q.sum() <= 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(best_i * width)


# -- calibration ---------------------------------------------------------------------------------

@dataclass
class Candidate:
    criterion: str
    model: object            # QuantizedAlexNet
    agreement: float = 0.0   # share of images whose int8 top-1 class is the float model's
    logit_mse: float = 0.0   # mean squared difference of the logits

    def summary(self):
        return {"criterion": self.criterion, "agreement": self.agreement, "logit_mse": self.logit_mse}


@dataclass
class Calibration:
    best: Candidate
    candidates: list         # every criterion tried, in CRITERIA order
    images: int


def collect_statistics(model, arch, batches):
    """{point: PointStats} over the batches (a function returning a fresh iterable of float32
    image batches), and the float model's logits on them, in order."""
    points = ["input"] + quantisation_points(arch)
    stats = {p: PointStats(INPUT_LEVELS if p == "input" else RELU_LEVELS) for p in points}
    logits = []
    for x in batches():
        seen, out = float_activations(model, arch, x)
        for p in points:
            stats[p].observe_peak(seen[p])
        logits.append(out)
    for x in batches():
        seen, _ = float_activations(model, arch, x)
        for p in points:
            stats[p].observe_histogram(seen[p])
    if not logits:
        raise ValueError("no calibration images")
    return stats, np.concatenate(logits)


def scales_for(stats, criterion):
    """(input scale, {point: scale}) that `criterion` picks."""
    s = {p: scale_from_threshold(threshold(st, criterion), st.levels) for p, st in stats.items()}
    return s.pop("input"), s


def calibrate(model, arch, batches, criteria=CRITERIA, calibration_info=None):
    """Calibrate float AlexNet `model` (eval mode) on `batches` for each of `criteria`; the
    Calibration holds every candidate's int8 model and scores and the best one (see the module
    docstring for the statistics and the choice)."""
    model.eval()
    stats, reference = collect_statistics(model, arch, batches)
    candidates = []
    for c in criteria:
        s0, scales = scales_for(stats, c)
        candidates.append(Candidate(c, quantize_alexnet(model, arch, s0, scales, criterion=c)))
    agree = np.zeros(len(candidates), np.int64)
    squared = np.zeros(len(candidates), np.float64)
    row = 0
    for x in batches():
        ref = reference[row:row + len(x)]
        for j, cand in enumerate(candidates):
            out = cand.model(x)
            agree[j] += int((np.argmax(out, axis=1) == np.argmax(ref, axis=1)).sum())
            squared[j] += float(np.sum((out.astype(np.float64) - ref) ** 2))
        row += len(x)
    for j, cand in enumerate(candidates):
        cand.agreement = float(agree[j]) / row
        cand.logit_mse = float(squared[j]) / max(1, reference.size)
    order = sorted(range(len(candidates)), key=lambda j: (-agree[j], squared[j], j))
    best = candidates[order[0]]
    info = dict(calibration_info or {}, images=row, results=[c.summary() for c in candidates])
    for cand in candidates:
        cand.model.calibration = info
    return Calibration(best, candidates, row)


# -- the quantize command ----------------------------------------------------------------------------

def calibration_samples(path, num_classes, images, seed):
    """The calibration images of list `path`: all of them, or `images` drawn without replacement
    from the seed (kept in list order)."""
    from .data import read_list
    from .run import check_images_exist
    samples = check_images_exist(read_list(path, num_classes), path)
    if len(samples) > images:
        keep = np.sort(np.random.default_rng(seed).choice(len(samples), images, replace=False))
        samples = [samples[i] for i in keep]
    return samples


def _calibration_list(load, calib, ckpt):
    """-calib, or the training list the float checkpoint records; MinialexError when neither."""
    from .errors import MinialexError
    if calib is not None:
        return calib
    recorded = ((ckpt.train_state or {}).get("lists") or {}).get("train")
    if recorded is None:
        raise MinialexError(f"-calib is required: {load} records no training list to calibrate on")
    if not os.path.isfile(recorded):
        raise MinialexError(f"-calib is required: the training list {recorded} that {load} records "
                            f"is not a readable file here")
    return recorded


def run_quantize(load, save, calib=None, criterion="auto", images=DEFAULT_IMAGES, seed=0, threads=None,
                 batch_size=32, workers=2, say=None):
    """Quantise float checkpoint `load` to int8 checkpoint `save`, calibrated on `images` images of
    list `calib` (default: the training list `load` records) drawn with `seed`; criterion "auto"
    tries all of CRITERIA and keeps the best. Returns the Calibration."""
    from .checkpoint import load_checkpoint, model_from_checkpoint, save_int8_checkpoint
    from .data import DataLoader
    from .errors import CheckpointError, MinialexError
    from .evaluation import eval_transform
    from .files import check_output_target
    from .run import check_int8, set_threads
    say = say or (lambda text: None)
    if criterion != "auto" and criterion not in CRITERIA:
        raise MinialexError(f"-criterion {criterion}: choose one of auto, {', '.join(CRITERIA)}")
    if images < 1:
        raise MinialexError(f"-images {images}: must be at least 1")
    check_output_target(save, "-save")
    check_int8()
    set_threads(threads)
    ckpt = load_checkpoint(load, int8=True)
    if ckpt.int8 is not None:
        raise CheckpointError(f"{load}: is already an int8 checkpoint; quantize takes the float "
                              f"checkpoint it was made from")
    path = _calibration_list(load, calib, ckpt)
    if calib is None:
        say(f"calibrating on the training list {path} that {load} records")
    samples = calibration_samples(path, len(ckpt.class_names), images, seed)
    model = model_from_checkpoint(ckpt)
    loader = DataLoader(samples, eval_transform(ckpt), batch_size, shuffle=False, num_workers=workers,
                        on_bad_image="error")

    def batches():
        return (x for x, _ in loader)

    criteria = CRITERIA if criterion == "auto" else (criterion,)
    info = {"list": os.fspath(path), "seed": int(seed)}
    result = calibrate(model, ckpt.arch, batches, criteria, calibration_info=info)
    save_int8_checkpoint(save, result.best.model, class_names=ckpt.class_names,
                         normalization=ckpt.normalization)
    return result


def format_calibration(result):
    """The table `minialex quantize` prints: each criterion's agreement and logit MSE, the winner marked."""
    lines = [f"{'criterion':<12}{'top-1 agreement':>17}{'logit MSE':>14}"]
    for c in result.candidates:
        mark = "  <- kept" if c is result.best else ""
        lines.append(f"{c.criterion:<12}{c.agreement:>16.2%} {c.logit_mse:>13.4g}{mark}")
    lines.append(f"{result.images} calibration images; kept {result.best.criterion}")
    return "\n".join(lines)


__all__ = ["run_quantize", "calibrate", "collect_statistics", "threshold", "scales_for", "float_activations",
           "calibration_samples", "format_calibration", "Calibration", "Candidate", "PointStats", "BINS",
           "PERCENTILE", "DEFAULT_IMAGES", "CRITERIA"]
