"""A small dataset that ships with minialex, so training can be tried without downloading anything.

It is a class-balanced subset of Fashion-MNIST by Zalando Research
(https://github.com/zalandoresearch/fashion-mnist, MIT licence, Copyright (c) 2017 Zalando SE;
see FASHION_MNIST_LICENSE.txt beside this file): 200 training and 50 test images of each of the
10 classes, 28x28 greyscale, kept as compressed uint8 arrays in fashion_mnist.npz (rebuilt by
tools/make_demo_data.py from the original IDX files).

`demo_dataset()` writes them out once as PNG files with train/images.list, test/images.list and
labels.txt in the cache folder -- $MINIALEX_CACHE if set, else $XDG_CACHE_HOME/minialex, else
~/.cache/minialex -- and returns those paths; later calls reuse the files. The folder is built
under a temporary name and renamed into place, so a crash never leaves half a dataset behind.
Its name carries a digest of the packaged arrays, so a new release's data gets a new folder.
"""
import hashlib
import os
import shutil
import tempfile
from typing import NamedTuple

import numpy as np

from minialex.data.prepare import FASHION_MNIST_CLASSES, write_labels, write_png_split
from minialex.errors import DataError, at_line

PACKAGED_ARRAYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist.npz")


class DemoData(NamedTuple):
    train_list: str
    test_list: str
    labels: str


def cache_root() -> str:
    """$MINIALEX_CACHE, else $XDG_CACHE_HOME/minialex, else ~/.cache/minialex."""
    if os.environ.get("MINIALEX_CACHE"):
        return os.path.abspath(os.environ["MINIALEX_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minialex")


def load_demo_arrays(path=PACKAGED_ARRAYS) -> dict[str, np.ndarray]:
    """x_train (2000, 28, 28) uint8, y_train (2000,) uint8, x_test (500, 28, 28), y_test (500,)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, KeyError, ValueError) as e:
        raise DataError(at_line(path, None, f"packaged demo data is missing or damaged "
                                f"(reinstall minialex): {e}")) from None
    return arrays


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def demo_dataset(cache_dir=None) -> DemoData:
    """Paths of the demo train list, test list and labels file, written out on first use."""
    root = os.path.abspath(cache_dir) if cache_dir is not None else cache_root()
    try:
        folder = os.path.join(root, f"fashion-mnist-demo-{_digest(PACKAGED_ARRAYS)}")
    except OSError as e:
        raise DataError(at_line(PACKAGED_ARRAYS, None, f"packaged demo data is missing "
                                f"(reinstall minialex): {e.strerror or e}")) from None
    data = DemoData(os.path.join(folder, "train", "images.list"),
                    os.path.join(folder, "test", "images.list"),
                    os.path.join(folder, "labels.txt"))
    if all(os.path.isfile(p) for p in data):
        return data
    arrays = load_demo_arrays()
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".fashion-mnist-demo.partial-", dir=root)
    except OSError as e:
        raise DataError(at_line(root, None, f"cannot create the cache folder: {e.strerror or e} "
                                "(set MINIALEX_CACHE to a writable folder)")) from None
    try:
        write_png_split(os.path.join(tmp, "train"), arrays["x_train"], arrays["y_train"])
        write_png_split(os.path.join(tmp, "test"), arrays["x_test"], arrays["y_test"])
        write_labels(os.path.join(tmp, "labels.txt"), FASHION_MNIST_CLASSES)
        os.chmod(tmp, 0o755)
        if os.path.isdir(folder):
            # Left incomplete by hand (files deleted): replace it with the fresh copy.
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished the same folder first; theirs is as good as ours.
            if not all(os.path.isfile(p) for p in data):
                raise
    except OSError as e:
        raise DataError(at_line(root, None, f"cannot write the demo dataset: {e.strerror or e}")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data
