"""bf16 rounding, widening and summing (kernels/bf16.py) against their NumPy twins, on special values
and random data; error feedback loses nothing."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minialex.kernels.bf16 import (bf16_add, bf16_add_ref, bf16_round_feedback, bf16_round_feedback_ref,
                                   bf16_round_ref, bf16_widen, bf16_widen_ref)

SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 1e-40,
                    np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny,
                    # ties: exactly halfway between two bf16 values, even below and odd below
                    np.uint32(0x3F808000).view(np.float32), np.uint32(0x3F818000).view(np.float32),
                    # just above and below a tie
                    np.uint32(0x3F808001).view(np.float32), np.uint32(0x3F807FFF).view(np.float32)],
                   dtype=np.float32)


def test_rounding_of_special_values():
    q = bf16_round_ref(SPECIAL)
    assert q[1] == 0x8000                                             # -0.0 keeps its sign
    got = np.empty_like(q)
    residual = np.zeros_like(SPECIAL)
    bf16_round_feedback(SPECIAL.copy(), residual, got)   # adds the residual: -0.0 + 0.0 is +0.0
    assert np.array_equal(got, bf16_round_feedback_ref(SPECIAL, np.zeros_like(SPECIAL))[0])
    assert np.array_equal(np.delete(got, 1), np.delete(q, 1))
    assert got[0] == 0x0000 and got[2] == 0x3F80 and got[4] == 0x7F80
    assert got[5] == 0xFF80 and np.isnan(bf16_widen_ref(got[6:8])).all()
    assert got[6] & 0x0040 and got[7] & 0x8000                       # quiet NaN, sign kept
    assert got[11] == 0x7F80 and got[12] == 0xFF80                    # past bf16's largest: inf
    assert got[14] == 0x3F80 and got[15] == 0x3F82                    # ties to even
    assert got[16] == 0x3F81 and got[17] == 0x3F80
    assert np.array_equal(residual[np.isfinite(SPECIAL)][:4], np.zeros(4))
    assert not np.isnan(residual).any()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5000), st.integers(0, 2 ** 32 - 1))
def test_feedback_rounding_matches_the_reference_and_loses_nothing(n, seed):
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    residual = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    q_ref, r_ref = bf16_round_feedback_ref(g, residual)
    before = (g + residual).astype(np.float32)
    q = np.empty(n, np.uint16)
    bf16_round_feedback(g, residual, q)
    assert np.array_equal(q, q_ref) and np.array_equal(residual, r_ref)
    finite = np.isfinite(before) & np.isfinite(bf16_widen_ref(q))
    # error feedback: what was sent plus what is kept is exactly what there was to send
    assert np.array_equal((bf16_widen_ref(q) + residual)[finite], before[finite])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2 ** 32 - 1))
def test_widen_and_add_match_the_reference(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2 ** 16, n, dtype=np.uint16)
    b = rng.integers(0, 2 ** 16, n, dtype=np.uint16)
    wide = np.empty(n, np.float32)
    bf16_widen(a, wide)
    assert np.array_equal(wide.view(np.uint32), bf16_widen_ref(a).view(np.uint32))
    expected = bf16_add_ref(a, b)
    bf16_add(a, b)
    assert np.array_equal(b, expected)


@pytest.mark.parametrize("value", [1.0, 3.0e38, 1e-38])
def test_add_rounds_its_sum_once(value):
    a = bf16_round_ref(np.array([value], np.float32))
    b = a.copy()
    bf16_add(a, b)
    with np.errstate(over="ignore"):
        doubled = np.array([np.float32(value) * 2], np.float32)
    assert np.array_equal(b, bf16_round_ref(doubled))
