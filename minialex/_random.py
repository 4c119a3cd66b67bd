"""The one seeded random source of minialex (parameter init, dropout masks, shuffling).

`manual_seed(n)` re-seeds it, like `torch.manual_seed`. Kernels never draw random numbers
themselves: callers draw from this generator and pass arrays in.

Training keys the random numbers of each sample, not of each batch: inside `per_sample(seed,
epoch, indices)`, `uniform(shape)` for a batch of those samples draws row i from a counter-based
generator (Philox) keyed by (seed, epoch, indices[i], the how-many-th draw of the step), so a
sample's dropout masks do not depend on which other samples share its batch, how large the batch
is, or which process trains it. Outside that context `uniform` draws from the global generator.
"""
import contextlib

import numpy as np

_generator = np.random.default_rng(0)
_keys = None   # (seed, epoch, indices, [draws so far]) inside per_sample()
_MASK64 = (1 << 64) - 1


def manual_seed(seed: int) -> np.random.Generator:
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def get_generator() -> np.random.Generator:
    return _generator


@contextlib.contextmanager
def per_sample(seed, epoch, indices):
    """Within the block, `uniform` keys each batch row by its sample's global index (indices None:
    no keys, the global generator as outside)."""
    global _keys
    if indices is None:
        yield
        return
    previous = _keys
    _keys = (int(seed) & _MASK64, int(epoch), np.asarray(indices, dtype=np.int64), [0])
    try:
        yield
    finally:
        _keys = previous


def uniform(shape, dtype=np.float32):
    """Uniform [0, 1) numbers of `shape`: per sample inside `per_sample`, else from the global
    generator. shape[0] must then be the batch (one row per sample index)."""
    shape = tuple(shape)
    if _keys is None or not shape or shape[0] != len(_keys[2]):
        return _generator.random(shape, dtype=dtype)
    seed, epoch, indices, draws = _keys
    draw = draws[0]
    draws[0] += 1
    out = np.empty(shape, dtype=dtype)
    key = np.array([seed, ((epoch & 0xFFFFFFFF) << 32) | (draw & 0xFFFFFFFF)], dtype=np.uint64)
    for row, index in enumerate(indices):
        # The sample index sits in the counter's second word: rows' streams never overlap.
        bits = np.random.Philox(counter=[0, int(index), 0, 0], key=key)
        out[row] = np.random.Generator(bits).random(shape[1:], dtype=dtype)
    return out
