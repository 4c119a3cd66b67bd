"""Memory stays flat over epochs (the -log JSONL carries rss_mb per epoch), the prefetch queue and
the im2col column buffer are bounded."""
import json
import threading
import time

import numpy as np
import pytest

from minialex.data import DataLoader
from minialex.data.listfile import Sample
from minialex.kernels import conv
from minialex._memory import memory_use
from helpers import record_im2col_chunks

from .conftest import FAST, run_cli


def test_rss_is_flat_over_epochs(demo16, tmp_path):
    r = run_cli(["train", "-list", demo16[0], "-val", demo16[0], "-epochs", 6, "-save", "w.npz",
                 "-log", "log.jsonl", *FAST], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    rss = [rec["rss_mb"] for rec in records]
    peak = [rec["peak_rss_mb"] for rec in records]
    assert len(rss) == 6 and all(isinstance(v, float) and v > 50 for v in rss), rss
    # Epoch 1 includes warm-up (arena growth, first checkpoint buffers); after it nothing may pile up.
    assert max(rss[1:]) - min(rss[1:]) < 16, rss
    assert peak[-1] - peak[1] < 16, peak
    assert peak == sorted(peak)


def test_memory_use_reads_proc():
    use = memory_use()
    assert use["rss_mb"] > 10 and use["peak_rss_mb"] >= use["rss_mb"], use


def test_prefetch_queue_is_bounded():
    """A slow consumer never has more than `prefetch` batches decoded or in flight ahead of it."""
    loaded, consumed, lock = [0], [0], threading.Lock()
    most_ahead = [0]

    class CountingLoader(DataLoader):
        def _load_batch(self, indices, epoch):
            out = super()._load_batch(indices, epoch)
            with lock:
                loaded[0] += 1
                most_ahead[0] = max(most_ahead[0], loaded[0] - consumed[0])
            return out

    samples = [Sample(i % 3, "unused", i + 1) for i in range(40)]
    loader = CountingLoader(samples, lambda img, rng: img.astype(np.float32), batch_size=2, num_workers=2,
                            prefetch=3)
    import minialex.data.loader as loader_module
    original = loader_module.load_image
    loader_module.load_image = lambda path: np.zeros((3, 4, 4), np.uint8)
    try:
        for _ in loader:
            time.sleep(0.01)
            with lock:
                consumed[0] += 1
    finally:
        loader_module.load_image = original
    assert consumed[0] == 20
    assert most_ahead[0] <= 3 + 1, most_ahead  # the queue, plus the batch handed over and not yet counted


@pytest.mark.parametrize("n, cap_images", [(7, 3), (5, 1), (4, 4), (3, 10), (6, 0.5)])
def test_im2col_buffer_stays_under_its_cap(monkeypatch, n, cap_images):
    """The batched convolution unfolds its batch in chunks that cover every image exactly once,
    each chunk's column buffer within the cap (or one image's columns when a single image is
    bigger than the cap), and the result is the unchunked one."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 3, 9, 9))  # float64: the batched im2col + GEMM path
    w = rng.standard_normal((4, 3, 3, 3))
    dy = rng.standard_normal((n, 4, 9, 9))
    y_ref = conv.conv2d_forward_ref(x, w, None, 1, 1, 1)
    one_image = 3 * 3 * 3 * 9 * 9 * x.itemsize  # one image's columns in bytes
    cap = int(cap_images * one_image)
    monkeypatch.setattr(conv.batched, "_COLS_BYTES", cap)
    for run in ("forward", "backward"):
        calls = record_im2col_chunks(monkeypatch, conv.batched)
        if run == "forward":
            y = conv.conv2d_forward(x, w, None, 1, 1, 1)
            np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        else:
            dw = np.zeros_like(w)
            conv.conv2d_backward(dy, x, w, dw, None, 1, 1, 1)
        covered = sorted(i for start, count, _ in calls for i in range(start, start + count))
        assert covered == list(range(n)), (run, calls)
        assert all(size <= max(cap, one_image) for _, _, size in calls), (run, cap, calls)
        if cap_images >= 2:
            assert len(calls) < n, (run, calls)  # chunks of several images when they fit
