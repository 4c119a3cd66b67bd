import os

import numpy as np
import pytest

from minialex.data import FASHION_MNIST_CLASSES, demo_dataset, load_image, read_dataset
from minialex.data import demo
from minialex.errors import DataError


def test_packaged_arrays_are_small_balanced_uint8():
    assert os.path.getsize(demo.PACKAGED_ARRAYS) <= 2 * 1024 * 1024
    arrays = demo.load_demo_arrays()
    for split, per_class in (("train", 200), ("test", 50)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        assert x.dtype == np.uint8 and x.shape == (10 * per_class, 28, 28)
        assert np.bincount(y, minlength=10).tolist() == [per_class] * 10
        assert x.std() > 30  # real pictures, not blank arrays
    assert os.path.isfile(os.path.join(os.path.dirname(demo.PACKAGED_ARRAYS), "FASHION_MNIST_LICENSE.txt"))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIALEX_CACHE", str(tmp_path / "mc"))
    assert demo.cache_root() == str(tmp_path / "mc")
    monkeypatch.delenv("MINIALEX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_root() == str(tmp_path / "xdg" / "minialex")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_root() == str(tmp_path / "home" / ".cache" / "minialex")


def test_demo_dataset_is_written_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIALEX_CACHE", str(tmp_path))
    data = demo_dataset()
    assert all(p.startswith(str(tmp_path)) and os.path.isfile(p) for p in data)
    train, names = read_dataset(data.train_list, data.labels)
    test, _ = read_dataset(data.test_list, data.labels)
    assert names == FASHION_MNIST_CLASSES
    assert len(train) == 2000 and len(test) == 500
    assert np.bincount([s.label for s in train]).tolist() == [200] * 10
    img = load_image(train[0].path)
    assert img.shape == (28, 28, 3)
    arrays = demo.load_demo_arrays()
    np.testing.assert_array_equal(img[..., 0], arrays["x_train"][0])
    assert train[0].label == arrays["y_train"][0]
    # nothing but the finished folder is left in the cache
    assert os.listdir(tmp_path) == [os.path.basename(os.path.dirname(os.path.dirname(data.train_list)))]

    stamp = os.stat(train[0].path).st_mtime_ns
    again = demo_dataset()
    assert again == data and os.stat(train[0].path).st_mtime_ns == stamp


def test_incomplete_cache_is_rebuilt(tmp_path):
    data = demo_dataset(cache_dir=tmp_path)
    os.remove(data.test_list)
    rebuilt = demo_dataset(cache_dir=tmp_path)
    assert os.path.isfile(rebuilt.test_list)
    assert len(os.listdir(tmp_path)) == 1


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "write_labels", fail)
    with pytest.raises(DataError, match="No space left on device"):
        demo_dataset(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
