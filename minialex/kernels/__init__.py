"""Pure Numba kernels over arrays: no classes, no state. Each has a plain NumPy reference twin."""
