"""Which device a run uses and what it is: the GPU's name, CUDA and driver versions, free memory, for the records.

A process that serves one GPU sees it as `cuda:0` (its `CUDA_VISIBLE_DEVICES` names that one device, set by the
sweep's worker pinning or by dask-cuda); `physical_index` is the GPU's index on the node, which is what a
result should be traced back to.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

_pinned: str | None = None  # the one GPU this process was pinned to (pin_process_to), if any


def pin_process_to(device_id: str) -> None:
    """See only GPU `device_id` (an index or UUID on the node) from now on.

    Sets CUDA_VISIBLE_DEVICES and initialises CUDA at once, so that the binding is made now: Prefect's process
    pool applies the parent's environment around every task, which would otherwise hand the variable back.
    """
    global _pinned
    os.environ["CUDA_VISIBLE_DEVICES"] = device_id
    _pinned = device_id
    if torch.cuda.is_available():
        torch.cuda.init()


def pinned_device() -> str | None:
    return _pinned


def visible_devices() -> list[str]:
    """The node's GPUs this process may use: the pinned one, else `CUDA_VISIBLE_DEVICES`, else torch's indices."""
    if _pinned is not None:
        return [_pinned]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(count)]


@lru_cache(maxsize=1)
def driver_version() -> str | None:
    """The NVIDIA driver's version through NVML (nvidia-ml-py, which dask-cuda brings), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 -- no NVML, no driver, no GPU: the version is simply unknown
        return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform says."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict:
    """What ran a run: type, indices, name, CUDA and driver versions and free memory (GPU), or the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads(),
                "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    visible = visible_devices()
    physical = visible[index] if index < len(visible) else str(index)
    return {"type": "cuda", "index": index, "physical_index": physical,
            "name": torch.cuda.get_device_name(index), "cuda": torch.version.cuda, "driver": driver_version(),
            "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2), "torch": torch.__version__}


def device_line(info: dict) -> str:
    """One line for the start of a run: where it runs."""
    if info["type"] == "cpu":
        return f"on cpu ({info['name']}, {info['threads']} threads, {info['capability']})"
    return (f"on cuda:{info['index']} = GPU {info['physical_index']} of the node ({info['name']}, CUDA "
            f"{info['cuda']}, driver {info['driver'] or 'unknown'}, {info['free_gib']:.1f} of "
            f"{info['total_gib']:.1f} GiB free)")
