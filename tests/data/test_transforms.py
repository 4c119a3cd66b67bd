import numpy as np
import pytest
from PIL import Image

from minialex.data import EvalTransform, Sample, TrainTransform, compute_mean_std, compute_stats
from minialex.data.transforms import resize_shorter_side
from minialex.errors import DataError

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]


def photo(h=40, w=60, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def unnormalise(x):
    return (x * np.array(STD, np.float32)[:, None, None] + np.array(MEAN, np.float32)[:, None, None]) * 255


def test_resize_shorter_side_keeps_aspect():
    assert resize_shorter_side(photo(40, 60), 20).shape == (20, 30, 3)
    assert resize_shorter_side(photo(60, 40), 20).shape == (30, 20, 3)
    assert resize_shorter_side(photo(28, 28), 36).shape == (36, 36, 3)
    img = photo(20, 30)
    assert resize_shorter_side(img, 20) is img


def test_eval_is_resize_then_centre_crop_then_normalise():
    img = photo(40, 60)
    x = EvalTransform(16, 20, MEAN, STD)(img)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and x.flags.c_contiguous
    resized = np.asarray(Image.fromarray(img).resize((30, 20), Image.BILINEAR))
    centre = resized[2:18, 7:23].transpose(2, 0, 1)
    np.testing.assert_allclose(unnormalise(x), centre, atol=1e-3)


def test_train_crops_are_windows_of_the_resized_image_and_flips_happen():
    img = photo(40, 60)
    t = TrainTransform(16, 20, MEAN, STD)
    resized = np.asarray(Image.fromarray(img).resize((30, 20), Image.BILINEAR)).transpose(2, 0, 1)
    flips = positions = 0
    seen = set()
    for seed in range(40):
        pixels = np.rint(unnormalise(t(img, np.random.default_rng(seed)))).astype(np.int64)
        found = None
        for top in range(5):
            for left in range(15):
                window = resized[:, top:top + 16, left:left + 16]
                if np.array_equal(pixels, window):
                    found = (top, left, False)
                elif np.array_equal(pixels, window[:, :, ::-1]):
                    found = (top, left, True)
        assert found is not None
        seen.add(found[:2])
        flips += found[2]
        positions += 1
    assert 8 <= flips <= 32 and len(seen) > 10


def test_train_is_deterministic_given_the_generator():
    img = photo()
    t = TrainTransform(24, 32, MEAN, STD, pca=True)
    a = t(img, np.random.default_rng(7))
    b = t(img, np.random.default_rng(7))
    c = t(img, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pca_adds_one_colour_offset_per_image():
    img = np.full((32, 32, 3), 128, np.uint8)  # flat grey: crop and flip change nothing
    plain = TrainTransform(32, 32, MEAN, STD)(img, np.random.default_rng(3))
    noisy = TrainTransform(32, 32, MEAN, STD, pca=True)(img, np.random.default_rng(3))
    offset = (noisy - plain) * np.array(STD, np.float32)[:, None, None]
    per_channel = offset.reshape(3, -1)
    assert np.ptp(per_channel, axis=1).max() < 1e-5      # the same shift for every pixel
    assert 1e-4 < np.abs(per_channel[:, 0]).max() < 0.2  # small but present (0..1 units)


def test_normalisation_uses_mean_and_std_per_channel():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 102, 0
    x = EvalTransform(8, 8, MEAN, STD)(img)
    np.testing.assert_allclose(x[:, 0, 0], [(1 - 0.5) / 0.25, (0.4 - 0.4) / 0.2, (0 - 0.3) / 0.1], atol=1e-5)


def test_fashion_mnist_sizes():
    grey = np.repeat(photo(28, 28)[..., :1], 3, axis=2)
    assert TrainTransform(32, 36, MEAN, STD)(grey, np.random.default_rng(0)).shape == (3, 32, 32)
    assert EvalTransform(32, 36, MEAN, STD)(grey).shape == (3, 32, 32)
    assert EvalTransform(32, None, MEAN, STD)(grey).shape == (3, 32, 32)


@pytest.mark.parametrize("kwargs", [dict(input_size=32, resize=30, mean=MEAN, std=STD),
                                    dict(input_size=32, resize=36, mean=MEAN[:2], std=STD),
                                    dict(input_size=32, resize=36, mean=MEAN, std=[0.2, 0.0, 0.1])])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        EvalTransform(**kwargs)


def test_compute_mean_std(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    all_pixels = []
    for i in range(6):
        img = rng.integers(0, 256, size=(10 + i, 12, 3), dtype=np.uint8)
        img[..., 2] = 30
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        samples.append(Sample(0, str(tmp_path / f"{i}.png"), i + 1))
        all_pixels.append(img.reshape(-1, 3) / 255)
    (tmp_path / "bad.png").write_text("no")
    samples.append(Sample(0, str(tmp_path / "bad.png"), 7))
    mean, std = compute_mean_std(samples, max_images=100)
    pixels = np.concatenate(all_pixels)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(std[:2], pixels.std(axis=0)[:2], rtol=1e-9)
    assert std[2] == pytest.approx(1e-3)  # a constant channel gets a floor, not a zero
    # a subset is a seeded sample: same rng seed, same numbers
    subset = compute_mean_std(samples, 3, np.random.default_rng(5))
    assert subset == compute_mean_std(samples, 3, np.random.default_rng(5))
    with pytest.raises(DataError):
        compute_mean_std([samples[-1]])


def _images(tmp_path, rng, count=5):
    samples, pixels = [], []
    for i in range(count):
        img = rng.integers(0, 256, size=(9 + i, 11, 3), dtype=np.uint8)
        img[..., 1] = img[..., 0] // 2 + 40  # correlated channels: a clear first component
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        samples.append(Sample(0, str(tmp_path / f"{i}.png"), i + 1, str(tmp_path / "train.list")))
        pixels.append(img.reshape(-1, 3) / 255)
    return samples, np.concatenate(pixels)


def test_compute_stats_gives_the_pca_of_the_pixel_covariance(tmp_path, monkeypatch):
    samples, pixels = _images(tmp_path, np.random.default_rng(1))
    import minialex.data.transforms as transforms
    monkeypatch.setattr(transforms, "_STATS_CHUNK", 7)  # many blocks per image: the sums must add up
    stats = compute_stats(samples)
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(axis=0), rtol=1e-9)
    cov = np.cov(pixels, rowvar=False, bias=True)
    eigval, eigvec = np.array(stats.eigval), np.array(stats.eigvec)
    assert eigval[0] >= eigval[1] >= eigval[2] >= 0
    np.testing.assert_allclose(cov @ eigvec, eigvec * eigval[None, :], atol=1e-10)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-10)
    assert (eigvec[np.abs(eigvec).argmax(axis=0), np.arange(3)] > 0).all()  # signs fixed


def test_compute_stats_names_the_list_line_when_nothing_reads(tmp_path):
    (tmp_path / "bad.png").write_text("no")
    bad = Sample(0, str(tmp_path / "bad.png"), 7, str(tmp_path / "train.list"))
    with pytest.raises(DataError) as e:
        compute_stats([bad])
    assert str(e.value).startswith(f"{tmp_path / 'train.list'}:7: {tmp_path / 'bad.png'}: not an image")


def test_pca_noise_uses_the_components_given():
    img = np.full((32, 32, 3), 128, np.uint8)
    plain = TrainTransform(32, 32, MEAN, STD)(img, np.random.default_rng(3))
    silent = TrainTransform(32, 32, MEAN, STD, pca=True, eigval=[0, 0, 0], eigvec=np.eye(3))
    assert np.array_equal(silent(img, np.random.default_rng(3)), plain)
    red_only = TrainTransform(32, 32, MEAN, STD, pca=True, eigval=[0.5, 0, 0], eigvec=np.eye(3))
    shifted = red_only(img, np.random.default_rng(3)) - plain
    assert abs(shifted[0]).min() > 0 and np.all(shifted[1:] == 0)
    with pytest.raises(ValueError):
        TrainTransform(32, 32, MEAN, STD, pca=True, eigval=[1, 2], eigvec=np.eye(3))


def test_resize_is_bounded_by_twice_the_crop():
    EvalTransform(32, 64, MEAN, STD)
    with pytest.raises(ValueError, match="2 times"):
        EvalTransform(32, 65, MEAN, STD)
