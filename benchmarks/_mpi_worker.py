"""One MPI job of the distributed section: `python -m benchmarks._mpi_worker '<json>'`, started by
mpiexec (or alone for the one-process baselines). Rank 0 prints the results as one JSON line.

Actions:
- "allreduce": in-place SUM Allreduce and Iallreduce+Wait of float32 buffers of each size;
  every sample is the slowest rank's time of one call, after a barrier.
- "train": minialex data-parallel training steps on synthetic in-memory data, as the training
  loop runs them (per-step API of minialex.distributed); per-step wall times of rank 0 and the
  GradientReducer's counters, averaged over the ranks.
This file imports minialex only for "train", and never torch.
"""
import json
import sys
import time

import numpy as np


def allreduce(payload):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = []
    for mb in payload["sizes_mb"]:
        buf = np.zeros((mb << 20) // 4, dtype=np.float32)  # zeros: the sums stay finite call after call

        def blocking():
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

        def nonblocking():
            comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM).Wait()

        modes = {"Allreduce": blocking, "Iallreduce+Wait": nonblocking}
        samples = {name: [] for name in modes}
        for fn in modes.values():
            for _ in range(payload["warmup"]):
                fn()
        for r in range(payload["rounds"]):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))  # alternate which goes first
            for name in order:
                for _ in range(payload["repeats"]):
                    comm.Barrier()
                    t0 = time.perf_counter()
                    modes[name]()
                    dt = time.perf_counter() - t0
                    samples[name].append(comm.allreduce(dt, op=MPI.MAX))
        for name, ts in samples.items():
            out.append(dict(mb=mb, bytes=buf.nbytes, mode=name, samples=ts, processes=comm.Get_size()))
    return out if comm.Get_rank() == 0 else None


def train(payload):
    from benchmarks._common import set_threads
    from minialex import _random, models, nn, optim
    from minialex import distributed as dist

    w = dist.world()
    set_threads("minialex", payload["threads"])
    variant, classes, size = payload["variant"], payload["classes"], payload["size"]
    global_n = payload["global_batch"]
    local_n = global_n // w.size + (1 if w.rank < global_n % w.size else 0)
    _random.manual_seed(0)
    model = models.alexnet(num_classes=classes, variant=variant)
    dist.broadcast_parameters(model, w)              # every rank starts from rank 0's weights
    # grads in one flat buffer, backward hooks; bf16 transport when asked
    reducer = dist.GradientReducer(w, grad_dtype=payload.get("grad_dtype", "fp32")).attach(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(1000 + w.rank)
    x = rng.standard_normal((local_n, 3, size, size), dtype=np.float32)
    y = (rng.integers(0, 1 << 30, local_n) % classes).astype(np.int64)

    def step():
        logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad()
        model.backward(reducer.scale(loss_fn.backward(), local_n, global_n))  # share of the global mean
        reducer.finish()
        opt.step()
        return loss

    for _ in range(payload["warmup"]):
        step()
    reducer.comm_seconds = reducer.wait_seconds = 0.0
    times = []
    for _ in range(payload["steps"]):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    counters = w.allgather((reducer.comm_seconds, reducer.wait_seconds))
    if not w.is_root:
        return None
    steps = payload["steps"]
    return dict(samples=times, processes=w.size, threads=payload["threads"], global_batch=global_n,
                comm_s=float(np.mean([c for c, _ in counters])) / steps,
                wait_s=float(np.mean([wt for _, wt in counters])) / steps,
                buckets=len(reducer.buckets), loss=float(loss))


def main(argv):
    payload = json.loads(argv[0])
    result = {"allreduce": allreduce, "train": train}[payload["action"]](payload)
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
