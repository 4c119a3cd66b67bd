"""Shared fixtures of the int8 tests: small demo lists and two float cifar checkpoints trained on them
through the command line (one with batch norm), and a calibrated int8 model of each."""
import numpy as np
import pytest

from helpers import run_cli, write_list


@pytest.fixture(scope="session")
def demo_lists(tmp_path_factory):
    """(training list of 500 demo images: every 4th, so every class; test list of 128)"""
    from minialex.data import demo_dataset, read_list
    demo = demo_dataset()
    folder = tmp_path_factory.mktemp("quant_lists")
    train = write_list(folder / "train.list", read_list(demo.train_list)[::4])
    test = write_list(folder / "test.list", read_list(demo.test_list)[:128])
    return train, test


def _train(demo_lists, tmp_path_factory, *extra):
    folder = tmp_path_factory.mktemp("quant_trained")
    r = run_cli(["train", "-list", demo_lists[0], "-arch", "cifar", "-optimizer", "adam", "-epochs", 3,
                 "-batchsize", 32, "-threads", 2, "-workers", 1, "-seed", 3, "-save", "w.npz", *extra],
                cwd=folder, timeout=600)
    assert r.returncode == 0, r.stderr
    return folder / "w.npz"


@pytest.fixture(scope="session")
def trained(demo_lists, tmp_path_factory):
    """A float cifar checkpoint (LRN, no batch norm), about 40% top-1 after 3 epochs."""
    return _train(demo_lists, tmp_path_factory)


@pytest.fixture(scope="session")
def trained_bn(demo_lists, tmp_path_factory):
    """The same with batch norm after every convolution (folded into it by quantisation)."""
    return _train(demo_lists, tmp_path_factory, "-bn")


def image_batches(samples, ckpt, batch_size=32):
    """The eval-preprocessed images of `samples` as a list of float32 batches."""
    from minialex.data import DataLoader
    from minialex.evaluation import eval_transform
    loader = DataLoader(samples, eval_transform(ckpt), batch_size, shuffle=False, num_workers=0,
                        on_bad_image="error")
    return [x for x, _ in loader]


def calibrated(path, train_list, images=64, seed=0, criteria=None):
    """(checkpoint, float model, Calibration) of checkpoint `path` on `images` images of the list."""
    from minialex.calibration import CRITERIA, calibrate, calibration_samples
    from minialex.checkpoint import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    batches = image_batches(calibration_samples(train_list, len(ckpt.class_names), images, seed), ckpt)
    return ckpt, model, calibrate(model, ckpt.arch, lambda: iter(batches), criteria or CRITERIA)


@pytest.fixture(scope="session")
def test_images(demo_lists, trained):
    from minialex.checkpoint import load_checkpoint
    from minialex.data import read_list
    return np.concatenate(image_batches(read_list(demo_lists[1]), load_checkpoint(trained)))
