"""Batches of decoded, transformed images, prepared in background threads.

Order: each epoch visits every sample once, in an order shuffled from (seed, epoch) -- call
`set_epoch(e)` before iterating. Each sample's augmentation draws from its own Generator seeded
from (seed, epoch, sample index), so a batch's contents never depend on which thread decoded it
or how fast: the same seed gives the same batches, bit for bit.

Background work: a thread pool of `num_workers` decodes and transforms whole batches, keeping up
to `prefetch` batches ready ahead of the training step. Threads are enough because Pillow's
decoders and resizers and NumPy's elementwise work release the GIL; the workers never call the
parallel Numba kernels, which own the cores while the model computes. `num_workers=0` does
everything in the caller's thread. `wait_time` adds up the seconds the caller spent waiting for a
batch in the current epoch: near zero means data loading keeps up.

Bad images met during an epoch (corrupt, truncated, deleted since the list was written):
- on_bad_image="skip" (default): the sample is left out of its batch, a warning naming the list
  file, line and image is printed on stderr the first time that file fails, and `skipped` counts the
  samples left out in the current epoch, for the training loop to report at the epoch's end. One
  bad JPEG among a million should not end a three-day run. A batch whose samples all fail is left
  out; an epoch in which every sample fails is a DataError.
- on_bad_image="error": the first bad image raises a DataError naming the list file and line
  (`train.list:8: IMG: cannot decode image ...`), taken from the Sample, which carries both.
"""
import math
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minialex.data.images import load_image
from minialex.errors import DataError, at_line

_ON_BAD_IMAGE = ("skip", "error")


class DataLoader:
    def __init__(self, samples, transform, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_workers: int = 2, prefetch: int = 4,
                 on_bad_image: str = "skip"):
        if len(samples) == 0:
            raise ValueError("DataLoader needs at least one sample")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if on_bad_image not in _ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {_ON_BAD_IMAGE}, got {on_bad_image!r}")
        if int(num_workers) < 0 or int(prefetch) < 1:
            raise ValueError("num_workers must be >= 0 and prefetch >= 1")
        self.samples = list(samples)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.on_bad_image = on_bad_image
        self.epoch = 0
        self.skipped = 0           # samples left out in the current (or last) epoch
        self.wait_time = 0.0       # seconds the caller waited for batches in that epoch
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch (fewer only if whole batches of bad images are skipped)."""
        n = len(self.samples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> np.ndarray:
        """Sample indices in this epoch's order."""
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))

    def batches(self) -> list[np.ndarray]:
        """This epoch's batches as arrays of sample indices."""
        order = self.order()
        return [order[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]

    def _load_batch(self, indices: np.ndarray, epoch: int):
        """Decode and transform one batch: (x, y, [(sample, message) for each bad image])."""
        xs, ys, bad = [], [], []
        for index in indices:
            sample = self.samples[index]
            try:
                img = load_image(sample.path)
            except DataError as e:
                if self.on_bad_image == "error":
                    raise DataError(sample.where(str(e))) from None
                bad.append((sample, str(e)))
                continue
            rng = np.random.default_rng([self.seed, epoch, int(index)])
            xs.append(self.transform(img, rng))
            ys.append(sample.label)
        if not xs:
            return None, None, bad
        return np.stack(xs), np.asarray(ys, dtype=np.int64), bad

    def _report(self, bad) -> None:
        for sample, message in bad:
            self.skipped += 1
            if sample.path not in self._warned:
                self._warned.add(sample.path)
                print(f"minialex: warning: skipping bad image: {sample.where(message)}", file=sys.stderr)

    def __iter__(self):
        self.skipped = 0
        self.wait_time = 0.0
        epoch = self.epoch
        batches = self.batches()
        delivered = 0
        if self.num_workers == 0:
            for indices in batches:
                x, y, bad = self._load_batch(indices, epoch)
                self._report(bad)
                if x is not None:
                    delivered += 1
                    yield x, y
        else:
            pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="minialex-data")
            pending = deque()
            try:
                upcoming = iter(batches)
                for indices in upcoming:
                    pending.append(pool.submit(self._load_batch, indices, epoch))
                    if len(pending) >= self.prefetch:
                        break
                while pending:
                    start = time.perf_counter()
                    x, y, bad = pending.popleft().result()
                    self.wait_time += time.perf_counter() - start
                    # Refill before handing the batch over, so the workers decode while the
                    # caller trains on it: this bounded queue is the whole prefetching scheme.
                    for indices in upcoming:
                        pending.append(pool.submit(self._load_batch, indices, epoch))
                        break
                    self._report(bad)
                    if x is not None:
                        delivered += 1
                        yield x, y
            finally:
                for future in pending:
                    future.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
        if delivered == 0 and batches:
            first = self.samples[0]
            where = first.list_path if first.list_path is not None else first.path
            raise DataError(at_line(where, None, f"none of the {len(self.samples)} images in the "
                                    f"list could be read ({self.skipped} skipped)"))
