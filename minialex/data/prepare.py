"""Turning datasets into the folder layout the trainer reads.

    out_dir/labels.txt           "class_id name" lines
    out_dir/train/images.list    "class_id path" lines
    out_dir/test/images.list

`prepare_fashion_mnist` writes Fashion-MNIST's IDX files (plain or .gz) out as PNG files;
`prepare_folder` indexes a tree with one sub-folder per class (class ids by sorted folder name)
without copying the images. Both build everything in a temporary folder beside `out_dir` and
rename it into place at the end, so an interrupted run never leaves a half-written dataset.

From the shell: minialex prepare fashion-mnist OUT_DIR   or   minialex prepare folder SRC OUT_DIR
"""
import gzip
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from minialex.errors import DataError, at_line

# Where Debian's dataset-fashion-mnist package installs the original IDX files.
FASHION_MNIST_SOURCE = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# IDX type codes (the third byte of the magic number) we can read.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzip-compressed or not, into an array."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(at_line(path, None, "no such IDX file")) from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(at_line(path, None, f"cannot read IDX file: {e}")) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(at_line(path, None, "not an IDX file (bad magic number)"))
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(at_line(path, None, "truncated IDX header"))
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(at_line(path, None, f"IDX data is {len(raw)} bytes, its header says {expected}"))
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(source, stem: str) -> str:
    for name in (stem + ".gz", stem):
        candidate = os.path.join(source, name)
        if os.path.isfile(candidate):
            return candidate
    raise DataError(at_line(os.path.join(source, stem + ".gz"), None,
                            f"missing Fashion-MNIST file (neither {stem}.gz nor {stem} is in {source})"))


def load_fashion_mnist(source=FASHION_MNIST_SOURCE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images (N, 28, 28) uint8, labels (N,) uint8), "test": (...)} from IDX files."""
    if not os.path.isdir(source):
        raise DataError(at_line(source, None, "Fashion-MNIST folder not found (on Debian: "
                                "apt install dataset-fashion-mnist)"))
    splits = {}
    for split, (image_stem, label_stem) in FASHION_MNIST_FILES.items():
        image_path, label_path = _find_idx(source, image_stem), _find_idx(source, label_stem)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(at_line(image_path, None, f"expected (N, rows, cols) uint8 images, "
                                    f"got shape {images.shape} {images.dtype}"))
        if labels.shape != (images.shape[0],):
            raise DataError(at_line(label_path, None, f"{labels.size} labels for {images.shape[0]} images"))
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(at_line(label_path, None, f"label {int(labels.max())} is not a "
                                    f"Fashion-MNIST class (0..{len(FASHION_MNIST_CLASSES) - 1})"))
        splits[split] = (images, labels.astype(np.uint8))
    return splits


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `per_class` random samples of every class present in `labels`."""
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if members.size < per_class:
            raise ValueError(f"class {int(c)} has only {members.size} samples, {per_class} wanted")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def write_labels(path, names) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, name in enumerate(names):
            f.write(f"{i} {name}\n")


def write_png_split(folder, images: np.ndarray, labels: np.ndarray) -> None:
    """folder/<class_id>/<index>.png for each greyscale image, plus folder/images.list."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        relative = f"{int(label)}/{i:05d}.png"
        os.makedirs(os.path.join(folder, str(int(label))), exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(os.path.join(folder, relative))
        lines.append(f"{int(label)} {relative}\n")
    with open(os.path.join(folder, "images.list"), "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def build_atomically(out_dir, fill) -> str:
    """Run fill(tmp_dir) in a fresh sibling of out_dir, then rename it to out_dir.

    out_dir must not exist or be an empty folder: we never mix a new dataset into an old one.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(at_line(out_dir, None, "already exists and is not an empty folder; "
                                "choose a new output folder"))
    parent = os.path.dirname(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out_dir) + ".partial-", dir=parent)
    except OSError as e:
        raise DataError(at_line(parent, None, f"cannot create the output folder: "
                                f"{e.strerror or e}")) from None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def prepare_fashion_mnist(out_dir, source=FASHION_MNIST_SOURCE, per_class: int | None = None,
                          seed: int = 0) -> str:
    """Write Fashion-MNIST as PNGs + images.list (train and test) + labels.txt; returns out_dir.

    `per_class` keeps only that many random images of each class in each split (seeded).
    """
    splits = load_fashion_mnist(source)

    def fill(tmp):
        rng = np.random.default_rng(seed)
        for split, (images, labels) in splits.items():
            if per_class is not None:
                keep = balanced_subset(labels, per_class, rng)
                images, labels = images[keep], labels[keep]
            write_png_split(os.path.join(tmp, split), images, labels)
        write_labels(os.path.join(tmp, "labels.txt"), FASHION_MNIST_CLASSES)

    return build_atomically(out_dir, fill)


