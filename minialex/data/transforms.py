"""Image transforms: uint8 (H, W, 3) RGB in, normalised float32 (3, S, S) out.

Training (as in the AlexNet paper and torchvision's recipe, minus the random-area crop):
resize the shorter side to `resize` (bilinear, Pillow), take a random S x S crop, flip
horizontally with probability 1/2, optionally add the paper's PCA colour noise, then normalise
each channel with (x / 255 - mean) / std. Evaluation: the same resize, the centre crop, normalise.

`resize` is between S and MAX_RESIZE_RATIO * S. An image more than MAX_ASPECT_RATIO times as long
as it is wide (a 12000 x 1 strip) keeps only its centre part of that ratio before the resize:
resizing the whole strip would make a picture of gigabytes of which the crop sees a sliver anyway.

mean and std are per channel, in 0..1 units of pixel / 255 (ImageNet: mean 0.485 0.456 0.406,
std 0.229 0.224 0.225); `compute_stats` measures them on a sample of the training list, in the
same pass as the principal components of the RGB covariance the PCA colour noise uses.

Every random choice is drawn from the Generator passed in, so the loader can give each sample
its own generator seeded from (seed, epoch, index) and get the same batch whatever thread ran it.
This is data preparation, done with Pillow and elementwise NumPy; none of the model's arithmetic.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image

from minialex.data.images import load_image
from minialex.errors import DataError

# Shorter side before the crop, per input size: torchvision's 256 -> 224 (the paper's 227 too),
# and 36 -> 32 for the small variant, the usual "pad 4 and crop" of CIFAR-sized images.
RESIZE_FOR_INPUT = {224: 256, 227: 256, 32: 36}


# The resize is at most this many times the crop: more would only decode and resize pixels the
# crop throws away (and is a damaged checkpoint, not a setting, when a file asks for it).
MAX_RESIZE_RATIO = 2
# Longest side / shorter side kept before resizing; longer images are cut to their centre.
MAX_ASPECT_RATIO = 4


def resize_for(input_size):
    """The shorter side an image is resized to before the centre or random crop of `input_size`."""
    return RESIZE_FOR_INPUT.get(int(input_size), int(round(input_size * 8 / 7)))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Principal components of ImageNet's RGB pixel covariance (pixels in 0..1), the fixed set the
# paper's colour augmentation is usually reproduced with (fb.resnet.torch, many others).
# Columns of IMAGENET_EIGVEC are the eigenvectors, in R, G, B order; IMAGENET_EIGVAL their
# eigenvalues. The default when no components were measured on the training data (compute_stats).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))
PCA_EIGVAL = np.array(IMAGENET_EIGVAL, dtype=np.float32)
PCA_EIGVEC = np.array(IMAGENET_EIGVEC, dtype=np.float32)
# The paper draws each component's weight from N(0, 0.1).
PCA_ALPHA_STD = 0.1


def _check_sizes(input_size: int, resize: int | None) -> int:
    if int(input_size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    resize = int(input_size) if resize is None else int(resize)
    if not input_size <= resize <= MAX_RESIZE_RATIO * input_size:
        raise ValueError(f"resize ({resize}) must be from the crop size ({input_size}) to "
                         f"{MAX_RESIZE_RATIO} times it")
    return resize


def _channel_stats(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """mean and std as (3, 1, 1) float32, checked."""
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std need 3 values (R, G, B), got {mean.size} and {std.size}")
    if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(std)) or np.any(std <= 0):
        raise ValueError(f"std must be positive and finite, got {std.tolist()}")
    return mean.reshape(3, 1, 1), std.reshape(3, 1, 1)


def _pca_components(eigval, eigvec) -> tuple[np.ndarray, np.ndarray]:
    """eigenvalues (3,) and eigenvectors (3, 3, columns) as float32, checked; None: ImageNet's."""
    eigval = PCA_EIGVAL if eigval is None else np.asarray(eigval, dtype=np.float32)
    eigvec = PCA_EIGVEC if eigvec is None else np.asarray(eigvec, dtype=np.float32)
    if eigval.shape != (3,) or eigvec.shape != (3, 3):
        raise ValueError(f"PCA eigenvalues need shape (3,) and eigenvectors (3, 3), got "
                         f"{eigval.shape} and {eigvec.shape}")
    if not np.isfinite(eigval).all() or not np.isfinite(eigvec).all() or (eigval < 0).any():
        raise ValueError("PCA eigenvalues must be finite and >= 0, eigenvectors finite")
    return eigval, eigvec


