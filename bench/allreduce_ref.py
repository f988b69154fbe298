"""Raw NCCL all-reduce through torch.distributed: the reference for the Rust
worker's all-reduce at the same buffer sizes (float32 sum, in place).

    torchrun --nproc-per-node 2 bench/allreduce_ref.py SIZE[,SIZE...] > out.jsonl

Rank 0 prints one JSON line per size with the bus bandwidth as nccl-tests
defines it: 2 (n - 1) / n * bytes / time.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

WARMUP, ITERS = 5, 20


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    for n in sizes:
        buf = torch.ones(n, dtype=torch.float32, device="cuda")
        for _ in range(WARMUP):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(ITERS):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        s = (time.perf_counter() - t0) / ITERS
        if dist.get_rank() == 0:
            bw = 2 * (world - 1) / world * n * 4 / s / 1e9
            print(json.dumps({"case": "flat", "elems": n, "bytes": n * 4, "world": world,
                              "backend": "torch.distributed nccl", "seconds": s, "bus_gb_s": bw}),
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
