"""A Prefect global concurrency limit per GPU, so parallel runs do not oversubscribe one device."""
from __future__ import annotations

import contextlib

GPU_LIMIT = "dynaprompt-gpu"


def gpu_concurrency_limit(device: str, slots: int) -> None:
    """Create (or resize) the limit when runs go to a GPU; nothing to do on CPU."""
    if not _uses_gpu(device):
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
            client.update_global_concurrency_limit(GPU_LIMIT, GlobalConcurrencyLimitUpdate(limit=slots))
        except Exception:  # noqa: BLE001 -- not there yet
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


def gpu_slot(device: str):
    """Hold one slot of the GPU limit while a run uses the device."""
    if not _uses_gpu(device):
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(GPU_LIMIT, occupy=1)


def _uses_gpu(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
