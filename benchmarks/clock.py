"""Wall time per named part of a computation."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class Clock:
    """Wall time per named part, synchronising the GPU around each part."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.parts: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        """Wait for queued GPU work (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, part: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.parts[part] += time.perf_counter() - start