def _class_images(class_dir) -> list[str]:
    found = []
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(files)
                     if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _class_folders(tree) -> list[str]:
    return sorted(d.name for d in os.scandir(tree) if d.is_dir() and not d.name.startswith("."))


def prepare_folder(src, out_dir, test_fraction: float = 0.1, seed: int = 0) -> str:
    """Index a tree of class folders: labels.txt + train/images.list + test/images.list.

    `src/<class>/...images...`: class ids follow the sorted folder names, and a seeded
    `test_fraction` of each class goes to the test list. If `src` already has `train/` and
    `test/` (or `val/`) sub-trees with the same class folders, those splits are kept instead.
    Images are not copied: the lists hold absolute paths to them. Hidden files and files
    without an image extension are ignored; whether each image decodes is checked in training.
    """
    src = os.path.abspath(os.fspath(src))
    if not os.path.isdir(src):
        raise DataError(at_line(src, None, "no such folder"))
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    test_name = next((n for n in ("test", "val") if os.path.isdir(os.path.join(src, n))), None)
    presplit = os.path.isdir(os.path.join(src, "train")) and test_name is not None
    classes = _class_folders(os.path.join(src, "train") if presplit else src)
    if not classes:
        raise DataError(at_line(src, None, "has no class sub-folders (expected one folder per class)"))
    rng = np.random.default_rng(seed)
    lists = {"train": [], "test": []}
    if presplit:
        test_classes = _class_folders(os.path.join(src, test_name))
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(at_line(os.path.join(src, test_name, unknown[0]), None,
                                    "class folder not present under train/"))
        for class_id, name in enumerate(classes):
            lists["train"] += [(class_id, p) for p in _class_images(os.path.join(src, "train", name))]
            lists["test"] += [(class_id, p) for p in _class_images(os.path.join(src, test_name, name))]
    else:
        for class_id, name in enumerate(classes):
            paths = _class_images(os.path.join(src, name))
            n_test = int(round(len(paths) * test_fraction))
            test_idx = set(rng.choice(len(paths), size=n_test, replace=False).tolist()) if n_test else set()
            for i, p in enumerate(paths):
                lists["test" if i in test_idx else "train"].append((class_id, p))
    if not lists["train"]:
        raise DataError(at_line(src, None, f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)})"))
    for split, entries in lists.items():
        for _, p in entries:
            if any(c in p for c in "\r\n") or p != p.strip(" \t"):
                raise DataError(at_line(p, None, "file name has a line break or leading/trailing "
                                        "spaces, which a list file cannot hold"))

    def fill(tmp):
        for split, entries in lists.items():
            os.makedirs(os.path.join(tmp, split))
            with open(os.path.join(tmp, split, "images.list"), "w", encoding="utf-8",
                      newline="\n", errors="strict") as f:
                f.writelines(f"{class_id} {p}\n" for class_id, p in entries)
        write_labels(os.path.join(tmp, "labels.txt"), classes)

    try:
        return build_atomically(out_dir, fill)
    except UnicodeEncodeError as e:
        raise DataError(at_line(src, None, f"a file name is not valid UTF-8: {e.object[:80]!r}")) from None
