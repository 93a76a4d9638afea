"""One Prefect server per sweep: the one `PREFECT_API_URL` names, else one the sweep starts for itself.

Without a server to talk to, every process that runs Prefect tasks starts a temporary server of its own (3 for a
sweep on 2 workers, 9 or 17 on an 8-GPU node, each delaying its worker by 20-60 s, all on one SQLite file). So the
sweep finds one (a `PREFECT_API_URL` that answers) or starts `prefect server start` on a free loopback port, and
hands its URL to everything it starts: the flow's settings (which Prefect sends with every task to the process
pool's and Dask's workers) and the environment that worker processes inherit. The server is the sweep's child: it
stops when the sweep ends, and the kernel stops it if the sweep is killed (`PR_SET_PDEATHSIG` on Linux).

Workers on other hosts cannot reach a loopback server: a sweep on an existing Dask cluster needs a server they can
reach, started by the user (README, "On 1, 8 or 64 GPUs").
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator


def current_api_url() -> str:
    """The Prefect API this process talks to ('' when Prefect would start a temporary server of its own)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or ""


def answers(api_url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def sweep_api(remote_workers: str | None = None) -> Iterator[str]:
    """The Prefect API of this sweep, as a URL, set for the flow and every worker it starts while the block runs.

    `remote_workers`: the address of an existing Dask cluster, whose workers need a server on a reachable address
    (`PREFECT_API_URL`); without it, a server on a loopback port is started when none is set."""
    url = current_api_url()
    if url:
        if not answers(url):
            raise RuntimeError(f"PREFECT_API_URL={url}: no Prefect server answers there (start one with "
                               "`prefect server start`, or unset it and the sweep starts its own)")
        yield url
        return
    if remote_workers:
        raise RuntimeError(
            f"the Dask cluster at {remote_workers} runs tasks on other hosts, which need a Prefect server they can "
            "reach: run `prefect server start --host 0.0.0.0` on this host and export "
            f"PREFECT_API_URL=http://{socket.getfqdn()}:4200/api before the sweep")
    with own_server() as url, api_url_set(url):
        yield url


@contextmanager
def own_server() -> Iterator[str]:
    """`prefect server start` on a free loopback port (API only, no services), stopped on exit; its API URL."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    port = free_port()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--no-ui", "--no-services", "--analytics-off", "--log-level", "WARNING"]
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while not answers(url, timeout=2):
            if server.poll() is not None:
                raise RuntimeError(f"the sweep's Prefect server exited ({server.returncode}): "
                                   f"{server.stderr.read().decode(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sweep's Prefect server did not answer at {url} within {timeout} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
            time.sleep(0.2)
        print(f"sweep: Prefect server {url} (pid {server.pid}), for this sweep only", flush=True)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextmanager
def api_url_set(url: str) -> Iterator[None]:
    """PREFECT_API_URL = url for this process, restored on exit: in the environment (inherited by every worker
    process started meanwhile), in Prefect's process-wide settings (read by threads Prefect starts itself, such
    as the process pool's log forwarder) and in the current settings context (sent with every task)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
        refresh_global_settings_context()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_parent() -> None:
    """In the child, before it runs: the kernel sends it SIGTERM when its parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


__all__ = ["current_api_url", "sweep_api"]
