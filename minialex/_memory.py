"""Keep freed large buffers for reuse instead of returning them to the OS.

A training step allocates a few hundred MB of activations, column buffers and gradients and
frees them again. glibc serves blocks above 128 KB with fresh mmap()s, so every step paid page
faults and the kernel's zeroing on first touch (about 0.05 ms per MB here: 20 ms of a batch-8
AlexNet step, over 100 ms at batch 64). Raising glibc's mmap and trim thresholds makes those
blocks come from the heap and be reused, which is what PyTorch's caching allocator achieves.
Peak memory is unchanged; the process just keeps its peak until it exits.

Set MINIALEX_MALLOC=system to leave the allocator alone.
"""
import ctypes
import ctypes.util
import os
import sys

import numpy as np

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory():
    """Tune glibc's malloc (Linux only; elsewhere a no-op). Returns True when applied."""
    if os.environ.get("MINIALEX_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    ok = mallopt(_M_TRIM_THRESHOLD, 1 << 31) and ok
    return bool(ok)


def aligned_zeros_like(a, alignment=64):
    """np.zeros_like(a), C-contiguous, with its data 64-byte aligned: whole cache lines per row
    start, which streaming (non-temporal) stores need. numpy's own arrays are 16-byte aligned."""
    a = np.asarray(a)
    n = a.size * a.itemsize
    raw = np.zeros(n + alignment, dtype=np.uint8)
    off = -raw.ctypes.data % alignment
    return raw[off:off + n].view(a.dtype).reshape(a.shape)


def memory_use():
    """{"rss_mb", "peak_rss_mb"} of this process from /proc (None where there is no /proc)."""
    found = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mb" if line.startswith("VmRSS:") else "peak_rss_mb"
                    found[key] = round(int(line.split()[1]) / 1024, 1)  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return found
