"""Numba kernels over arrays, without classes: each public one has a plain NumPy reference twin.

Their results depend only on their arguments (and on two environment switches read at call time:
MINIALEX_CONV_PATH forces a convolution path, MINIALEX_BF16=emulate the emulated bf16 products,
which differ from the native ones only in the order of float32 sums). The only state kept between calls is caches that
save work: per-thread scratch buffers (conv/blocked.py) and lru_caches of index tables keyed by
layer shape (conv/layout.py, conv/direct.py)."""
