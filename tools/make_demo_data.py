"""Rebuild minialex/data/fashion_mnist.npz, the demo dataset packaged with minialex.

    python tools/make_demo_data.py [--source /usr/share/datasets/fashion-mnist] [--out FILE]

A class-balanced, seeded subset of Fashion-MNIST (Zalando Research, MIT licence): 200 training
images per class from the training set and 50 test images per class from the test set. The .npz
is written with fixed zip timestamps, so the same source gives the same bytes.
"""
import argparse
import io
import os
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minialex.data.prepare import FASHION_MNIST_SOURCE, balanced_subset, load_fashion_mnist  # noqa: E402
from minialex.errors import MinialexError  # noqa: E402

TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 50
SEED = 2017  # the year Fashion-MNIST came out; any fixed number would do
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minialex", "data",
                           "fashion_mnist.npz")


def demo_arrays(source=FASHION_MNIST_SOURCE) -> dict[str, np.ndarray]:
    splits = load_fashion_mnist(source)
    rng = np.random.default_rng(SEED)
    arrays = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images, labels = splits[split]
        keep = balanced_subset(labels, per_class, rng)
        # Shuffle so that the written-out lists are not sorted by class.
        keep = keep[rng.permutation(keep.size)]
        arrays[f"x_{split}"] = np.ascontiguousarray(images[keep])
        arrays[f"y_{split}"] = np.ascontiguousarray(labels[keep].astype(np.uint8))
    return arrays


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed timestamps and an atomic replace."""
    tmp = path + ".partial"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=FASHION_MNIST_SOURCE)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        arrays = demo_arrays(args.source)
    except MinialexError as e:
        print(f"make_demo_data: error: {e}", file=sys.stderr)
        return 2
    out = os.path.normpath(args.out)
    write_npz(out, arrays)
    print(f"wrote {out} ({os.path.getsize(out):,} bytes): "
          + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
