"""One PyTorch DDP job of the distributed section, started by torchrun:

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port P -m benchmarks._ddp_worker '<json>'

Trains torch's AlexNet, built from plain torch.nn (tests/torch_reference.py, which imports no
minialex), on the same synthetic in-memory data as the minialex worker, with DistributedDataParallel
on the gloo backend (default buckets and overlap). One process trains without the DDP wrapper, as
a single-process torch run would. Rank 0 prints its per-step wall times as one JSON line.
"""
import json
import os
import sys
import time

import numpy as np


def main(argv):
    payload = json.loads(argv[0])
    import torch
    import torch.distributed as tdist

    from tests.torch_reference import torch_alexnet

    torch.set_num_threads(payload["threads"])
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if size > 1:
        tdist.init_process_group("gloo")
    global_n = payload["global_batch"]
    local_n = global_n // size + (1 if rank < global_n % size else 0)
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway
    net = torch_alexnet(payload["variant"], payload["classes"]).train()
    model = torch.nn.parallel.DistributedDataParallel(net) if size > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(1000 + rank)
    s = payload["size"]
    x = torch.from_numpy(rng.standard_normal((local_n, 3, s, s), dtype=np.float32))
    y = torch.from_numpy((rng.integers(0, 1 << 30, local_n) % payload["classes"]).astype(np.int64))

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()  # DDP averages over the processes: the gradient of the global mean
        opt.step()
        return loss

    for _ in range(payload["warmup"]):
        step()
    times = []
    for _ in range(payload["steps"]):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps(dict(samples=times, processes=size, threads=payload["threads"], global_batch=global_n,
                              loss=loss.item())), flush=True)
    if size > 1:
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
