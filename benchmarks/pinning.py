"""Process pinning, checked in spawned children: each of the sweep's GPU workers sees only its own GPU.

    python -m benchmarks.pinning [--device cuda] [--workers 2] [--out reports/benchmark-gpu/pinning.json]

The sweep's process pool (`tasks.gpu.process_runner`) starts its workers with `tasks.gpu.pin_worker` as the
initializer: each claims the next slot of a shared counter and binds CUDA to that slot's GPU. Here the same
initializer, with the same spawn-context counter, starts a `ProcessPoolExecutor` of `--workers` processes
(`workers_per_gpu` 2 on a one-GPU node, so that they share it; 1 on more, so that each has its own); a barrier
holds every task until all workers run one, so each worker reports once: its slot, its CUDA_VISIBLE_DEVICES, how
many GPUs torch sees, and the UUID of its `cuda:0`, which must be the UUID of its slot's GPU as this parent sees it.

On a CPU (`--device cpu`) the node is faked with CUDA_VISIBLE_DEVICES=0,1, as tests/test_placement.py fakes
counts: the slots and the variable are checked, not the GPUs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_barrier = None  # set in each worker by `start_worker`


def start_worker(counter, workers_per_gpu: int, n_gpus: int, barrier) -> None:
    """The sweep's initializer (`tasks.gpu.pin_worker`), then keep the barrier for `report`."""
    from tasks.gpu import pin_worker

    pin_worker(counter, workers_per_gpu, n_gpus)
    global _barrier
    _barrier = barrier


def gpu_uuid(index: int = 0) -> str:
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


def report(_task: int) -> dict:
    """What this worker sees, once every worker has started a task."""
    import torch

    from tasks.gpu import worker_slot

    _barrier.wait(timeout=120)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = {"pid": os.getpid(), "slot": worker_slot(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_devices": count}
    if count:
        seen.update(uuid=gpu_uuid(0), tensor_device=str(torch.ones(1, device="cuda").device))
    return seen


def node(device: str) -> tuple[int, list[str]]:
    """The node's GPU count as the sweep counts it, and what identifies each: UUIDs on a GPU, the faked entries
    of CUDA_VISIBLE_DEVICES on a CPU."""
    import torch

    from tasks.gpu import node_gpu_count

    if device.startswith("cuda"):
        return node_gpu_count(), [gpu_uuid(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"  # a faked two-GPU node; spawned workers inherit it
    return node_gpu_count(), ["0", "1"]


def check(seen: dict, expected: str, cuda: bool) -> bool:
    """One GPU visible and it is the slot's (CUDA); the slot's entry in CUDA_VISIBLE_DEVICES (CPU)."""
    if cuda:
        return seen["cuda_devices"] == 1 and seen.get("uuid") == expected and seen.get("tensor_device") == "cuda:0"
    return seen["visible"] == expected


def run(device: str, workers: int) -> dict:
    n_gpus, identities = node(device)
    if n_gpus < 1:
        raise RuntimeError(f"tasks.gpu.node_gpu_count() found no GPU on this node (device {device})")
    per_gpu = 2 if n_gpus == 1 else 1
    spawn = multiprocessing.get_context("spawn")
    counter, barrier = spawn.Value("i", 0), spawn.Barrier(workers)
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=start_worker,
                             initargs=(counter, per_gpu, n_gpus, barrier)) as pool:
        rows = list(pool.map(report, range(workers)))
    cuda = device.startswith("cuda")
    for row in rows:
        row["expected"] = identities[(row["slot"] // per_gpu) % n_gpus]
        row["ok"] = check(row, row["expected"], cuda)
    return {"device": device, "node_gpus": n_gpus, "workers_per_gpu": per_gpu, "faked_node": not cuda,
            "workers": sorted(rows, key=lambda r: r["slot"]),
            "ok": all(r["ok"] for r in rows) and sorted(r["slot"] for r in rows) == list(range(workers))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pinning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="reports/benchmark-gpu/pinning.json")
    args = parser.parse_args(argv)
    result = run(args.device, args.workers)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in result["workers"]:
        print(f"  worker slot {row['slot']}: CUDA_VISIBLE_DEVICES={row['visible']}, {row['cuda_devices']} GPU(s) "
              f"visible, expected {row['expected']}: {'ok' if row['ok'] else 'WRONG'}", flush=True)
    return result


if __name__ == "__main__":
    main()
