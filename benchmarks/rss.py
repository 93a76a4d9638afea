"""A process's peak resident memory, for the benchmarks that measure one case per subprocess."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB: VmHWM on Linux, else getrusage.

    Not `getrusage` on Linux: its ru_maxrss survives execve, so a child started by a parent that held gigabytes
    reports the parent's footprint at fork. VmHWM belongs to the process's own address space.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
