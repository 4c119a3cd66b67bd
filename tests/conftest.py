"""Shared pytest setup: tests/ on sys.path (for helpers.py and torch_reference.py under any
import mode) and a `torch` fixture that skips, with the reason, when the reference is absent."""
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
