"""What the benchmark ran on: Python, torch and CUDA, the GPU, where open_clip was imported from, shared memory.

    python -m benchmarks.environment [--device cuda] [--out reports/benchmark-gpu/environment.json]

The first part of `benchmarks/gpu.sh`: it also shows whether the carried wheels were used (open_clip's file under
the bootstrap's `--target`) and whether dask-cuda, which the pinning part needs, imports.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def module_origin(name: str) -> dict:
    """A module's version and file, or the error importing it raised."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 -- recorded: this part says what is missing
        return {"error": f"{type(error).__name__}: {error}"}
    return {"version": getattr(module, "__version__", None), "file": getattr(module, "__file__", None)}


def shared_memory(path: str = "/dev/shm") -> dict:
    """Size and free space of the filesystem DataLoader workers pass batches through."""
    try:
        stats = os.statvfs(path)
    except OSError as error:
        return {"error": str(error)}
    return {"total_gib": round(stats.f_blocks * stats.f_frsize / 2**30, 2),
            "free_gib": round(stats.f_bavail * stats.f_frsize / 2**30, 2)}


def git_commit() -> str | None:
    """The checkout's commit, where the copy has its .git (a device machine's copy may not)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def gpu(device: str) -> dict | None:
    """The GPU's name, memory and build facts; None on CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    from dynaprompt.devices import describe_device

    index = torch.device(device).index or 0
    properties = torch.cuda.get_device_properties(index)
    return {**describe_device(torch.device("cuda", index)), "capability": list(torch.cuda.get_device_capability(index)),
            "multiprocessors": properties.multi_processor_count, "count": torch.cuda.device_count(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def describe(device: str) -> dict:
    import torch

    return {
        "python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpu": gpu(device), "pythonpath": os.environ.get("PYTHONPATH"), "shm": shared_memory(), "commit": git_commit(),
        "modules": {name: module_origin(name) for name in ("torch", "open_clip", "ftfy", "wcwidth", "dask_cuda",
                                                               "dynaprompt")},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.environment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="reports/benchmark-gpu/environment.json")
    args = parser.parse_args(argv)
    report = describe(args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    gpu_line = report["gpu"]["name"] if report["gpu"] else "no GPU"
    print(f"python {report['python']}, torch {report['torch']} (CUDA {report['torch_cuda']}), {gpu_line}, "
          f"open_clip from {report['modules']['open_clip'].get('file') or report['modules']['open_clip']}")
    return report


if __name__ == "__main__":
    main()
