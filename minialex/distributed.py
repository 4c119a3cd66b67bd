"""Data-parallel training on MPI: the world of processes, collective decisions, gradient averaging.

Launch is MPI's: `mpiexec -n 4 python -m minialex train ...`. minialex sees that a launcher started
it with more than one process (its environment says so) and only then imports mpi4py; a single
process never does, and runs the same code with collectives that return their input. Conventions
are PyTorch DDP's and Horovod's: `-batchsize` is per process, every process starts from rank 0's
weights, gradients are averaged over the global batch, rank 0 alone prints, logs and saves.

Gradients: every parameter's `.grad` becomes a view into one flat float32 buffer, cut into buckets
of about `BUCKET_BYTES` in the order backward fills them (classifier first). As soon as backward has
finished every parameter of a bucket (a backward hook), that bucket's non-blocking all-reduce
starts, and the pending ones are tested after every layer, which lets MPI progress them; the
optimiser step waits for all. With grad_dtype "bf16" a bucket travels as bfloat16 (half the bytes),
rounded with error feedback: what rounding drops is added to the next step's gradient. The loss gradient is scaled by this process's share of the global
batch, so the sums the all-reduce forms are the gradient of the mean loss over the global batch.

Errors: a bad image or list line, or a signal, is decided collectively at a batch boundary (one
small all-reduce per step), so every process stops at the same batch and exactly one prints; any
other exception on one process aborts the whole job (MPI_Abort) after naming the rank.
"""
import hashlib
import os
import signal
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
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


class ReportedElsewhere(MinialexError):
    """An error another process reports: this one exits with the same status, silently."""


class World:
    """The processes of a run: rank, size, the ranks on this node, and the collectives minialex
    uses. A World without a communicator is one process; its collectives return their input."""

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
        """This node's cores shared out among the processes on it (at least one each). The cores
        are those this process may run on (a batch system may give a job fewer than the node has)."""
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, cores // self.local_size)

    # -- collectives (all no-ops on one process) ------------------------------------------------
    def allreduce_(self, array, op="sum"):
        """In place: `array` becomes the element-wise sum (or max) over every process."""
        if self.comm is not None:
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM if op == "sum" else self.MPI.MAX)
        return array

    def iallreduce_(self, array, op=None):
        """Start an in-place sum (or `op`) over every process; returns a request (None on one
        process)."""
        if self.comm is None:
            return None
        return self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=op or self.MPI.SUM)

    def bf16_sum(self):
        """The MPI operation that sums bf16 patterns (uint16) as bf16 does, rounding each sum once."""
        if getattr(self, "_bf16_sum", None) is None:
            from .kernels.bf16 import bf16_add

            def add(inbuf, inoutbuf, datatype):
                bf16_add(np.frombuffer(inbuf, dtype=np.uint16), np.frombuffer(inoutbuf, dtype=np.uint16))

            self._bf16_sum = self.MPI.Op.Create(add, commute=True)
        return self._bf16_sum

    def broadcast_(self, arrays):
        """In place: every array takes rank 0's values."""
        if self.comm is not None:
            for a in arrays:
                self.comm.Bcast(a, root=0)
        return arrays

    def allgather(self, value):
        """[value of rank 0, value of rank 1, ...] (small Python objects)."""
        return [value] if self.comm is None else self.comm.allgather(value)

    def abort(self, code):
        """End every process of the job now (MPI_Abort); on one process, exit."""
        if self.comm is not None:
            self.comm.Abort(code)
        raise SystemExit(code)

    # -- collective decisions -------------------------------------------------------------------
    def collectively(self, fn, *args, **kwargs):
        """fn(...) on every process; if it raises a MinialexError on any, every process raises:
        the lowest failing rank its own error, the others ReportedElsewhere (so one line is printed)."""
        error = None
        try:
            result = fn(*args, **kwargs)
        except MinialexError as e:
            error, result = e, None
        self.raise_first([None if error is None else error])
        return result

    def raise_first(self, mine):
        """mine: [MinialexError or None] of this process; raise the first error of any process."""
        errors = self.allgather(None if mine[0] is None else str(mine[0]))
        first = next((r for r, e in enumerate(errors) if e is not None), None)
        if first is None:
            return
        if first == self.rank:
            mine[0].collective = True   # every process raises here: print it, do not abort
            raise mine[0]
        raise ReportedElsewhere(errors[first])

    def same_everywhere(self, value, what):
        """MinialexError on every process unless `value` is equal on all of them, naming a rank
        that differs from rank 0 (lists that differ between nodes, say)."""
        values = self.allgather(value)
        for rank, v in enumerate(values):
            if v != values[0]:
                message = (f"{what} differs between processes: rank {rank} has {v}, rank 0 "
                           f"{values[0]}; every node must see the same files")
                self.raise_everywhere(MinialexError(message))

    def step_status(self, signum, error, n):
        """(the signal any process got or None, whether any failed, the global batch) at a batch
        boundary: one all-reduce of four integers. SIGTERM wins over SIGINT."""
        status = np.array([signum == signal.SIGINT, signum == signal.SIGTERM, bool(error), int(n)],
                          dtype=np.int64)
        self.allreduce_(status)
        agreed = signal.SIGTERM if status[1] else signal.SIGINT if status[0] else None
        return agreed, bool(status[2]), int(status[3])

    def agreed(self, iterable):
        """The items of `iterable`; a MinialexError met fetching one on any process stops every
        process at the same item (raise_first). On one process, just the items."""
        items = iter(iterable)
        while True:
            item = error = None
            end = False
            try:
                item = next(items)
            except StopIteration:
                end = True
            except MinialexError as e:
                error = e
            if self.distributed:
                if self.step_status(None, error is not None, 0)[1]:
                    self.raise_first([error])
            elif error is not None:
                raise error
            if end:
                return
            yield item

    def raise_everywhere(self, error):
        """For an error every process meets alike (a diverged run): rank 0 reports it."""
        error.collective = True
        raise error if self.is_root else ReportedElsewhere(str(error))


