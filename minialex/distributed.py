"""Data-parallel training on MPI: the world of processes, sharding, and gradient averaging.

Launch is MPI's: `mpiexec -n 4 python -m minialex train ...`. minialex sees that a launcher started
it with more than one process (its environment says so) and only then imports mpi4py; a single
process never does. Conventions are PyTorch DDP's and Horovod's: `-batchsize` is per process, every
process starts from rank 0's weights, gradients are averaged over the global batch, rank 0 alone
prints, logs and writes checkpoints.

Gradients: every parameter's `.grad` becomes a view into one flat float32 buffer, cut into buckets
of about `BUCKET_BYTES` in the order backward fills them (classifier first). As soon as backward has
finished every parameter of a bucket, that bucket's non-blocking all-reduce starts, and the pending
ones are tested (which lets MPI progress them) after every layer; the optimiser step waits for all.
The loss gradient is scaled by this process's share of the global batch, so the sums the
all-reduce forms are the gradient of the mean loss over the global batch.
"""
import os
import sys
import time

import numpy as np

from .errors import MinialexError

# Environment variables through which MPI launchers announce the world size.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
BUCKET_BYTES = 4 << 20
_ALIGN = 16  # float32 elements: each gradient view starts on a 64-byte boundary, as the kernels expect


def launched_size():
    """The process count an MPI launcher announced (1 when there is none)."""
    for name in _SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


class World:
    """The processes of a run: rank, size, the ranks on this node, and the collectives we use.

    A World of one process needs no MPI; its collectives return their input.
    """

    def __init__(self, comm=None):
        self.comm = comm
        if comm is None:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
            return
        from mpi4py import MPI
        self.MPI = MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()

    @property
    def is_root(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1

    def default_threads(self):
        """This node's cores shared out among the processes on it (at least one each)."""
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        if self.comm is not None:
            # The affinity mask of one process may already be a share; count the node's cores.
            cores = max(cores, os.cpu_count() or 1)
        return max(1, cores // self.local_size)

    # -- collectives ----------------------------------------------------------------------------
    def allreduce_(self, array, op="sum"):
        """In place: `array` becomes the element-wise sum (or max) over every process."""
        if self.comm is not None:
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM if op == "sum" else self.MPI.MAX)
        return array

    def iallreduce_(self, array):
        """Start an in-place sum over every process; returns a request (None without MPI)."""
        if self.comm is None:
            return None
        return self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)

    def broadcast_(self, arrays):
        """In place: every array takes rank 0's values."""
        if self.comm is not None:
            for a in arrays:
                self.comm.Bcast(a, root=0)
        return arrays

    def allgather(self, value):
        """[value of rank 0, value of rank 1, ...] (small Python objects only)."""
        return [value] if self.comm is None else self.comm.allgather(value)

    def bcast(self, value):
        return value if self.comm is None else self.comm.bcast(value, root=0)

    def abort(self, code):
        if self.comm is not None:
            self.comm.Abort(code)
        sys.exit(code)


_world = None


def world() -> World:
    """This process's World, made on first use: MPI is initialised only when a launcher started
    more than one process."""
    global _world
    if _world is None:
        if launched_size() > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise MinialexError(f"started by an MPI launcher with {launched_size()} processes, but "
                                    f"mpi4py is not installed: pip install 'minialex[mpi]'") from None
            _world = World(MPI.COMM_WORLD)
        else:
            _world = World()
    return _world


# -- gradient averaging ------------------------------------------------------------------------------

class GradientReducer:
    """Sums every parameter's gradient over the world, bucket by bucket, overlapping backward.

    `attach(model)` moves the gradients into one flat buffer; `layer_done(module)` is called after
    each layer's backward; `finish()` waits for every bucket (call it before the optimiser step).
    `comm_seconds` and `wait_seconds` measure the all-reduces' start-to-end time and the part the
    step spent waiting for them, from which the hidden fraction follows.
    """

    def __init__(self, world, bucket_bytes=BUCKET_BYTES):
        self.world = world
        self.bucket_bytes = int(bucket_bytes)
        self.buckets = []           # [(buffer view, [params])], in backward order
        self._bucket_of = {}        # id(param) -> bucket index
        self._owner = {}            # id(module) -> [params it owns directly]
        self._pending = {}          # bucket index -> params not yet done this step
        self._requests = {}         # bucket index -> (request, start time)
        self.flat = None
        self.comm_seconds = 0.0
        self.wait_seconds = 0.0

    def attach(self, model):
        params = model.parameters()
        order = list(reversed(params))   # backward reaches the last layers first
        offsets, total = [], 0
        for p in order:
            offsets.append(total)
            total += -(-p.data.size // _ALIGN) * _ALIGN
        raw = np.zeros(total + _ALIGN, dtype=np.float32)
        skip = (-raw.ctypes.data % 64) // 4
        self.flat = raw[skip:skip + total]
        first = 0
        for i, (p, off) in enumerate(zip(order, offsets)):
            view = self.flat[off:off + p.data.size].reshape(p.data.shape)
            view[...] = p.grad
            p.grad = view
            end = off + p.data.size
            if (end - offsets[first]) * 4 >= self.bucket_bytes or i == len(order) - 1:
                self._close_bucket(offsets[first], end, order[first:i + 1])
                first = i + 1
        for _, module in model.named_modules():
            own = list(module._parameters.values())
            if own:
                self._owner[id(module)] = own
        self.start_step()
        return self

    def _close_bucket(self, start, end, params):
        index = len(self.buckets)
        self.buckets.append((self.flat[start:end], list(params)))
        for p in params:
            self._bucket_of[id(p)] = index

    def start_step(self):
        self._pending = {i: {id(p) for p in ps} for i, (_, ps) in enumerate(self.buckets)}
        self._requests = {}

    def layer_done(self, module):
        """Backward of `module` has finished: start the buckets it completes, progress the rest."""
        for p in self._owner.get(id(module), ()):
            index = self._bucket_of[id(p)]
            waiting = self._pending[index]
            waiting.discard(id(p))
            if not waiting and index not in self._requests:
                self._start(index)
        self._progress()

    def _start(self, index):
        buffer, params = self.buckets[index]
        for p in params:
            p.grad  # a gradient still marked zero (no backward reached it) becomes real zeros
        self._requests[index] = (self.world.iallreduce_(buffer), time.perf_counter())

    def _progress(self):
        if self.world.comm is None:
            return
        for index, (request, started) in list(self._requests.items()):
            if request is not None and request.Test():
                self._requests[index] = (None, started)
                self.comm_seconds += time.perf_counter() - started

    def finish(self):
        """Wait for every bucket's all-reduce (starting any a partial backward left unstarted)."""
        for index in range(len(self.buckets)):
            if index not in self._requests:
                self._start(index)
        t0 = time.perf_counter()
        for index, (request, started) in self._requests.items():
            if request is not None:
                request.Wait()
                self.comm_seconds += time.perf_counter() - started
        self.wait_seconds += time.perf_counter() - t0
        self.start_step()
