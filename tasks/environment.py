"""Offline, project-local defaults for Prefect and MLflow; an explicit environment variable always wins."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def configure_environment() -> None:
    """Set before prefect or mlflow is imported: local state, no telemetry, a patient temporary server."""
    defaults = {
        "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "DASK_LOGGING__DISTRIBUTED": "warning",  # a LocalCluster's start-up chatter; a restarted worker still shows
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "OMP_WAIT_POLICY": "PASSIVE",  # spinning OpenMP threads starve parallel runs (see dynaprompt/__init__.py)
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    from dynaprompt.determinism import pin_cpu_kernels

    pin_cpu_kernels()  # before prefect or mlflow import torch: the same CPU kernels in every worker
