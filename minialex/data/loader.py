"""Batches of decoded, transformed images, prepared in background threads.

Order: each epoch visits every sample once, in an order shuffled from (seed, epoch) -- call
`set_epoch(e)` before iterating. Each sample's augmentation draws from its own Generator seeded
from (seed, epoch, sample index), so a batch's contents never depend on which thread decoded it
or how fast: the same seed gives the same batches, bit for bit. `batch_indices` holds the sample
indices of the batch last yielded (the training loop keys dropout masks by them too).

Data-parallel training: with shard=(rank, N), each global batch of N * batch_size samples is cut
into N contiguous near-equal pieces and this process gets the rank-th; every process then yields
the same number of batches (an empty share as an empty batch), so they step together.

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
                 on_bad_image: str = "skip", shard=(0, 1)):
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
        self.rank, self.world_size = (int(v) for v in shard)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"shard must be (rank, size) with 0 <= rank < size, got {shard}")
        self.batch_indices = None  # sample indices of the batch last yielded (its rows' keys)
        self.epoch = 0
        self.skipped = 0           # samples left out in the current (or last) epoch
        self.wait_time = 0.0       # seconds the caller waited for batches in that epoch
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch (fewer only if whole batches of bad images are skipped)."""
        n, b = len(self.samples), self.global_batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def order(self) -> np.ndarray:
        """Sample indices in this epoch's order."""
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))

    def batches(self) -> list[np.ndarray]:
        """This process's batches of this epoch, as arrays of sample indices.

        The epoch's order is cut into global batches of batch_size * world_size samples; this
        process takes its contiguous share of each (rank r of N the r-th of N near-equal pieces),
        so N processes see together what one process with an N times larger batch sees.
        """
        order, b = self.order(), self.global_batch_size
        whole = [order[i:i + b] for i in range(0, len(self) * b, b)]
        return whole if self.world_size == 1 else [_share(g, self.rank, self.world_size) for g in whole]

    def _load_batch(self, indices: np.ndarray, epoch: int):
        """Decode and transform one batch: (x, y, indices kept, [(sample, message) for each bad image])."""
        xs, ys, kept, bad = [], [], [], []
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
            kept.append(int(index))
        if not xs:
            size = getattr(self.transform, "input_size", None)
            empty = None if size is None else np.zeros((0, 3, size, size), np.float32)
            return empty, np.zeros(0, np.int64), np.zeros(0, np.int64), bad
        return np.stack(xs), np.asarray(ys, dtype=np.int64), np.asarray(kept, np.int64), bad

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
                x, y, kept, bad = self._load_batch(indices, epoch)
                self._report(bad)
                if len(y) or self.world_size > 1:
                    delivered += bool(len(y))
                    self.batch_indices = kept
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
                    x, y, kept, bad = pending.popleft().result()
                    self.wait_time += time.perf_counter() - start
                    # Refill before handing the batch over, so the workers decode while the
                    # caller trains on it: this bounded queue is the whole prefetching scheme.
                    for indices in upcoming:
                        pending.append(pool.submit(self._load_batch, indices, epoch))
                        break
                    self._report(bad)
                    if len(y) or self.world_size > 1:
                        delivered += bool(len(y))
                        self.batch_indices = kept
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


def _share(indices, rank, size):
    """The rank-th of `size` contiguous near-equal pieces of `indices` (the first ones larger)."""
    base, extra = divmod(len(indices), size)
    start = rank * base + min(rank, extra)
    return indices[start:start + base + (1 if rank < extra else 0)]
