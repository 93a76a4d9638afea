"""One GPU per worker: the sweep's process pool pinned to the node's GPUs, dask-cuda's cluster on GPU nodes.

On a node with G visible GPUs and `model.device` auto or cuda, `runner: process` starts G x
`sweep.workers_per_gpu` worker processes; each claims the next slot of a shared counter when it starts and
binds CUDA to its one GPU (`dynaprompt.devices.pin_process_to`), so `cuda` in that process is its own device.
`runner: dask` without an address starts dask-cuda's `LocalCUDACluster` (one worker per GPU, each pinned by
dask-cuda itself, `workers_per_gpu` threads each); across nodes, `dask cuda worker` does the same per node.
GPUs are counted and named the way dask-cuda counts them (`dask_cuda.utils`), so a node's
`CUDA_VISIBLE_DEVICES` (GPU indices or UUIDs) is honoured.
"""
from __future__ import annotations

import multiprocessing

from dynaprompt.specs import ModelSpec, SweepConfig

_slot: int | None = None  # this worker process's slot among the node's GPU workers, once pin_worker ran


def node_gpu_count() -> int:
    """GPUs this node offers the sweep, as dask-cuda counts them (CUDA_VISIBLE_DEVICES, else NVML); 0 without."""
    from dask_cuda.utils import get_n_gpus

    try:
        return int(get_n_gpus())
    except Exception:  # noqa: BLE001 -- no NVML library or no driver: a CPU node
        return 0


def uses_gpus(model: ModelSpec) -> bool:
    """Whether the sweep spreads runs over the node's GPUs: device auto or cuda (cuda:N pins them all to N)."""
    return model.device in ("auto", "cuda") and node_gpu_count() > 0


def device_of_slot(slot: int, workers_per_gpu: int, n_gpus: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of worker `slot`: slots 0..k-1 on the first GPU, k..2k-1 on the next, ..."""
    from dask_cuda.utils import cuda_visible_devices

    return cuda_visible_devices((slot // workers_per_gpu) % n_gpus).split(",")[0]


def pin_worker(counter, workers_per_gpu: int, n_gpus: int) -> None:
    """Process-pool initializer: take the next slot and see only that slot's GPU from now on."""
    from dynaprompt.devices import pin_process_to

    with counter.get_lock():
        slot = counter.value
        counter.value += 1
    global _slot
    _slot = slot  # a module global, not an environment variable: Prefect's pool resets the environment per task
    pin_process_to(device_of_slot(slot, workers_per_gpu, n_gpus))


def worker_slot() -> int | None:
    """The slot this worker process claimed (None outside a pinned worker)."""
    return _slot


def process_runner(config: SweepConfig, model: ModelSpec):
    """Prefect's process pool: `sweep.workers` processes on CPU, G x workers_per_gpu pinned ones on a GPU node."""
    from prefect.task_runners import ProcessPoolTaskRunner

    if not uses_gpus(model):
        return ProcessPoolTaskRunner(max_workers=config.workers)
    n_gpus = node_gpu_count()
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    return ProcessPoolTaskRunner(max_workers=n_gpus * config.workers_per_gpu, initializer=pin_worker,
                                 initargs=(counter, config.workers_per_gpu, n_gpus))


def dask_runner(config: SweepConfig, model: ModelSpec, address: str | None = None):
    """prefect-dask on an existing cluster (`address`), dask-cuda's LocalCUDACluster on a GPU node, else a
    LocalCluster of `sweep.workers` single-threaded processes."""
    from prefect_dask import DaskTaskRunner

    address = address or config.dask_address
    if address:
        return DaskTaskRunner(address=address)
    local_worker_config()
    if uses_gpus(model):
        return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                              cluster_kwargs={"threads_per_worker": config.workers_per_gpu,
                                              "dashboard_address": None})
    return DaskTaskRunner(cluster_kwargs={"n_workers": config.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def local_worker_config() -> None:
    """Dask settings for the workers a local cluster spawns. Without the MALLOC_TRIM_THRESHOLD_=65536 that Dask's
    nanny sets in every worker (`distributed.nanny.pre-spawn-environ`, to hand freed memory back to the OS sooner):
    glibc then trims after torch's many small frees, and a run's samples took 20-25% longer (a DynaPrompt run of 150
    samples, 1.38 s -> 1.71 s here); a run frees its memory when it ends. Without the statistical profiler, which
    samples every thread's stack every 10 ms for a dashboard the sweep does not start."""
    import dask
    import distributed  # noqa: F401 -- its defaults loaded first, or they would come back over ours

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    dask.config.set({"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.profile.enabled": False})
