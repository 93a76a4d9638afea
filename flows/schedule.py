"""Scheduled robustness sweeps: a deployment of the sweep flow on the cron schedule of `sweep.schedule`.

    prefect server start                                   # one terminal (or any Prefect server/Cloud)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.schedule [--params params.yaml]

The second command registers the deployment and serves it: each scheduled run executes the sweep here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flows  # noqa: F401  (offline Prefect defaults)
from dynaprompt.config import load_params
from flows.sweep import sweep, sweep_config


def build_deployment(params_file: str = "params.yaml"):
    """The sweep flow as a deployment: name and cron from params, the params file as its parameter."""
    params_path = Path(params_file).resolve()
    config = sweep_config(load_params(params_path))
    schedule = config.schedule or {}
    if not schedule.get("cron"):
        raise ValueError(f"{params_path}: sweep.schedule.cron is not set")
    return sweep.to_deployment(
        name=schedule.get("name", "robustness-sweep"),
        cron=schedule["cron"],
        parameters={"params_file": str(params_path)},
        description="Sample-order robustness sweep of test-time prompt tuning methods",
        tags=["dynaprompt", "robustness"],
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--register-only", action="store_true", help="register the deployment and exit")
    args = parser.parse_args(argv)
    deployment = build_deployment(args.params)
    if args.register_only:
        print(f"registered deployment {deployment.apply()}")
        return 0
    from prefect import serve

    serve(deployment)
    return 0


if __name__ == "__main__":
    sys.exit(main())