def centre_to_aspect(img: np.ndarray, max_ratio: float = MAX_ASPECT_RATIO) -> np.ndarray:
    """The centre of `img` with its longer side cut to at most max_ratio times the shorter (a view)."""
    h, w = img.shape[:2]
    if w > max_ratio * h:
        keep = max(1, int(max_ratio * h))
        left = (w - keep) // 2
        return img[:, left:left + keep]
    if h > max_ratio * w:
        keep = max(1, int(max_ratio * w))
        top = (h - keep) // 2
        return img[top:top + keep]
    return img


def resize_shorter_side(img: np.ndarray, size: int) -> np.ndarray:
    """Scale (H, W, 3) uint8 so that min(H, W) == size, keeping the aspect ratio (bilinear).

    Images longer than MAX_ASPECT_RATIO to 1 are cut to their centre first, which bounds the result
    at size x MAX_ASPECT_RATIO * size.
    """
    img = centre_to_aspect(img)
    h, w = img.shape[:2]
    if min(h, w) == size:
        return img
    if h <= w:
        new_h, new_w = size, max(size, round(w * size / h))
    else:
        new_h, new_w = max(size, round(h * size / w)), size
    return np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR))


def _normalise(crop: np.ndarray, scale: np.ndarray, bias: np.ndarray, shift=None) -> np.ndarray:
    # crop: (S, S, 3) uint8 -> (3, S, S) float32 = (crop / 255 + shift - mean) / std,
    # folded into one multiply and one add: scale = 1 / (255 std), bias = (shift - mean) / std.
    x = crop.transpose(2, 0, 1).astype(np.float32, order="C")
    x *= scale
    x += bias if shift is None else bias + shift.reshape(3, 1, 1) * (scale * np.float32(255))
    return x


