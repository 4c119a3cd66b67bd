import time

import numpy as np
import pytest
from PIL import Image

from minialex.data import DataLoader, EvalTransform, Sample, TrainTransform
from minialex.errors import DataError

SIZE = 8


def make_samples(folder, n=23, bad=()):
    """n tiny PNGs whose red value encodes their index, so a batch says which samples it holds."""
    samples = []
    for i in range(n):
        path = folder / f"{i}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            img = np.zeros((SIZE + 2, SIZE + 4, 3), np.uint8)
            img[..., 0] = i
            img[..., 1] = np.arange(SIZE + 4)  # left-right gradient: shows flips
            Image.fromarray(img).save(path)
        samples.append(Sample(i % 3, str(path), i + 1, str(folder / "images.list")))
    return samples


def identity_eval():
    return EvalTransform(SIZE, SIZE, [0, 0, 0], [1 / 255] * 3)


def ids_of(x):
    return [int(round(v)) for v in x[:, 0, 0, 0]]


def epoch_ids(loader):
    return [ids_of(x) for x, _ in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_covers_every_sample_once_in_a_new_order(tmp_path, workers):
    samples = make_samples(tmp_path)
    loader = DataLoader(samples, identity_eval(), batch_size=5, seed=3, num_workers=workers, prefetch=2)
    assert len(loader) == 5
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
        ids = [i for x, _ in batches for i in ids_of(x)]
        assert sorted(ids) == list(range(23))
        for x, y in batches:
            assert x.dtype == np.float32 and x.shape[1:] == (3, SIZE, SIZE) and y.dtype == np.int64
            assert y.tolist() == [i % 3 for i in ids_of(x)]
        orders.append(ids)
    assert orders[0] != orders[1] != orders[2]
    loader.set_epoch(1)
    assert [i for b in epoch_ids(loader) for i in b] == orders[1]


def test_no_shuffle_and_drop_last(tmp_path):
    samples = make_samples(tmp_path, n=11)
    loader = DataLoader(samples, identity_eval(), batch_size=4, shuffle=False, drop_last=True)
    assert len(loader) == 2
    assert epoch_ids(loader) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_same_seed_same_batches_whatever_the_threads(tmp_path):
    samples = make_samples(tmp_path, n=17)
    t = TrainTransform(SIZE, SIZE + 2, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], pca=True)

    def run(workers, prefetch, seed=11):
        loader = DataLoader(samples, t, batch_size=4, seed=seed, num_workers=workers, prefetch=prefetch)
        loader.set_epoch(2)
        return list(loader)

    reference = run(0, 1)
    for workers, prefetch in [(1, 1), (2, 4), (3, 2)]:
        for (xa, ya), (xb, yb) in zip(reference, run(workers, prefetch), strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    other = run(2, 2, seed=12)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(reference, other))


def test_augmentation_differs_between_epochs(tmp_path):
    samples = make_samples(tmp_path, n=8)
    t = TrainTransform(SIZE, SIZE + 2, [0, 0, 0], [1, 1, 1])
    loader = DataLoader(samples, t, batch_size=8, shuffle=False)
    first = next(iter(loader))[0]
    loader.set_epoch(1)
    second = next(iter(loader))[0]
    assert not np.array_equal(first, second)


def test_bad_images_are_skipped_counted_and_warned_once(tmp_path, capsys):
    samples = make_samples(tmp_path, n=12, bad={4, 9})
    loader = DataLoader(samples, identity_eval(), batch_size=5, shuffle=False, num_workers=2)
    for epoch in range(2):
        loader.set_epoch(epoch)
        ids = [i for b in epoch_ids(loader) for i in b]
        assert ids == [i for i in range(12) if i not in (4, 9)]
        assert loader.skipped == 2
    err = capsys.readouterr().err
    assert err.count("warning: skipping bad image") == 2
    assert f"skipping bad image: {tmp_path / 'images.list'}:5: {tmp_path / '4.png'}: " in err


def test_batch_of_only_bad_images_is_left_out(tmp_path, capsys):
    samples = make_samples(tmp_path, n=6, bad={2, 3})
    loader = DataLoader(samples, identity_eval(), batch_size=2, shuffle=False, num_workers=2)
    assert epoch_ids(loader) == [[0, 1], [4, 5]]
    assert loader.skipped == 2


def test_every_image_bad_is_an_error(tmp_path, capsys):
    samples = make_samples(tmp_path, n=3, bad={0, 1, 2})
    with pytest.raises(DataError) as info:
        list(DataLoader(samples, identity_eval(), batch_size=2))
    assert str(info.value).startswith(f"{tmp_path / 'images.list'}: none of the 3 images")


@pytest.mark.parametrize("workers", [0, 2])
def test_error_mode_stops_on_the_first_bad_image(tmp_path, workers):
    samples = make_samples(tmp_path, n=10, bad={6})
    loader = DataLoader(samples, identity_eval(), batch_size=2, shuffle=False, num_workers=workers,
                        on_bad_image="error")
    seen = []
    with pytest.raises(DataError) as info:
        for x, _ in loader:
            seen += ids_of(x)
    # The loader names the list line itself: the Sample carries its list file and line.
    assert str(info.value).startswith(f"{tmp_path / 'images.list'}:7: {tmp_path / '6.png'}: ")
    assert seen == [0, 1, 2, 3, 4, 5]


def test_wait_time_is_measured_and_breaking_early_is_clean(tmp_path):
    samples = make_samples(tmp_path, n=20)
    transform = identity_eval()

    def slow(img, rng):  # 20 ms a sample, 40 ms a batch, one worker: the caller must wait
        time.sleep(0.02)
        return transform(img, rng)

    loader = DataLoader(samples, slow, batch_size=2, num_workers=1, prefetch=3)
    batches = iter(loader)
    next(batches)
    assert loader.wait_time >= 0.035, loader.wait_time  # the whole first batch was waited for
    batches.close()  # cancels what is queued, joins the workers
    start = time.perf_counter()
    assert len(list(loader)) == 10
    elapsed = time.perf_counter() - start
    # A consumer that never pauses waits for nearly every batch: 10 x 40 ms, reset each epoch.
    assert 0.3 <= loader.wait_time <= elapsed, (loader.wait_time, elapsed)


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(batch_size=2, on_bad_image="ignore"),
                                    dict(batch_size=2, prefetch=0)])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        DataLoader(make_samples(tmp_path, n=2), identity_eval(), **kwargs)
