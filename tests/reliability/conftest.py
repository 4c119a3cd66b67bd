"""Shared pieces of the reliability tests: a tiny real dataset, the CLI in a subprocess, and
in-process training that leaves Numba's thread count as it found it."""
import os
import subprocess
import sys

import numba
import pytest

from helpers import assert_user_error as assert_one_line_error  # noqa: F401  (re-exported to the tests)
from minialex.data import demo_dataset, read_list

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The cifar variant on 16 demo images: an epoch is two batches, so checkpoints come often.
FAST = ["-arch", "cifar", "-batchsize", "8", "-threads", "1", "-workers", "1", "-seed", "5"]


def run_cli(args, cwd, timeout=120, env=None):
    """`python -m minialex ARGS` as a user runs it; a hang fails the test through the timeout."""
    full_env = dict(os.environ, NUMBA_NUM_THREADS="2",
                    PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), **(env or {}))
    return subprocess.run([sys.executable, "-m", "minialex", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def popen_cli(args, cwd, **kw):
    env = dict(os.environ, NUMBA_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "minialex", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def write_list(path, samples):
    path.write_text("".join(f"{s.label} {s.path}\n" for s in samples))
    return path


@pytest.fixture(scope="session")
def demo16(tmp_path_factory):
    """(list path, samples): 16 demo training images, two of each of the first 8 classes and more."""
    samples = read_list(demo_dataset().train_list)[:16]
    folder = tmp_path_factory.mktemp("demo16")
    return write_list(folder / "train.list", samples), samples


@pytest.fixture
def same_threads():
    """Restore Numba's thread count after a test that trains in-process with -threads."""
    before = numba.get_num_threads()
    yield
    numba.set_num_threads(before)
