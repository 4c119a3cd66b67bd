"""Numba kernels over arrays, without classes: each public one has a plain NumPy reference twin.

Their results depend only on their arguments. The only state kept between calls is caches that
save work: per-thread scratch buffers (conv/blocked.py) and lru_caches of index tables keyed by
layer shape (conv/layout.py, conv/direct.py)."""
