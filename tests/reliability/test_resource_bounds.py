"""Memory stays flat over epochs (the -log JSONL carries rss_mb per epoch), the prefetch queue and
the im2col column buffer are bounded."""
import json
import threading
import time

import numpy as np

from minialex.data import DataLoader
from minialex.data.listfile import Sample
from minialex.kernels import conv
from minialex._memory import memory_use

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


def test_im2col_buffer_stays_under_its_cap():
    for n, c, k, hw in [(64, 3, 11, 55 * 55), (256, 64, 5, 27 * 27), (1, 384, 3, 13 * 13), (512, 256, 3, 13 * 13)]:
        rows = c * k * k
        chunk = conv._chunk_size(n, rows, hw, 4)
        assert 1 <= chunk <= n
        assert chunk * rows * hw * 4 <= max(conv._COLS_BYTES, rows * hw * 4)  # one image may exceed it alone
