"""Shared pytest setup: tests/ on sys.path (for helpers.py and torch_reference.py under any
import mode), a `torch` fixture that skips, with the reason, when the reference is absent, a tiny
real dataset (demo16) and in-process training that leaves Numba's thread count as it found it."""
import os
import sys

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

TORCH_MISSING = "torch is only the test reference implementation and is not installed"


@pytest.fixture(scope="session")
def torch():
    """The torch module, or a clean skip. Session-scoped so @given tests may use it."""
    return pytest.importorskip("torch", reason=TORCH_MISSING)


@pytest.fixture(scope="session")
def demo16(tmp_path_factory):
    """(list path, samples): 16 demo training images, two of each of the first 8 classes and more."""
    from helpers import write_list
    from minialex.data import demo_dataset, read_list
    samples = read_list(demo_dataset().train_list)[:16]
    folder = tmp_path_factory.mktemp("demo16")
    return write_list(folder / "train.list", samples), samples


@pytest.fixture
def same_threads():
    """Restore Numba's thread count after a test that trains in-process with -threads."""
    import numba
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)