_world = None


def world() -> World:
    """This process's World, made on first use: MPI starts only when a launcher started more
    than one process."""
    global _world
    if _world is None:
        size = launched_size()
        if size > 1:
            try:
                from mpi4py import MPI
            except ImportError:
                raise MinialexError(f"started by an MPI launcher with {size} processes, but mpi4py "
                                    f"is not installed: pip install 'minialex[mpi]'") from None
            _world = World(MPI.COMM_WORLD)
            from . import progress
            progress.speaking = _world.is_root   # rank 0 alone reports
        else:
            _world = World()
    return _world


def file_digest(path):
    """(bytes, SHA-256) of a file, to check every node reads the same list."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()[:16]


def broadcast_parameters(model, world):
    """Every process takes rank 0's parameters and buffers (running statistics)."""
    world.broadcast_([p.data for p in model.parameters()])
    broadcast_buffers(model, world)


def broadcast_buffers(model, world):
    """Every process takes rank 0's buffers, as DDP does before each forward."""
    world.broadcast_([b for _, b in model.named_buffers()])


# -- gradient averaging ------------------------------------------------------------------------------

class GradientReducer:
    """Sums every parameter's gradient over the world, bucket by bucket, overlapping backward.

    `attach(model)` moves the gradients into one flat buffer and hooks every layer with
    parameters; `scale(dloss, local_n, global_n)` weights this process's loss gradient by its share
    of the global batch; `finish()` waits for every bucket (call it before the optimiser step).
    `comm_seconds` adds up the all-reduces' start-to-end times and `wait_seconds` the part the steps
    spent waiting for them in finish(): 1 - wait/comm is the fraction hidden behind backward.
    """

    def __init__(self, world, bucket_bytes=BUCKET_BYTES, grad_dtype="fp32"):
        if grad_dtype not in ("fp32", "bf16"):
            raise ValueError(f"grad_dtype must be fp32 or bf16, got {grad_dtype!r}")
        self.world = world
        self.bucket_bytes = int(bucket_bytes)
        self.bf16 = grad_dtype == "bf16"
        self.buckets = []           # [(buffer view, [params], (start, end) in the flat buffer)]
        self._bucket_of = {}        # id(param) -> bucket index
        self._pending = {}          # bucket index -> ids of params not yet done this step
        self._requests = {}         # bucket index -> (request or None when done, start time)
        self.flat = None
        self.comm_seconds = 0.0
        self.wait_seconds = 0.0

    def attach(self, model):
        order = list(reversed(model.parameters()))   # backward reaches the last layers first
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
                index = len(self.buckets)
                self.buckets.append((self.flat[offsets[first]:end], order[first:i + 1], (offsets[first], end)))
                for q in order[first:i + 1]:
                    self._bucket_of[id(q)] = index
                first = i + 1
        if self.bf16:   # what is sent, and what rounding left to send with the next step
            self.packed = np.zeros(total, dtype=np.uint16)
            self.residual = np.zeros(total, dtype=np.float32)
        for module in model.modules():   # every layer: each one's end is a chance to progress
            if module._parameters or not module._modules:
                module.register_backward_hook(self._layer_done)
        self._reset()
        return self

    def scale(self, dloss, local_n, global_n):
        """The loss gradient of this process's mean loss, weighted by its share of the global batch."""
        if global_n == local_n:
            return dloss
        return (dloss * np.float32(local_n / max(global_n, 1))).astype(dloss.dtype, copy=False)

    def _reset(self):
        self._pending = {i: {id(p) for p in ps} for i, (_, ps, _) in enumerate(self.buckets)}
        self._requests = {}

    def _layer_done(self, module):
        """Backward of `module` has finished: start the buckets it completes, progress the rest."""
        for p in module._parameters.values():
            index = self._bucket_of[id(p)]
            waiting = self._pending[index]
            waiting.discard(id(p))
            if not waiting and index not in self._requests:
                self._start(index)
        self._progress()

    def _start(self, index):
        buffer, params, (start, end) = self.buckets[index]
        for p in params:
            p.grad  # a gradient still marked zero (no backward reached it) becomes real zeros
        started = time.perf_counter()
        if self.bf16:
            from .kernels.bf16 import bf16_round_feedback
            packed = bf16_round_feedback(buffer, self.residual[start:end], self.packed[start:end])
            request = self.world.iallreduce_(packed, op=self.world.bf16_sum())
        else:
            request = self.world.iallreduce_(buffer)
        self._requests[index] = (request, started)

    def _progress(self):
        for index, (request, started) in list(self._requests.items()):
            if request is not None and request.Test():
                self._requests[index] = (None, started)
                self.comm_seconds += time.perf_counter() - started

    def finish(self):
        """Wait for every bucket's all-reduce (starting those no backward reached)."""
        for index in range(len(self.buckets)):
            if index not in self._requests:
                self._start(index)
        t0 = time.perf_counter()
        for request, started in self._requests.values():
            if request is not None:
                request.Wait()
                self.comm_seconds += time.perf_counter() - started
        if self.bf16:
            from .kernels.bf16 import bf16_widen
            for buffer, _, (start, end) in self.buckets:
                bf16_widen(self.packed[start:end], buffer)
        self.wait_seconds += time.perf_counter() - t0
        self._reset()
