"""Image transforms: uint8 (H, W, 3) RGB in, normalised float32 (3, S, S) out.

Training (as in the AlexNet paper and torchvision's recipe, minus the random-area crop):
resize the shorter side to `resize` (bilinear, Pillow), take a random S x S crop, flip
horizontally with probability 1/2, optionally add the paper's PCA colour noise, then normalise
each channel with (x / 255 - mean) / std. Evaluation: the same resize, the centre crop, normalise.

mean and std are per channel, in 0..1 units of pixel / 255 (ImageNet: mean 0.485 0.456 0.406,
std 0.229 0.224 0.225); `compute_mean_std` measures them on a sample of the training list.

Every random choice is drawn from the Generator passed in, so the loader can give each sample
its own generator seeded from (seed, epoch, index) and get the same batch whatever thread ran it.
This is data preparation, done with Pillow and elementwise NumPy; none of the model's arithmetic.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from minialex.data.images import load_image
from minialex.errors import DataError

# Shorter side before the crop, per input size: torchvision's 256 -> 224 (the paper's 227 too),
# and 36 -> 32 for the small variant, the usual "pad 4 and crop" of CIFAR-sized images.
RESIZE_FOR_INPUT = {224: 256, 227: 256, 32: 36}


def resize_for(input_size):
    """The shorter side an image is resized to before the centre or random crop of `input_size`."""
    return RESIZE_FOR_INPUT.get(int(input_size), int(round(input_size * 8 / 7)))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Principal components of ImageNet's RGB pixel covariance (pixels in 0..1), the fixed set the
# paper's colour augmentation is usually reproduced with (fb.resnet.torch, many others).
# Columns of PCA_EIGVEC are the eigenvectors, in R, G, B order; PCA_EIGVAL their eigenvalues.
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], dtype=np.float32)
# The paper draws each component's weight from N(0, 0.1).
PCA_ALPHA_STD = 0.1


def _check_sizes(input_size: int, resize: int | None) -> int:
    if int(input_size) < 1:
        raise ValueError(f"input_size must be positive, got {input_size}")
    resize = int(input_size) if resize is None else int(resize)
    if resize < input_size:
        raise ValueError(f"resize ({resize}) must be at least the crop size ({input_size})")
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


def resize_shorter_side(img: np.ndarray, size: int) -> np.ndarray:
    """Scale (H, W, 3) uint8 so that min(H, W) == size, keeping the aspect ratio (bilinear)."""
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

    def __init__(self, input_size: int, resize: int | None, mean, std, pca=False):
        self.input_size = int(input_size)
        self.resize = _check_sizes(input_size, resize)
        self.mean, self.std = _channel_stats(mean, std)
        self._scale, self._bias = 1 / (255 * self.std), -self.mean / self.std
        self.pca = bool(pca)

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
            shift = (PCA_EIGVEC * (alpha * PCA_EIGVAL)[None, :]).sum(axis=1)
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


def compute_mean_std(samples, max_images: int = 500, rng: np.random.Generator | None = None,
                     num_workers: int = 2) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 units) over every pixel of up to `max_images` samples.

    The subset is drawn without replacement from `rng` (default: seeded 0, so a given list always
    gives the same numbers). Unreadable images are left out; if none can be read, DataError.
    """
    if not samples:
        raise ValueError("compute_mean_std needs at least one sample")
    rng = np.random.default_rng(0) if rng is None else rng
    count = min(int(max_images), len(samples))
    chosen = [samples[i] for i in sorted(rng.choice(len(samples), size=count, replace=False))]

    def stats(sample):
        try:
            img = load_image(sample.path)
        except DataError:
            return None
        pixels = img.reshape(-1, 3).astype(np.float64)
        return pixels.shape[0], pixels.sum(axis=0), (pixels * pixels).sum(axis=0)

    n, total, total_sq = 0, np.zeros(3), np.zeros(3)
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for result in pool.map(stats, chosen):
            if result is not None:
                n += result[0]
                total += result[1]
                total_sq += result[2]
    if n == 0:
        raise DataError(f"{chosen[0].path}: none of the {count} sampled images could be read "
                        f"to compute the mean and std")
    mean = total / n / 255.0
    var = np.maximum(total_sq / n / (255.0 * 255.0) - mean * mean, 0.0)
    # A constant channel (a blank test set) would give std 0 and divide by zero later.
    std = np.maximum(np.sqrt(var), 1e-3)
    return [float(v) for v in mean], [float(v) for v in std]