class TrainTransform:
    """Random crop + flip (+ PCA colour noise) for training; call as t(img, rng)."""

    def __init__(self, input_size: int, resize: int | None, mean, std, pca=False, eigval=None,
                 eigvec=None):
        """eigval (3,), eigvec (3, 3) with eigenvectors as columns: the training data's principal
        components (compute_stats); None: ImageNet's (PCA_EIGVAL, PCA_EIGVEC)."""
        self.input_size = int(input_size)
        self.resize = _check_sizes(input_size, resize)
        self.mean, self.std = _channel_stats(mean, std)
        self._scale, self._bias = 1 / (255 * self.std), -self.mean / self.std
        self.pca = bool(pca)
        self.eigval, self.eigvec = _pca_components(eigval, eigvec)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        s = self.input_size
        img = resize_shorter_side(img, self.resize)
        h, w = img.shape[:2]
        top = int(rng.integers(0, h - s + 1))
        left = int(rng.integers(0, w - s + 1))
        crop = img[top:top + s, left:left + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        shift = None
        if self.pca:
            alpha = rng.normal(0.0, PCA_ALPHA_STD, size=3).astype(np.float32)
            # Sum of eigenvectors weighted by alpha_i * lambda_i: one RGB offset for the image.
            shift = (self.eigvec * (alpha * self.eigval)[None, :]).sum(axis=1)
        return _normalise(crop, self._scale, self._bias, shift)

    def __repr__(self):
        return (f"TrainTransform(input_size={self.input_size}, resize={self.resize}, "
                f"mean={self.mean.ravel().tolist()}, std={self.std.ravel().tolist()}, pca={self.pca})")


class EvalTransform:
    """Resize + centre crop for evaluation and inference; call as t(img) (an rng is ignored)."""

    def __init__(self, input_size: int, resize: int | None, mean, std):
        self.input_size = int(input_size)
        self.resize = _check_sizes(input_size, resize)
        self.mean, self.std = _channel_stats(mean, std)
        self._scale, self._bias = 1 / (255 * self.std), -self.mean / self.std

    def __call__(self, img: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        s = self.input_size
        img = resize_shorter_side(img, self.resize)
        h, w = img.shape[:2]
        top, left = (h - s) // 2, (w - s) // 2
        return _normalise(img[top:top + s, left:left + s], self._scale, self._bias)

    def __repr__(self):
        return (f"EvalTransform(input_size={self.input_size}, resize={self.resize}, "
                f"mean={self.mean.ravel().tolist()}, std={self.std.ravel().tolist()})")


class Stats(NamedTuple):
    """Pixel statistics of a training sample, in 0..1 units (pixel / 255)."""
    mean: list[float]           # per channel, R G B
    std: list[float]            # per channel, floored at 1e-3
    eigval: list[float]         # eigenvalues of the RGB covariance, largest first
    eigvec: list[list[float]]   # 3 x 3, column i the eigenvector of eigval[i]


# Pixels per float64 block of the statistics pass: 1.5 MB, so an 8192 x 8192 image never has a
# float64 copy (1.6 GB) made of it.
_STATS_CHUNK = 1 << 16


def _pixel_sums(img: np.ndarray):
    """(pixel count, sum per channel (3,), sum of channel products (3, 3)) of a uint8 (H, W, 3)."""
    flat = img.reshape(-1, 3)
    total, products = np.zeros(3), np.zeros((3, 3))
    for i in range(0, flat.shape[0], _STATS_CHUNK):
        block = flat[i:i + _STATS_CHUNK].astype(np.float64)
        total += block.sum(axis=0)
        products += block.T @ block   # integers below 2**53: exact in float64
    return flat.shape[0], total, products


def compute_stats(samples, max_images: int = 500, rng: np.random.Generator | None = None,
                  num_workers: int = 2) -> Stats:
    """Mean, std and the PCA of the RGB covariance over every pixel of up to `max_images` samples.

    The subset is drawn without replacement from `rng` (default: seeded 0, so a given list always
    gives the same numbers). Unreadable images are left out; if none can be read, a DataError names
    the first one, its list line and why. Memory: one decoded image per worker plus a 1.5 MB block.
    """
    if not samples:
        raise ValueError("compute_stats needs at least one sample")
    rng = np.random.default_rng(0) if rng is None else rng
    count = min(int(max_images), len(samples))
    chosen = [samples[i] for i in sorted(rng.choice(len(samples), size=count, replace=False))]

    def sums(sample):
        try:
            return _pixel_sums(load_image(sample.path))
        except DataError as e:
            return sample, e

    n, total, products, first_bad = 0, np.zeros(3), np.zeros((3, 3)), None
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for result in pool.map(sums, chosen):
            if isinstance(result[1], DataError):
                first_bad = first_bad or result
                continue
            n += result[0]
            total += result[1]
            products += result[2]
    if n == 0:
        sample, error = first_bad
        raise DataError(sample.where(f"{error} (none of the {count} sampled images could be read to "
                                     f"measure the mean and std)"))
    mean = total / n / 255.0
    cov = products / n / (255.0 * 255.0) - np.outer(mean, mean)
    # A constant channel (a blank test set) would give std 0 and divide by zero later.
    std = np.maximum(np.sqrt(np.maximum(np.diag(cov), 0.0)), 1e-3)
    eigval, eigvec = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.maximum(eigval[order], 0.0), eigvec[:, order]
    # An eigenvector's sign is arbitrary; fix it (largest component positive) so runs agree.
    signs = np.sign(eigvec[np.abs(eigvec).argmax(axis=0), np.arange(3)])
    eigvec = eigvec * np.where(signs == 0, 1.0, signs)
    return Stats([float(v) for v in mean], [float(v) for v in std], [float(v) for v in eigval],
                 [[float(v) for v in row] for row in eigvec])


def compute_mean_std(samples, max_images: int = 500, rng: np.random.Generator | None = None,
                     num_workers: int = 2) -> tuple[list[float], list[float]]:
    """(mean, std) of compute_stats, for callers that do not use the PCA colour noise."""
    stats = compute_stats(samples, max_images, rng, num_workers)
    return stats.mean, stats.std
