import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from minialex.data import load_image, prepare_fashion_mnist, prepare_folder, read_dataset
from minialex.data.prepare import FASHION_MNIST_SOURCE, read_idx
from minialex.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_fashion_mnist(folder, n_train=30, n_test=20, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        for kind, data in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(data)
            name = f"{stem}-{kind}" + (".gz" if compress else "")
            (folder / name).write_bytes(gzip.compress(raw) if compress else raw)
        arrays[stem] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_prepare_fashion_mnist_from_idx(tmp_path, compress):
    arrays = fake_fashion_mnist(tmp_path / "src", compress=compress)
    out = prepare_fashion_mnist(tmp_path / "out", source=str(tmp_path / "src"))
    train, names = read_dataset(os.path.join(out, "train", "images.list"), os.path.join(out, "labels.txt"))
    test, _ = read_dataset(os.path.join(out, "test", "images.list"), os.path.join(out, "labels.txt"))
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot" and len(names) == 10
    assert len(train) == 30 and len(test) == 20
    images, labels = arrays["t10k"]
    for i in (0, 7, 19):
        assert test[i].label == labels[i]
        np.testing.assert_array_equal(load_image(test[i].path)[..., 1], images[i])
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_prepare_fashion_mnist_subset_per_class(tmp_path):
    fake_fashion_mnist(tmp_path / "src", n_train=40, n_test=20)
    out = prepare_fashion_mnist(tmp_path / "out", source=str(tmp_path / "src"), per_class=2)
    train, _ = read_dataset(os.path.join(out, "train", "images.list"))
    assert np.bincount([s.label for s in train]).tolist() == [2] * 10


def test_missing_and_broken_idx_files(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST folder not found"):
        prepare_fashion_mnist(tmp_path / "out", source=str(tmp_path / "nowhere"))
    fake_fashion_mnist(tmp_path / "src")
    os.remove(tmp_path / "src" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        prepare_fashion_mnist(tmp_path / "out", source=str(tmp_path / "src"))
    short_labels = b"\x00\x00\x08\x01\x00\x00\x00\x05ab"  # says 5 labels, holds 2
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(short_labels))
    with pytest.raises(DataError, match="header says"):
        prepare_fashion_mnist(tmp_path / "out", source=str(tmp_path / "src"))
    (tmp_path / "junk").write_bytes(b"GIF89a....")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "junk")
    assert not (tmp_path / "out").exists()


def test_output_folder_must_be_new_or_empty(tmp_path):
    fake_fashion_mnist(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an empty folder"):
        prepare_fashion_mnist(tmp_path / "out", source=str(tmp_path / "src"))
    assert os.listdir(tmp_path / "out") == ["old.txt"]
    (tmp_path / "empty").mkdir()
    prepare_fashion_mnist(tmp_path / "empty", source=str(tmp_path / "src"))
    assert (tmp_path / "empty" / "labels.txt").is_file()


def class_tree(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / name / f"img {i}.png")
    (root / next(iter(counts)) / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()


def test_prepare_folder_splits_each_class(tmp_path):
    class_tree(tmp_path / "src", {"zebra": 10, "ant": 20, "cat": 10})
    out = prepare_folder(tmp_path / "src", tmp_path / "out", test_fraction=0.2, seed=1)
    train, names = read_dataset(os.path.join(out, "train", "images.list"), os.path.join(out, "labels.txt"))
    test, _ = read_dataset(os.path.join(out, "test", "images.list"), os.path.join(out, "labels.txt"))
    assert names == ["ant", "cat", "zebra"]
    assert np.bincount([s.label for s in test]).tolist() == [4, 2, 2]
    assert np.bincount([s.label for s in train]).tolist() == [16, 8, 8]
    paths = [s.path for s in train + test]
    assert len(set(paths)) == 40 and all(p.endswith(".png") and os.path.isfile(p) for p in paths)
    assert all(os.path.basename(os.path.dirname(s.path)) == names[s.label] for s in train)


def test_prepare_folder_keeps_existing_splits(tmp_path):
    class_tree(tmp_path / "src" / "train", {"a": 3, "b": 2})
    class_tree(tmp_path / "src" / "val", {"a": 1, "b": 1})
    out = prepare_folder(tmp_path / "src", tmp_path / "out")
    train, names = read_dataset(os.path.join(out, "train", "images.list"))
    test, _ = read_dataset(os.path.join(out, "test", "images.list"))
    assert len(train) == 5 and len(test) == 2 and all("/val/" in s.path for s in test)


def test_prepare_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        prepare_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        prepare_folder(tmp_path / "flat", tmp_path / "out")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(DataError, match="no images found"):
        prepare_folder(tmp_path / "flat", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["flat"]


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SOURCE),
                    reason="Debian's dataset-fashion-mnist not installed")
def test_packaged_demo_arrays_are_reproduced_by_the_generator_script():
    import importlib.util

    from minialex.data import demo
    script = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_demo_data.py")
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rebuilt = tool.demo_arrays()
    packaged = demo.load_demo_arrays()
    assert rebuilt.keys() == packaged.keys()
    for name in packaged:
        np.testing.assert_array_equal(rebuilt[name], packaged[name])
