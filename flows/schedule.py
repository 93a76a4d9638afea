"""Scheduled robustness sweeps: a deployment of the sweep flow on the cron schedule of `sweep.schedule`.

    prefect server start                                   # one terminal (or any Prefect server/Cloud)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.schedule [--params params.yaml]

The second command registers the deployment and serves it. Each scheduled run is exactly
`python -m flows.sweep --add-orderings K` (K = sweep.schedule.add_orderings), on the params' `sweep.runner`, its
workers talking to the server that serves the deployment (no server of their own): it draws K new orderings of each
order-dependent kind for the (dataset, method) pairs whose interval is still wider than
sweep.schedule.target_half_width, and does nothing once every pair is on target.

At most one run of the deployment at a time (Prefect's deployment concurrency limit): a run that comes due while
the previous one still runs is cancelled (CANCEL_NEW, "Deployment concurrency limit reached"), not queued. A
skipped tick loses nothing (the next run draws from the intervals as they are then); a queue (ENQUEUE) would grow
for as long as runs outlast the interval and then run its backlog back to back. The slot is a lease the running
flow renews, so a killed run frees it within the lease (5 minutes). Runs started by hand (`python -m flows.sweep
--add-orderings K`) are not runs of the deployment; their overlap with a scheduled one is made safe by the sweep's
own locks (flows.sweep).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

import flows  # noqa: F401  (offline Prefect defaults)
from dynaprompt.config import load_settings
from flows.sweep import sweep

ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def build_deployment(params_file: str = "params.yaml"):
    """The sweep flow as a deployment: name, cron and K from params; the params file and K as its parameters."""
    params_path = Path(params_file).resolve()
    schedule = load_settings(params_path).sweep.schedule
    if not schedule.cron:
        raise ValueError(f"{params_path}: sweep.schedule.cron is not set")
    return sweep.to_deployment(
        name=schedule.name, cron=schedule.cron,
        parameters={"params_file": str(params_path), "add_orderings": schedule.add_orderings},
        description=(f"Sample-order robustness: {schedule.add_orderings} new orderings per kind per run until every "
                     f"95% interval is within +-{schedule.target_half_width:g}"),
        tags=["dynaprompt", "robustness"],
        concurrency_limit=ONE_AT_A_TIME,
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
